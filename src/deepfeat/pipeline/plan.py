"""The plan: which inputs, with which ids, in which shards, and each shard's batches.

:func:`plan_work` merges the inputs into the store's ``plan.parquet`` (known paths keep
their id and shard, new ones go into new shards) and returns the uncommitted shards,
so a resumed run redoes exactly the shards that are not committed (the settings of a run
into an existing store: :mod:`deepfeat.pipeline.append`). :func:`shard_batches` forms a
shard's batches deterministically: consecutive items for fixed-size policies, grouped
by exact (or bucketed, ``--pad-to``) output shape for aspect-preserving ones.
"""

from __future__ import annotations

import os
from collections import OrderedDict

from deepfeat.data.images import discover, printable_path
from deepfeat.data.preprocess import SizePolicy, parse_size_policy
from deepfeat.errors import UsageError
from deepfeat.pipeline.config import ExtractConfig
from deepfeat.store import FeatureStore
from deepfeat.store.removal import allocation_floor


def plan_inputs(store: FeatureStore, paths: list[str], shard_size: int) -> tuple[list[int], list[str], list[int]]:
    """Merge *paths* into the store's plan: known paths keep their id and shard, new
    ones are appended after them in new shards. Returns the full plan columns."""
    plan = store.read_plan()
    if plan is not None:
        ids = plan.column("id").to_pylist()
        ppaths = plan.column("path").to_pylist()
        shards = plan.column("shard").to_pylist()
    else:
        ids, ppaths, shards = [], [], []
    # one file, one item: relative and absolute spellings of the same file are the same input
    root = store.meta.get("root") or os.getcwd()

    def key(p: str) -> str:  # the real file: a symlinked folder names the same files
        return os.path.realpath(os.path.join(root, p))

    known = {key(p) for p in ppaths}
    new = []
    for p in paths:
        k = key(p)
        if k not in known:
            known.add(k)
            new.append(p)
    if new:
        # above every id and shard ever used: removed items leave the plan, their ids are never reused
        next_id, next_shard = allocation_floor(store, ids, shards)
        for i, p in enumerate(new):
            ids.append(next_id + i)
            ppaths.append(p)
            shards.append(next_shard + i // shard_size)
        store.write_plan(ids, ppaths, shards)
    return ids, ppaths, shards


#: eager PyTorch on the CPU slows down when a batch outgrows the caches: at 384 x 512 one
#: image at a time runs faster than 8, while at 224 x 224 batches of 4-8 are best
#: (docs/benchmarks.md, "Batch size against input size"). Aspect-preserving batches are therefore
#: capped at the pixels of four 224 x 224 images (one image per batch from about 320 x 320 up).
CPU_BATCH_PIXELS = 4 * 224 * 224


def shard_batches(items: list[tuple[int, str]], policy: SizePolicy, batch_size: int,
                  sizes: list[tuple[int, int] | str] | None, batch_pixels: int | None = None,
                  pad_to: int | None = None) -> tuple[list[list[tuple[int, str]]], dict[int, str]]:
    """Deterministic batches of a shard, and the items whose header could not be read.

    Fixed-size policies: consecutive items, *batch_size* at a time. Aspect-preserving ones:
    items of exactly the same output size together (with *pad_to*: of the same size rounded up
    to multiples of it, :func:`deepfeat.backends.padding.bucket_shape`), at most *batch_size* per batch
    and, with *batch_pixels*, at most that many pixels (but at least one image)."""
    if pad_to:  # padding imports torch; a run without it (a prepared one) may not have it loaded
        from deepfeat.backends.padding import bucket_shape
    if policy.fixed or sizes is None:
        return [items[i: i + batch_size] for i in range(0, len(items), batch_size)], {}
    groups: OrderedDict[tuple[int, int], list[tuple[int, str]]] = OrderedDict()
    bad: dict[int, str] = {}
    for item, size in zip(items, sizes):
        if isinstance(size, str):
            bad[item[0]] = size
        else:
            groups.setdefault(bucket_shape(*size, pad_to) if pad_to else tuple(size), []).append(item)
    batches = []
    for size, group in groups.items():
        n = batch_size if not batch_pixels else max(1, min(batch_size, batch_pixels // (size[0] * size[1])))
        batches.extend(group[i: i + n] for i in range(0, len(group), n))
    return batches, bad


def eager_cpu(cfg: ExtractConfig, device) -> bool:
    """Whether an aspect-preserving extraction runs on CPUs (here, or on Ray's CPU-only actors):
    the case for :data:`CPU_BATCH_PIXELS` (eager torch and ONNX Runtime alike)."""
    on_cpu = device.type == "cpu" and (cfg.engine == "local" or not cfg.gpus_per_actor)
    return on_cpu and not parse_size_policy(cfg.size).fixed


def store_form(paths: list[str], root: str | None) -> list[str]:
    """Paths as the store spells them: relative ones relative to its root (where its first
    extraction ran) when this process runs elsewhere (an append from another folder), absolute
    ones as they are."""
    if not root or os.path.abspath(root) == os.getcwd():
        return list(paths)
    return [p if os.path.isabs(p) else os.path.relpath(os.path.abspath(p), root) for p in paths]


def plan_work(cfg: ExtractConfig, store: FeatureStore, paths: list[str] | None = None
              ) -> tuple[list[int], set[int], OrderedDict[int, list[tuple[int, str]]]]:
    """Plan *cfg*'s inputs (or, from a sync, *paths* as the store spells them) into *store*:
    (every planned id, the committed shards, the uncommitted shards' (id, path) items by shard,
    in shard order)."""
    if paths is None:
        # names that are not UTF-8 are planned (as \xNN escapes) and reported, see images.file_problem
        paths = [printable_path(p) for p in discover(cfg.inputs)] if cfg.inputs else []
        paths = store_form(paths, store.meta.get("root"))
    if cfg.limit is not None:
        paths = paths[: cfg.limit]
    ids, ppaths, shards = plan_inputs(store, paths, cfg.shard_size)
    if not ids and not cfg.sync:  # a sync may leave a store empty: every file of its folders deleted
        raise UsageError("no images found in the inputs")
    committed = set(store.committed_shards())
    by_shard: OrderedDict[int, list[tuple[int, str]]] = OrderedDict()
    for i, p, s in zip(ids, ppaths, shards):
        if s not in committed:
            by_shard.setdefault(s, []).append((i, p))
    return ids, committed, by_shard


#: images per batch on the CPU without --batch-size (measured best for CNNs on few cores)
CPU_BATCH = 8


def default_batch(cfg: ExtractConfig, device) -> None:
    """Without --batch-size: 64 on CUDA, 8 on the CPU, there capped at :data:`CPU_BATCH_PIXELS`
    for aspect-preserving policies (unless --batch-pixels is set)."""
    if cfg.batch_size is None:
        cfg.batch_size = 64 if device.type == "cuda" else CPU_BATCH
        if cfg.batch_pixels is None and eager_cpu(cfg, device):
            cfg.batch_pixels = CPU_BATCH_PIXELS
