"""The run: the store's lock, setup (model, meta, store), the plan, one engine, the finish."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from deepfeat.errors import UsageError
from deepfeat.pipeline import faults, prepared_net
from deepfeat.pipeline.append import adopt_store_settings
from deepfeat.pipeline.config import ExtractConfig, ExtractReport
from deepfeat.pipeline.hashcache import hash_cache
from deepfeat.pipeline.local_engine import run_local
from deepfeat.pipeline.network import POOLING_FILE, build_meta, load_feature_net
from deepfeat.pipeline.plan import default_batch, plan_work
from deepfeat.pipeline.post import _finish_post, check_post_dim, install_post, set_post
from deepfeat.pipeline.progress import Progress
from deepfeat.pipeline.sync import SyncPlan, apply_sync, record_inputs, recorded_inputs, scan_inputs, stale_warning
from deepfeat.store import FeatureStore, check_store_dir
from deepfeat.store.compaction import finish_compaction
from deepfeat.store.lock import StoreLock
from deepfeat.store.tombstones import JOURNAL

log = logging.getLogger(__name__)


def extract(cfg: ExtractConfig, on_shard: Callable[[int], None] | None = None,
            after: Callable[[FeatureStore], str | None] | None = None) -> ExtractReport:
    """Run (or continue) an extraction into ``cfg.output``, as the store's only writer.

    The store's lock (:class:`~deepfeat.store.lock.StoreLock`) is taken first: a second
    ``extract`` on the same store, or a store folder that cannot be written, is refused
    before the model is loaded. The run itself is :func:`_extract`; *after*, if given, is
    called with the store before the lock is released (a sync refreshes the store's index
    there: :func:`deepfeat.collection.sync.sync_store`) and its answer is the report's ``index``.
    """
    cfg.validate()
    out = Path(cfg.output)
    check_store_dir(out)
    with StoreLock(cfg.output, create=not cfg.resume):
        new = not (out / "meta.json").is_file()
        if not new and (out / JOURNAL).is_file():  # a compaction was stopped: this writer finishes it first
            finish_compaction(FeatureStore(out))
        try:
            report = _extract(cfg, on_shard)
        except BaseException:
            if new:  # a run that stores nothing leaves nothing behind (the lock removes a folder it made)
                _remove_if_nothing_stored(out)
            raise
        if after is not None:
            report.index = after(FeatureStore(out))
        return report


#: what a new store holds before its first shard is committed (removed when the run stores nothing)
_SETUP_FILES = ("meta.json", "plan.parquet", "items.parquet", "pooling.npz", "post.npz", "failures.csv")


def _remove_if_nothing_stored(out: Path) -> None:
    """Remove a new store's setup files after a run that committed no shard (e.g. "no images
    found"), so that the folder takes a correct run with any settings."""
    shards = out / "shards"
    if shards.is_dir() and any(shards.glob("*.items.parquet")):
        return
    for name in _SETUP_FILES:
        (out / name).unlink(missing_ok=True)
    if shards.is_dir():
        for f in shards.iterdir():  # arrays of a shard that was never committed
            f.unlink(missing_ok=True)
        shards.rmdir()


