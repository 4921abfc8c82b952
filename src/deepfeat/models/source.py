"""What a model source is: :class:`ModelSource` (a spec prefix, an example, a loader), and the
``arch@weights`` split that the timm and torchvision sources share.

A source module defines one ``SOURCE`` value; :mod:`deepfeat.models.registry` imports the built-in
ones and finds a spec's source. Sources never import the registry, so the registry can import them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from deepfeat.errors import ModelError, UsageError
from deepfeat.models.base import Model


@dataclass(frozen=True)
class ModelSource:
    """A place models come from.

    ``load(rest, spec, **options)`` builds the :class:`Model` for the part of the spec
    after the prefix; ``ready`` lists specs usable offline right now; ``requires``
    names the Python packages the source needs (reported by ``deepfeat models``).
    A source whose models are built on another model (``finetuned:``) sets ``loads_base``:
    its ``load`` then also receives ``load_base``, the registry's own ``load_model``.
    """

    name: str
    prefix: str | None
    example: str
    description: str
    load: Callable[..., Model]
    ready: Callable[[], list[str]]
    requires: tuple[str, ...] = ()
    extra: str | None = None
    loads_base: bool = False


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
