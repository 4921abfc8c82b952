"""Where backbones come from: one registry, one loader per source. The names below are imported
on first use (:mod:`deepfeat.lazy`), so importing a torch-free part of this package (the default
model's name) does not import PyTorch."""

from deepfeat.lazy import lazy_exports

_EXPORTS = {
    "DEFAULT_MODEL": "default", "Model": "base", "ModelSource": "registry", "load_model": "registry",
    "register_source": "registry", "resolve_device": "base", "sources": "registry", "split_spec": "registry",
}
__all__ = [
    "DEFAULT_MODEL", "Model", "ModelSource", "load_model", "register_source", "resolve_device", "sources",
    "split_spec",
]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
