"""The supervised decode pool: a dead or hanging worker costs one item, never the run.

No test depends on how fast the machine is: deaths are immediate, and the per-item timeout is
measured with :class:`HangClock`, which stands still until a hang item has begun.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest

from deepfeat.data.workers import SupervisedPool, WorkerLost, WorkerStartError
from tests import pool_tasks

HOUR = 3600.0


class HangClock:
    """The pool's clock for a test: it stands still (so no ordinary item ever times out) until a
    hang item has begun in a worker; from then until the pool has timed the hang out, each reading
    is an hour later than the one before. Only one worker may be busy while a hang is pending
    (the pools below have one batch in flight, or one worker): the clock is the pool's, not a
    worker's."""

    def __init__(self) -> None:
        self.hangs = mp.get_context("spawn").Value("i", 0)  # hang items begun, counted by the workers
        self.pool: SupervisedPool | None = None
        self.now = 0.0

    def __call__(self) -> float:
        if self.pool is not None and self.hangs.value > self.pool.stats["timeouts"]:
            self.now += HOUR
        return self.now

    def pool_of(self, workers: int, timeout: float) -> SupervisedPool:
        self.pool = SupervisedPool(workers, timeout=timeout, clock=self,
                                   initializer=pool_tasks.count_hangs_in, initargs=(self.hangs,))
        return self.pool


def test_dead_and_hanging_workers_are_replaced_and_the_items_reported_in_order(tmp_path):
    items = [str(tmp_path / n) for n in ("a", "kill-once", "b", "kill-always", "c", "hang", "d")]
    with HangClock().pool_of(2, timeout=2.0) as pool:  # one batch in flight at a time
        first = pool.pids
        out = pool.submit(pool_tasks.batch, items).result(timeout=120)
        again = pool.submit(pool_tasks.batch, items[:1]).result(timeout=60)  # the pool still works
        assert pool.stats["timeouts"] == 1 and pool.stats["deaths"] == 3 and pool.stats["restarts"] == 4
        assert pool.pids != first
    assert out[:3] == ["ok:a", "ok:kill-once", "ok:b"]  # a one-off death: retried alone, nothing lost
    assert out[3].startswith("failed:kill-always:its decode worker process died twice on it (killed by SIGKILL)")
    assert out[4] == "ok:c"
    assert out[5] == "failed:hang:decode timed out after 2 s (its worker was killed and replaced)"
    assert out[6] == "ok:d" and again == ["ok:a"]


def test_batches_queued_behind_a_dying_worker_are_not_lost(tmp_path):
    """Each worker holds the batch it runs and the next one; when it dies or hangs, the next
    one goes to another worker (here: the one that replaces it), and every batch's results come
    back complete and in order."""
    batches = [[str(tmp_path / f"{k}-{j}") for j in range(3)] for k in ("a", "b", "c", "d", "e", "f")]
    batches[1][1] = str(tmp_path / "kill-always-1")
    batches[3][0] = str(tmp_path / "hang-3")
    with HangClock().pool_of(1, timeout=2.0) as pool:  # one worker: see HangClock
        futs = [pool.submit(pool_tasks.batch, b) for b in batches]
        out = [f.result(timeout=120) for f in futs]
    for b, res in zip(batches, out):
        assert len(res) == 3
        for item, r in zip(b, res):
            name = item.rsplit("/", 1)[1]
            assert r == f"ok:{name}" or (r.startswith(f"failed:{name}:") and name[0] in "kh")


def test_a_plain_task_whose_worker_dies_raises_and_others_go_on():
    with SupervisedPool(1) as pool:
        bad = pool.submit(pool_tasks.whole, -1)
        good = pool.submit(pool_tasks.whole, 21)
        with pytest.raises(WorkerLost, match="killed by SIGKILL"):
            bad.result(timeout=60)
        assert good.result(timeout=60) == 42


def test_workers_that_cannot_start_fail_the_futures_instead_of_restarting_forever():
    pool = SupervisedPool(1, initializer=pool_tasks.broken_init)
    try:
        with pytest.raises(WorkerStartError, match="die as they start"):
            pool.submit(pool_tasks.whole, 1).result(timeout=120)
    finally:
        pool.shutdown(wait=False)