def _extract(cfg: ExtractConfig, on_shard: Callable[[int], None] | None = None) -> ExtractReport:
    """Run (or continue) an extraction into ``cfg.output``; see :mod:`deepfeat.pipeline`.

    The setup (model, meta, store), the plan and the finish (items.parquet, fitted
    post-processing, failures.csv) are the same for both engines; only where the
    uncommitted shards are computed differs. *on_shard* is called with each shard id
    as it is committed (in this process for both engines).
    """
    cfg.validate()
    post = cfg.post_chain()
    post_file = cfg.post if post.fitted and post.needs_fit else None  # a saved, fitted chain file
    cfg.post = post.spec
    if cfg.engine == "ray":
        from deepfeat.pipeline.ray_engine import require_ray

        require_ray()  # before any heavy work: a missing extra is a UsageError that says how to install it
    t_start = time.perf_counter()
    out = Path(cfg.output)
    existed = (out / "meta.json").is_file()
    if cfg.sync and not cfg.inputs and not existed:
        raise UsageError(f"--sync without inputs syncs a store with the folders it records; {out} is not a feature "
                         "store yet: give the folders to extract")
    sync = scan_for_sync(cfg, FeatureStore(out)) if cfg.sync and existed else None
    if sync is not None and not sync.to_plan and not _unfinished(FeatureStore(out)):
        return _sync_without_extracting(cfg, FeatureStore(out), sync, t_start)  # no model to load
    store, model, layers, fnet, dims, device = _open_store(cfg, out, post, post_file)
    if cfg.sync:
        sync = sync or scan_for_sync(cfg, store)
        apply_sync(store, sync)
    if sync is None and existed and cfg.inputs:  # a plain re-run: say what changed (stat only)
        with hash_cache(cfg.graph_cache) as hashes:
            warning = stale_warning(store, cfg.inputs, cfg.output, hashes)
        if warning:
            log.warning("%s", warning)
    ids, committed, by_shard = plan_work(cfg, store, None if sync is None else sync.to_plan)
    if cfg.sync:
        faults.sync_step("planned")
    if cfg.inputs:
        record_inputs(store, cfg.inputs)
    report = ExtractReport(store=str(out), planned=len(ids), skipped_shards=len(committed))
    if sync is not None:
        report.sync = sync.to_dict(paths=False)
        report.sync_paths = sync.to_dict()["paths"]
    default_batch(cfg, device)
    todo = sum(len(v) for v in by_shard.values())
    if committed:
        log.info("resuming: %d shard(s) already committed", len(committed))

    stages = {"read": 0.0, "decode": 0.0, "infer": 0.0, "write": 0.0}
    progress = Progress(len(ids), len(ids) - todo, cfg.progress)
    try:
        if cfg.engine == "ray":
            from deepfeat.pipeline.ray_engine import run_shards_on_ray

            run_shards_on_ray(cfg, store, layers, by_shard, report, progress, stages, on_shard)
        else:
            run_local(cfg, store, model, fnet, layers, dims, device, by_shard, report, progress, stages, on_shard,
                      t_start)
    except KeyboardInterrupt:
        report.interrupted = True
        raise
    finally:
        progress.close()
        report.seconds = time.perf_counter() - t_start
        report.stage_seconds = {k: round(v, 3) for k, v in stages.items()}
        try:
            store.consolidate()
        except Exception as e:  # never hide the original error behind a consolidation failure
            log.warning("could not consolidate items.parquet: %s", e)
    _finish(store, cfg, report)
    return report


def scan_for_sync(cfg: ExtractConfig, store: FeatureStore) -> SyncPlan:
    """A sync's diff (:mod:`deepfeat.pipeline.sync`): *cfg*'s inputs (or the store's recorded
    ones) against the store; :func:`~deepfeat.pipeline.sync.apply_sync` then tombstones what
    changed or went, and the extraction plans and extracts its ``to_plan`` paths."""
    inputs = list(cfg.inputs) or recorded_inputs(store)
    if not inputs:
        raise UsageError(f"{cfg.output} does not record the folders it was made from (it was extracted before "
                         f"deepfeat recorded them); sync it once with `deepfeat extract FOLDER... -o {cfg.output} "
                         "--sync`")
    with hash_cache(cfg.graph_cache) as hashes:
        plan = scan_inputs(store, inputs, threads=max(1, cfg.workers or 4), hashes=hashes)
    log.info("sync: %s", plan.summary())
    return plan


def _unfinished(store: FeatureStore) -> bool:
    """Whether the store's plan has shards not committed yet (an interrupted run)."""
    plan = store.read_plan()
    return plan is not None and bool(set(plan.column("shard").to_pylist()) - set(store.committed_shards()))


