"""Distributed extraction on Ray Data: the same shards, computed by an actor pool on many machines.

The driver (``deepfeat extract --engine ray``) does what the local engine does before
and after the work: it loads the model once to write the store's meta (and fits a
codebook, if the pooling learns one), plans the inputs into shards (``plan.parquet``,
same ids, same shard assignment), and at the end consolidates ``items.parquet``, fits
the post-processing chain and writes ``failures.csv``. In between, every uncommitted
shard becomes one row of a Ray Dataset (shard id, ids, paths) and goes through
``map_batches(ShardWorker, batch_size=1)`` on a fixed-size actor pool:

* :class:`ShardWorker` loads the model and builds the :class:`~deepfeat.backends.featurenet.FeatureNet`
  once per actor, checks that it matches the store's meta, and computes a shard with
  the very code the local engine uses (:class:`deepfeat.pipeline.shard.ShardProcessor`: the
  same deterministic batches, decode, network, pooling, assembly), reading the images
  itself (reading is distributed) with a small decode thread pool, then commits the
  shard into the store directory. Only a small row of statistics returns to the driver.
* The store directory must therefore be on a file system that every node can read and
  write at the same path (NFS, a cluster file system, an S3/GCS FUSE mount), and so
  must the images.
* Exactly once in effect: a commit writes each file to a temporary name and renames it,
  the items file (the commit marker) last. Ray Data restarts a dead actor and retries
  its task (its actor pools default to unlimited restarts and retries of tasks lost to
  a dead worker); a retried shard whose items file exists is not recomputed, and one
  that died half-written is recomputed and overwrites its own partial files. A resumed
  run skips committed shards exactly as the local engine does.

Ray is an optional extra: ``pip install 'deepfeat[ray]'``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from deepfeat.errors import DeepfeatError, UsageError
from deepfeat.pipeline.config import ExtractConfig, ExtractReport
from deepfeat.pipeline.progress import Progress
from deepfeat.store import FeatureStore

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'deepfeat[ray]'"
STAT_KEYS = ("read", "decode", "infer", "write")


def require_ray():
    """The ``ray`` module with Ray Data, or a :class:`UsageError` that says how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise UsageError(f"--engine ray needs Ray Data, which is not installed ({e}): {INSTALL_HINT}") from None
    return ray


class ShardWorker:
    """A Ray Data actor: loads the model once, then computes and commits whole shards.

    Constructed by Ray on a worker node with the driver's (resolved) configuration;
    called with a batch of shard rows (``shard``, ``ids``, ``paths``; one row per call
    with ``batch_size=1``), it returns one row of statistics per shard. A deepfeat error
    (an incompatible model on this node, a store it cannot write) comes back as data,
    in the row's ``error``/``error_type``, for the driver to raise as the same error:
    Ray would reduce it to a traceback string, and retrying it would not help.
    """

    def __init__(self, cfg: ExtractConfig, decode_threads: int, torch_threads: int):
        self.host = socket.gethostname()
        self.init_error: DeepfeatError | None = None
        try:
            self._setup(cfg, decode_threads, torch_threads)
        except DeepfeatError as e:
            self.init_error = e

    def _setup(self, cfg: ExtractConfig, decode_threads: int, torch_threads: int) -> None:
        import torch

        from deepfeat.backends.featurenet import pooled_dims
        from deepfeat.data.preprocess import parse_size_policy
        from deepfeat.models.base import resolve_device
        from deepfeat.pipeline.decode import make_executor
        from deepfeat.pipeline.network import build_meta, load_feature_net, make_runner
        from deepfeat.pipeline.shard import ShardProcessor

        torch.set_num_threads(torch_threads)
        self.store = FeatureStore(cfg.output)
        device = resolve_device(cfg.device if cfg.backend == "torch" else "cpu")
        model, layers, pooling, fnet = load_feature_net(cfg, self.store.path, device)
        dims = pooled_dims(fnet, model.data_config.input_size)
        # the network this node built must be the one the store was made with (same weights
        # file, layers, pooling, codebook...): a node with other weights would corrupt the store
        self.store.check_compatible(build_meta(cfg, model, layers, pooling, dims))
        policy = parse_size_policy(cfg.size)
        self.processor = ShardProcessor(self.store, make_runner(cfg, fnet, device), layers, dims, policy,
                                        cfg.batch_size, cfg.dtype, cfg.batch_pixels)
        self.workers = decode_threads
        self.executor = make_executor("threads", decode_threads, (policy, model.data_config, cfg.draft,
                                                                  cfg.max_pixels))

    def __call__(self, batch) -> dict[str, np.ndarray]:
        rows: list[dict[str, Any]] = []
        shards = batch.column("shard").to_pylist()
        ids = batch.column("ids").to_pylist()
        paths = batch.column("paths").to_pylist()
        for shard, shard_ids, shard_paths in zip(shards, ids, paths):
            rows.append(self._one(int(shard), list(zip(shard_ids, shard_paths))))
        return {k: np.array([r[k] for r in rows]) for k in rows[0]}

    def _one(self, shard: int, items: list[tuple[int, str]]) -> dict[str, Any]:
        t0 = time.perf_counter()
        row: dict[str, Any] = {"shard": shard, "n": len(items), "ok": 0, "failed": 0, "skipped": False,
                               **dict.fromkeys(STAT_KEYS, 0.0), "seconds": 0.0, "pid": os.getpid(),
                               "host": self.host, "error_type": "", "error": ""}
        try:
            row.update(self._compute(shard, items))
        except DeepfeatError as e:
            row.update(error_type=type(e).__name__, error=str(e))
        row["seconds"] = time.perf_counter() - t0
        return row

    def _compute(self, shard: int, items: list[tuple[int, str]]) -> dict[str, Any]:
        if self.init_error is not None:
            raise self.init_error
        done = self.store.shard_items(shard)
        if done is not None:
            # a retry of a shard whose commit had finished before its worker died
            status = done.column("status").to_pylist()
            n_ok, n_failed, skipped = status.count("ok"), len(status) - status.count("ok"), True
            stages = dict.fromkeys(STAT_KEYS, 0.0)
        else:
            self.processor.stages = dict.fromkeys(STAT_KEYS, 0.0)
            n_ok, n_failed = self.processor.run(shard, items, self.executor, self.workers)
            stages, skipped = self.processor.stages, False
        return {"ok": n_ok, "failed": n_failed, "skipped": skipped, **{k: float(stages[k]) for k in STAT_KEYS}}


