"""The supervised decode pool: a dead or hanging worker costs one item, never the run."""

from __future__ import annotations

import pytest

from deepfeat.data.workers import SupervisedPool, WorkerLost, WorkerStartError
from tests import pool_tasks


def test_dead_and_hanging_workers_are_replaced_and_the_items_reported_in_order(tmp_path):
    items = [str(tmp_path / n) for n in ("a", "kill-once", "b", "kill-always", "c", "hang", "d")]
    with SupervisedPool(2, timeout=2.0) as pool:
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
    one goes to another worker, and every batch's results come back complete and in order."""
    batches = [[str(tmp_path / f"{k}-{j}") for j in range(3)] for k in ("a", "b", "c", "d", "e", "f")]
    batches[1][1] = str(tmp_path / "kill-always-1")
    batches[3][0] = str(tmp_path / "hang-3")
    with SupervisedPool(2, timeout=2.0) as pool:
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
