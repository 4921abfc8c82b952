"""An extraction without PyTorch: the network of an earlier run, from the graph cache
(:mod:`deepfeat.backends.prepared`).

:func:`lookup` finds the prepared entry for an :class:`~deepfeat.pipeline.config.ExtractConfig` (on the
CPU, ONNX Runtime, the graph cache on); the run then takes its model meta, layers, pooling and
descriptor lengths from the entry and runs its graph (:class:`~deepfeat.backends.prepared.PreparedRunner`).
:func:`remember` writes the entry after a run that built the network and ran it in ONNX Runtime, under
three keys: the settings as given (``--layer default``, ``--pool default``: what the next ``extract``
asks with), as a run into the store gives them (its recorded layers and pooling: ``deepfeat sync``, an
append) and as its descriptor recipe says (what a search of the store asks with).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from types import SimpleNamespace
from typing import Any

from deepfeat.backends import prepared
from deepfeat.pipeline.config import ExtractConfig
from deepfeat.pipeline.plan import CPU_BATCH

log = logging.getLogger(__name__)

#: stands in for ``torch.device("cpu")`` where a prepared run needs a device's type only
CPU = SimpleNamespace(type="cpu")


def _given_key(cfg: ExtractConfig) -> dict[str, Any]:
    return prepared.key("descriptors", cfg.model, prepared.descriptor_settings(
        cfg.layers, cfg.pooling, cfg.scales, cfg.scale_combine, cfg.size, backend=cfg.backend,
        batch_size=cfg.batch_size or CPU_BATCH, labels=cfg.labels))


def preparable(cfg: ExtractConfig) -> bool:
    """Whether *cfg*'s run may use (and write) a prepared entry: the graph cache on, the local engine,
    ONNX Runtime (asked for, or ``auto``) at f32 on the CPU, no padded batches, no codebook to fit."""
    from deepfeat.pipeline.network import padding

    return (cfg.graph_cache and cfg.engine == "local" and cfg.backend in ("auto", "onnx") and cfg.precision == "f32"
            and not padding(cfg) and not cfg.compile and not cfg.pool_fit and prepared.cpu_only(cfg.device)
            and importlib.util.find_spec("onnxruntime") is not None)


class PreparedModel:
    """What an extraction asks of a model, as a prepared entry recorded it."""

    def __init__(self, entry: prepared.Prepared, spec: str):
        self.entry = entry
        self.spec = spec  # as this run gives it (the entry's key holds its files' absolute paths)
        self.data_config = entry.config()
        self.extra_meta: dict[str, Any] = {}

    def meta(self) -> dict[str, Any]:
        return {**self.entry.model, "spec": self.spec}


class RecordedPooling:
    """A pooling as a prepared entry recorded it (spec and parameters); nothing to fit."""

    needs_fit = False

    def __init__(self, spec: str, params: dict[str, Any]):
        self.spec, self._params = spec, params

    def to_dict(self) -> dict[str, Any]:
        return dict(self._params)


def lookup(cfg: ExtractConfig) -> prepared.Prepared | None:
    """The prepared entry for *cfg*'s network, if the run may use one and an earlier run left it."""
    if not preparable(cfg):
        return None
    from deepfeat.backends.export_cache import open_cache
    from deepfeat.pipeline.network import resolve_threads

    entry = prepared.load(open_cache(True), _given_key(cfg))
    runner = prepared.open_runner(entry, resolve_threads(cfg)[0])
    if entry is None or runner is None:
        return None
    entry.runner = runner  # type: ignore[attr-defined]  # make_runner's runner for this run
    log.info("%s prepared from the graph cache (%s graph): PyTorch not needed", entry.spec, entry.kind)
    return entry


def network(entry: prepared.Prepared, spec: str):
    """(model, layers, pooling, dims) of a prepared entry, for the store's meta and the run (*spec*: the
    model as the run gives it)."""
    out = entry.outputs
    return (PreparedModel(entry, spec), list(out["layers"]), RecordedPooling(out["pooling"], out["pooling_params"]),
            [int(d) for d in out["dims"]])


def remember(cfg: ExtractConfig, model, layers: list[str], fnet, dims: list[int], runner) -> None:
    """After a run that built the network (*fnet*, a FeatureNet): write its prepared entry if ONNX Runtime
    ran a graph of the cache."""
    from deepfeat.backends.append_check import active_runner

    active = active_runner(runner)
    graphs = getattr(active, "graphs", None)
    pooling = getattr(fnet, "pooling", None)
    if (not preparable(cfg) or active.name != "onnx" or isinstance(active, prepared.PreparedRunner)
            or graphs is None or graphs.disk_cache is None or graphs.fallback_reason or pooling is None
            or pooling.needs_fit or isinstance(model, PreparedModel)):
        return
    files = prepared.model_files(model, cfg.labels)
    built = [(k, p) for k, p in graphs.paths.items() if k[0] == graphs.kind]
    if files is None or len(built) != 1:
        return
    (kind, shape), path = built[0]
    name = prepared.graph_entry(path, graphs.disk_cache)
    if name is None:
        return
    entry = prepared.Prepared(
        key={}, files=prepared.stamps(files), graph=name, kind=kind, batch_size=graphs.batch_size,
        shape=list(shape) if kind == "static" else [int(shape[2])], data_config=model.data_config.to_dict(),
        model=model.meta(), outputs={"layers": list(layers), "pooling": pooling.spec,
                                     "pooling_params": pooling.to_dict(), "dims": [int(d) for d in dims]})
    # as given (``--layer default``), as a run into the store gives them (its recorded settings: a sync or
    # an append, pipeline.append) and as a search of the store asks (its descriptor recipe)
    adopted = dataclasses.replace(cfg, layers=list(layers), pooling=pooling.spec)
    recipe = {"layers": layers, "pooling": pooling.spec, "scales": cfg.scales, "scale_combine": cfg.scale_combine,
              "size": cfg.size}
    keys = [_given_key(cfg), _given_key(adopted), prepared.resolved_key(model.spec, recipe)]
    for k in {prepared.digest(k): k for k in keys}.values():
        prepared.save(graphs.disk_cache, k, entry)