def actor_plan(cfg: ExtractConfig, ray, n_shards: int) -> tuple[int, int, int, str]:
    """(actors, decode threads per actor, torch threads per actor, device) for this run."""
    if cfg.gpus_per_actor > 0:
        device = "cuda" if cfg.device == "auto" else cfg.device
        if not device.startswith("cuda"):
            raise UsageError(f"--gpus-per-actor {cfg.gpus_per_actor} with --device {cfg.device}: use --device "
                             "auto or cuda, or --gpus-per-actor 0")
    else:
        if cfg.device.startswith("cuda"):
            raise UsageError("--device cuda with --engine ray needs --gpus-per-actor (e.g. 1)")
        device = "cpu"  # no GPU reserved: never share one behind Ray's back
    n = cfg.num_actors
    if n is None:
        res = ray.cluster_resources()
        if cfg.gpus_per_actor > 0:
            n = int(res.get("GPU", 0) // cfg.gpus_per_actor)
            if n < 1:
                raise UsageError(f"--gpus-per-actor {cfg.gpus_per_actor}: the Ray cluster has "
                                 f"{res.get('GPU', 0)} GPU(s)")
        else:
            n = max(1, int(res.get("CPU", 1) // cfg.cpus_per_actor))
        n = max(1, min(n, n_shards))
    cpus = max(1, int(cfg.cpus_per_actor))
    decode = cfg.workers if cfg.workers else cpus
    return n, decode, cpus, device


def _connect(cfg: ExtractConfig, ray) -> bool:
    """Join or start Ray unless this process already did; True when we must shut it down."""
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"logging_level": logging.WARNING}
    if cfg.ray_address:
        ray.init(address=cfg.ray_address, **kw)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**kw)
    else:  # a single-machine instance for this run
        ray.init(include_dashboard=False, **kw)
    return True


def _raise_worker_error(row: dict[str, Any]) -> None:
    """Raise the deepfeat error a worker reported in *row*, as the same type."""
    from deepfeat import errors

    cls = getattr(errors, str(row["error_type"]), None)
    if not (isinstance(cls, type) and issubclass(cls, DeepfeatError)):
        cls = DeepfeatError
    raise cls(f"{row['error']} (Ray worker on {row['host']}, shard {row['shard']})")


def run_shards_on_ray(cfg: ExtractConfig, store: FeatureStore, layers: list[str],
                      by_shard: OrderedDict[int, list[tuple[int, str]]], report: ExtractReport, progress: Progress,
                      stages: dict[str, float], on_shard: Callable[[int], None] | None = None) -> None:
    """Compute the uncommitted shards *by_shard* on a Ray actor pool; see the module docstring.

    Fills *report* and *stages* (summed over actors: worker-seconds, not wall time) as
    shard statistics stream back, and calls *on_shard* with each committed shard id.
    """
    if not by_shard:
        return
    ray = require_ray()
    started = _connect(cfg, ray)
    ctx = ray.data.DataContext.get_current()
    saved_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # one progress line, ours, per committed shard
    it = None
    try:
        n_actors, decode_threads, torch_threads, device = actor_plan(cfg, ray, len(by_shard))
        actor_cfg = replace(cfg, inputs=[], layers=list(layers), device=device, resume=False, limit=None,
                            pool_fit=None)  # a learnt codebook comes from the store itself
        rows = [{"shard": s, "ids": [i for i, _ in items], "paths": [p for _, p in items]}
                for s, items in by_shard.items()]
        log.info("ray: %d shard(s) on %d actor(s) (%s CPU, %s GPU each; %d decode thread(s))", len(rows),
                 n_actors, cfg.cpus_per_actor, cfg.gpus_per_actor, decode_threads)
        # one block per shard, so that idle actors can take any remaining shard
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(
            ShardWorker,
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            fn_constructor_kwargs={"cfg": actor_cfg, "decode_threads": decode_threads,
                                   "torch_threads": torch_threads},
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor or None,
        )
        it = iter(ds.iter_rows())
        for row in it:
            if row["error"]:
                _raise_worker_error(row)
            n = int(row["n"])
            report.processed += n
            report.ok += int(row["ok"])
            report.failed += int(row["failed"])
            for k in STAT_KEYS:
                stages[k] += float(row[k])
            progress.update(n, stages)
            if on_shard is not None:
                on_shard(int(row["shard"]))
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()  # stops the streaming executor and its actors (also on Ctrl-C)
        ctx.enable_progress_bars = saved_bars
        if started:
            ray.shutdown()
