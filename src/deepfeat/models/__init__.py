"""Where backbones come from: one registry, one loader per source."""

from deepfeat.models.base import Model, resolve_device
from deepfeat.models.registry import DEFAULT_MODEL, ModelSource, load_model, register_source, sources, split_spec

__all__ = [
    "DEFAULT_MODEL", "Model", "ModelSource", "load_model", "register_source", "resolve_device", "sources",
    "split_spec",
]
