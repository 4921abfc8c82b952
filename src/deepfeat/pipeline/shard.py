"""One shard, from its (id, path) items to a committed shard: the single definition
shared by the local engine and the Ray one (:mod:`deepfeat.pipeline.ray_engine`)."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from deepfeat.data.images import file_problem
from deepfeat.data.preprocess import SizePolicy
from deepfeat.data.sources import SourceRecord, file_record
from deepfeat.errors import DeepfeatError, StoreError
from deepfeat.pipeline import faults
from deepfeat.pipeline.decode import decode_batch, probe_sizes
from deepfeat.pipeline.plan import shard_batches
from deepfeat.store import FeatureStore, ShardItems

log = logging.getLogger(__name__)


@dataclass
class ShardJob:
    """A shard being computed: its items, deterministic batches, and the results so far."""

    shard: int
    items: list[tuple[int, str]]
    batches: list[list[tuple[int, str]]]
    bad: dict[int, str]  # items whose image header could not be read (variable-size policies)
    results: dict[int, tuple] = field(default_factory=dict)  # id -> (vecs, w, h, notes) | (None, error)
    sources: dict[int, SourceRecord | None] = field(default_factory=dict)  # id -> the file as it was read
    left: int = 0  # batches not inferred yet

    def __post_init__(self) -> None:
        self.left = len(self.batches)


class ShardProcessor:
    """How one shard is computed, from its (id, path) items to a committed shard.

    ``plan`` forms the deterministic batches (probing image headers on *executor* for
    aspect-preserving size policies), ``infer`` runs the network on one decoded batch
    (:func:`decode_batch` output), ``commit`` assembles the items table and the feature
    arrays and commits them atomically. The local engine interleaves these across shards
    to keep its decode workers busy; a Ray actor calls :meth:`run` for a whole shard.
    Either way the same batches go through the same code, so the stores are equal.
    """

    def __init__(self, store: FeatureStore, runner: Callable[[np.ndarray], list[np.ndarray]], layers: list[str],
                 dims: list[int], policy: SizePolicy, batch_size: int, dtype: str, batch_pixels: int | None = None,
                 pad_to: int | None = None):
        self.store, self.runner, self.layers, self.dims = store, runner, layers, dims
        self.policy, self.batch_size, self.batch_pixels, self.pad_to = policy, batch_size, batch_pixels, pad_to
        self.out_dtype = np.float16 if dtype == "float16" else np.float32
        self.stages = {"read": 0.0, "decode": 0.0, "infer": 0.0, "write": 0.0}

    def plan(self, shard: int, items: list[tuple[int, str]], executor: Executor, workers: int) -> ShardJob:
        # decode from the files (relative paths resolved against the store's root); the
        # items table keeps the paths as they were given
        files = [(i, self.store.resolve_path(p)) for i, p in items]
        sizes = None
        if not self.policy.fixed:
            chunk = max(1, math.ceil(len(files) / max(workers, 1)))
            futs = [executor.submit(probe_sizes, [p for _, p in files[i: i + chunk]])
                    for i in range(0, len(files), chunk)]
            sizes = [s for f in futs for s in f.result()]
        batches, bad = shard_batches(files, self.policy, self.batch_size, sizes, self.batch_pixels, self.pad_to)
        return ShardJob(shard, items, batches, bad)

    def infer(self, job: ShardJob, decoded: tuple[list[tuple], float, float]) -> int:
        """Run the network on one decoded batch of *job*; returns the number of items in it."""
        results, t_read, t_dec = decoded
        self.stages["read"] += t_read
        self.stages["decode"] += t_dec
        good = [r for r in results if r[1] is not None]
        # one forward pass per shape: a batch is planned as one shape, but a header that
        # lies about the image (rare) must cost a smaller batch, never the run
        by_shape: dict[tuple[int, ...], list[tuple]] = {}
        run_list = getattr(self.runner, "run_list", None)  # a padding runner takes several shapes at once
        for r in good:
            by_shape.setdefault(() if run_list else r[1].shape, []).append(r)
        for group in by_shape.values():
            t0 = time.perf_counter()
            for sub, outs in self._forward(job, group):
                for k, r in enumerate(sub):
                    job.results[r[0]] = ([o[k].reshape(-1) for o in outs], r[3], r[4], r[5])
            self.stages["infer"] += time.perf_counter() - t0
        for r in results:
            if r[1] is None:
                job.results[r[0]] = (None, r[2])
            job.sources[r[0]] = r[6]
        job.left -= 1
        return len(results)

    #: images in a row that the network failed on, alone, before the run stops (a broken
    #: runner or device, not a bad image)
    MAX_MODEL_FAILURES = 8

    def _forward(self, job: ShardJob, group: list[tuple]) -> list[tuple[list[tuple], list[np.ndarray]]]:
        """The network on a group of same-shape decoded images, as [(images, outputs)].

        If the batch raises, each image is run alone, so an image the network cannot take
        costs only itself: it is recorded as failed with the error. When every image of a
        batch fails alone too, or :data:`MAX_MODEL_FAILURES` in a row do, the fault is
        not in the images and the run stops (committed shards are kept)."""
        try:
            outs = self._run_model(job, group)
            self._model_failures = 0
            return [(group, outs)]
        except Exception as e:  # noqa: BLE001 - retried image by image below
            if len(group) == 1:
                self._model_failed(job, group[0], e)
                return []
            first = e
        done = []
        for r in group:
            try:
                done.append(([r], self._run_model(job, [r])))
                self._model_failures = 0
            except Exception as e:  # noqa: BLE001 - recorded for this image
                self._model_failed(job, r, e)
        if not done:
            raise DeepfeatError(f"the network failed on every image of a batch, also one at a time: "
                                f"{_one_line(first)}. Committed shards are kept.") from first
        log.warning("the network failed on a batch of %d; %d of its images went through one at a time", len(group),
                    len(done))
        return done

    def _run_model(self, job: ShardJob, group: list[tuple]) -> list[np.ndarray]:
        if faults.enabled():
            paths = dict(job.items)
            faults.model_fault([paths[r[0]] for r in group])
        run_list = getattr(self.runner, "run_list", None)  # a padding runner takes several shapes at once
        if run_list is not None:
            return run_list([r[1] for r in group])
        return self.runner(np.stack([r[1] for r in group]))

    def _model_failed(self, job: ShardJob, r: tuple, e: Exception) -> None:
        self._model_failures = getattr(self, "_model_failures", 0) + 1
        if self._model_failures >= self.MAX_MODEL_FAILURES:
            raise DeepfeatError(f"the network failed on {self._model_failures} images in a row: {_one_line(e)}. "
                                "Committed shards are kept.") from e
        job.results[r[0]] = (None, f"the network failed on this image: {_one_line(e)}")

    def commit(self, job: ShardJob) -> tuple[int, int]:
        """Write the shard (arrays, then the items file that marks it committed); returns (ok, failed)."""
        if faults.enabled():
            faults.before_commit()
        t0 = time.perf_counter()
        items_tab = ShardItems.empty()
        feats: list[list[np.ndarray]] = [[] for _ in self.layers]
        for item_id, path in job.items:
            if item_id in job.bad:  # its header was unreadable: recorded here (rare), so sync sees it change
                file = self.store.resolve_path(path)
                items_tab.add(item_id, path, ok=False, error=job.bad[item_id],
                              source=None if file_problem(file) else file_record(file))
                continue
            r = job.results[item_id]
            source = job.sources.get(item_id)
            if r[0] is None:
                items_tab.add(item_id, path, ok=False, error=r[1], source=source)
                continue
            vecs, w, h, notes = r
            items_tab.add(item_id, path, ok=True, width=w, height=h, offset=len(feats[0]), notes=notes, source=source)
            for j, v in enumerate(vecs):
                feats[j].append(v)
        arrays = {
            name: (np.stack(f).astype(self.out_dtype) if f else np.zeros((0, d), self.out_dtype))
            for name, f, d in zip(self.layers, feats, self.dims)
        }
        try:
            self.store.commit_shard(job.shard, items_tab, arrays)
        except OSError as e:
            raise StoreError(f"cannot write shard {job.shard} to {self.store.path}: {e.strerror or e}. Committed "
                             "shards are kept; free space and run the same command again to continue.") from None
        self.stages["write"] += time.perf_counter() - t0
        n_ok = sum(s == "ok" for s in items_tab.status)
        return n_ok, len(items_tab) - n_ok

    def run(self, shard: int, items: list[tuple[int, str]], executor: Executor, workers: int) -> tuple[int, int]:
        """Compute and commit a whole shard, decoding up to ``2 * workers`` batches ahead of inference."""
        job = self.plan(shard, items, executor, workers)
        ahead = max(2, 2 * workers)
        pending: deque = deque()
        nxt = 0
        while nxt < len(job.batches) or pending:
            while nxt < len(job.batches) and len(pending) < ahead:
                pending.append(executor.submit(decode_batch, job.batches[nxt]))
                nxt += 1
            self.infer(job, pending.popleft().result())
        return self.commit(job)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."
