"""The local engine (``engine="local"``): decode workers feed inference in this process,
several shards in flight; each shard is committed as soon as its last batch is done."""

from __future__ import annotations

import sys
import time
from collections import OrderedDict, deque
from concurrent.futures import Executor
from typing import Callable

from deepfeat.data.images import decode_image
from deepfeat.data.preprocess import parse_size_policy
from deepfeat.pipeline import prepared_net
from deepfeat.pipeline.config import ExtractConfig, ExtractReport
from deepfeat.pipeline.decode import _shutdown, decode_batch, make_executor
from deepfeat.pipeline.network import make_runner, padding, resolve_threads
from deepfeat.pipeline.progress import Progress
from deepfeat.pipeline.shard import ShardJob, ShardProcessor
from deepfeat.store import FeatureStore

#: decoded images (uint8, H x W x 3) allowed to wait for inference, in bytes: decoding runs ahead of
#: inference by whole shards at small sizes (224 x 224: over 1,700 images, where feeding the workers
#: only a few batches at a time was slower) but by about 85 images at ``long:1024`` instead of a whole
#: shard of 1,024 images (figures: docs/benchmarks.md, "At long:1024")
DECODE_AHEAD_BYTES = 256 * 2**20


def decode_ahead(policy, data_config, max_pixels: int | None) -> int:
    """How many decoded images may wait for inference under :data:`DECODE_AHEAD_BYTES`, from the
    largest image *policy* makes (``short:S``: taken as S x 2S; ``native``: 4,000,000 pixels or
    *max_pixels*)."""
    side = policy.size
    if policy.kind == "model":
        h, w = data_config.input_size
        pixels = h * w
    elif isinstance(side, tuple):
        pixels = side[0] * side[1]
    elif isinstance(side, int):
        pixels = side * side * (2 if policy.kind == "short" else 1)
    else:
        pixels = min(max_pixels or 4_000_000, 4_000_000)
    return max(1, DECODE_AHEAD_BYTES // (3 * max(1, pixels)))


#: with at most this many images to extract and no ``--workers`` given, decode in this process:
#: starting the decode worker processes (each imports deepfeat) costs more than decoding a few
#: images (docs/startup.md); ``--workers N`` keeps them (and their per-image timeout)
INLINE_DECODE_MAX = 4


def run_local(cfg: ExtractConfig, store: FeatureStore, model, fnet, layers: list[str], dims: list[int], device,
              by_shard: OrderedDict[int, list[tuple[int, str]]], report: ExtractReport, progress: Progress,
              stages: dict[str, float], on_shard: Callable[[int], None] | None, t_start: float) -> None:
    """The local engine: decode workers feed inference in this process, several shards in flight."""
    policy = parse_size_policy(cfg.size)
    threads, workers = resolve_threads(cfg)
    if cfg.workers is None and sum(map(len, by_shard.values())) <= INLINE_DECODE_MAX:
        workers = 0  # a few images: decoding them here costs less than starting worker processes
    torch_threads = _set_torch_threads(cfg.threads)
    proc = ShardProcessor(store, make_runner(cfg, fnet, device, threads), layers, dims, policy, cfg.batch_size,
                          cfg.dtype, cfg.batch_pixels, padding(cfg))
    proc.stages = stages  # accumulate into the caller's dict, which the report reads even after an interrupt
    from deepfeat.backends import append_check as backend_check

    try:
        backend_check.guard(store, proc.runner, layers, lambda p: decode_image(
            p, policy, model.data_config, draft=cfg.draft, max_pixels=cfg.max_pixels).pixels)
    except BaseException:
        _set_torch_threads(torch_threads)
        raise
    report.backend = proc.runner.name
    initargs = (policy, model.data_config, cfg.draft, cfg.max_pixels)
    executor = make_executor(cfg.decode_in, workers, initargs, cfg.decode_timeout)
    interrupted = False
    try:
        _schedule(proc, executor, workers, by_shard, report, progress, stages, on_shard, t_start,
                  decode_ahead(policy, model.data_config, cfg.max_pixels))
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        _shutdown(executor, cancel=interrupted)
        _set_torch_threads(torch_threads)
    if report.processed:
        backend_check.record(store, proc.runner)
        prepared_net.remember(cfg, model, layers, fnet, dims, proc.runner)


def _set_torch_threads(n: int | None) -> int | None:
    """Give eager torch *n* intra-op threads (None: leave its default, all cores); the number it had,
    to restore. A prepared run (:mod:`deepfeat.pipeline.prepared_net`) has no torch loaded: nothing to set."""
    if "torch" not in sys.modules:
        return None
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    return before


def _schedule(proc: ShardProcessor, executor: Executor, workers: int,
              by_shard: OrderedDict[int, list[tuple[int, str]]], report: ExtractReport, progress: Progress,
              stages: dict[str, float], on_shard: Callable[[int], None] | None, t_start: float,
              ahead_images: int) -> None:
    """Keep batches decoding ahead of inference (at least ``2 * workers``, and more while fewer than
    *ahead_images* images are in flight), across shards in plan order; infer them in submission
    order and commit each shard when its last batch is done."""
    from deepfeat.backends import append_check as backend_check

    store = proc.store
    inflight_max = max(2, 2 * max(workers, 1))
    pending: deque = deque()  # (job, future of decode_batch, its number of images), in submission order
    waiting: deque = deque()  # (job, batch) planned but not yet given to the decoders
    jobs: dict[int, ShardJob] = {}

    def plan_shard(shard: int, items: list[tuple[int, str]]) -> None:
        job = jobs[shard] = proc.plan(shard, items, executor, workers)
        waiting.extend((job, b) for b in job.batches)
        if not job.batches:
            finish_shard(job)

    def finish_shard(job: ShardJob) -> None:
        del jobs[job.shard]
        if report.processed and "inference" not in store.meta:
            # before the first commit, so that a run killed after it still says which backend made its rows
            backend_check.record(store, proc.runner)
        n_ok, n_failed = proc.commit(job)
        report.ok += n_ok
        report.failed += n_failed
        if on_shard is not None:
            on_shard(job.shard)

    def drain_one() -> None:
        job, fut, _ = pending.popleft()
        n = proc.infer(job, fut.result())
        report.backend = proc.runner.name
        report.processed += n
        if report.warmup_seconds is None:
            report.warmup_seconds = time.perf_counter() - t_start
            report.warmup_items = n
        progress.update(n, stages)
        if job.left == 0:
            finish_shard(job)

    # batches go to the decoders as inference takes them, up to ahead_images images in flight (one batch
    # at least): decoding is faster than inference at large sizes, and whatever it ran ahead by is memory
    shard_iter = iter(by_shard.items())
    exhausted = False
    in_flight = 0
    while True:
        while len(pending) < inflight_max or (waiting and in_flight + len(waiting[0][1]) <= ahead_images):
            if waiting:
                job, b = waiting.popleft()
                pending.append((job, executor.submit(decode_batch, b), len(b)))
                in_flight += len(b)
                continue
            nxt = None if exhausted else next(shard_iter, None)
            if nxt is None:
                exhausted = True
                break
            plan_shard(*nxt)
        if not pending:
            break
        in_flight -= pending[0][2]
        drain_one()