def _sync_without_extracting(cfg: ExtractConfig, store: FeatureStore, sync: SyncPlan, t_start: float
                             ) -> ExtractReport:
    """A sync with nothing to extract (only deletions, or nothing at all): the removals and the
    record of the run, without loading the model."""
    apply_sync(store, sync)
    faults.sync_step("planned")
    if cfg.inputs:
        record_inputs(store, cfg.inputs)
    plan = store.read_plan()
    report = ExtractReport(store=str(store.path), planned=0 if plan is None else plan.num_rows,
                           skipped_shards=len(store.committed_shards()))
    report.sync, report.sync_paths = sync.to_dict(paths=False), sync.to_dict()["paths"]
    report.seconds = time.perf_counter() - t_start
    _finish(store, cfg, report)
    return report


def _open_store(cfg: ExtractConfig, out: Path, post, post_file: str | None):
    """The setup before the plan: with --resume the store's settings, the network, the store
    (created or reopened) with its meta, a learnt pooling's codebook and the post-processing
    chain. Returns (store, model, layers, fnet, dims, device)."""
    existing = FeatureStore(out) if (out / "meta.json").is_file() else None
    if cfg.resume and existing is None:
        raise UsageError(f"--resume: {out} is not an existing feature store")
    if existing is not None:  # the append contract: the store's settings unless asked (pipeline.append)
        adopt_store_settings(cfg, existing.meta, out)

    entry = prepared_net.lookup(cfg)  # an earlier run's network from the graph cache: no PyTorch
    if entry is not None:
        model, layers, pooling, dims = prepared_net.network(entry, cfg.model)
        fnet, device = entry, prepared_net.CPU
    else:
        model, layers, pooling, fnet, dims, device = _build_network(cfg, out)
    if post_file:
        check_post_dim(post, post_file, dims[0])  # before the store is made
    meta = build_meta(cfg, model, layers, pooling, dims)
    store = FeatureStore.create(out, meta)
    if pooling.needs_fit and not (store.path / POOLING_FILE).is_file():
        pooling.save(store.path / POOLING_FILE, extra={"layer": layers[0], "model": model.spec})
    if store.meta.get("post") != meta["post"]:
        set_post(store, meta["post"])
    if post_file:
        install_post(store, post, post_file, dims[0])
    return store, model, layers, fnet, dims, device


def _build_network(cfg: ExtractConfig, out: Path):
    """(model, layers, pooling, FeatureNet, dims, device) built in PyTorch."""
    from deepfeat.backends.export_cache import cached_dims, open_cache
    from deepfeat.backends.featurenet import pooled_dims
    from deepfeat.models.base import resolve_device

    # the Ray driver only plans (and fits a codebook, if any) on its CPU; actors pick their device
    device = resolve_device(cfg.device if cfg.backend in ("torch", "auto") and cfg.engine == "local" else "cpu")
    if cfg.precision != "f32" and device.type != "cpu":
        raise UsageError(f"--precision {cfg.precision} runs on OpenVINO on the CPU; this run would use {device} "
                         "(pass --device cpu)")
    model, layers, pooling, fnet = load_feature_net(cfg, out, device)
    dims = cached_dims(open_cache(cfg.graph_cache), fnet, model.data_config.input_size,
                       lambda: pooled_dims(fnet, model.data_config.input_size))
    return model, layers, pooling, fnet, dims, device


def _finish(store: FeatureStore, cfg: ExtractConfig, report: ExtractReport) -> None:
    """After the shards: fit the post-processing chain, write failures.csv, record the run."""
    _finish_post(store, cfg)
    failed = store.failed()
    if failed.num_rows:
        import pyarrow.csv as pacsv

        rep = store.path / "failures.csv"
        pacsv.write_csv(failed.select(["id", "path", "error"]), rep)
        report.failures_report = str(rep)
    store.update_meta(last_run=report.to_dict())
