"""Query descriptors made exactly as the store's: :class:`QueryEmbedder` (the model and descriptor
network described by the store's own ``meta.json``, loaded only when an image query arrives;
image files, optionally a region ``x1,y1,x2,y2`` cut out first as the Oxford protocol requires),
and :func:`parse_bbox`."""

from __future__ import annotations

from deepfeat.backends.embedder import Embedder, descriptor_recipe
from deepfeat.errors import UsageError
from deepfeat.store import FeatureStore


class QueryEmbedder(Embedder):
    """Embeds query images as *store* embedded its own (feature *feature*), on *device*: the store's
    descriptor recipe, its pooling codebook and its post-processing chain as the store holds it."""

    def __init__(self, store: FeatureStore, feature: str, device: str = "cpu", graph_cache: bool = False):
        super().__init__(descriptor_recipe(store.meta, feature), store.path, device, graph_cache)
        self.store = store
        self.feature = feature

    @property
    def post(self):
        return self.store.post


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    """``x1,y1,x2,y2`` (pixels) as a tuple; None for no text."""
    if not text:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--bbox {text!r}: give x1,y1,x2,y2 in pixels") from None
    if len(vals) != 4 or vals[2] <= vals[0] or vals[3] <= vals[1]:
        raise UsageError(f"--bbox {text!r}: give x1,y1,x2,y2 with x2 > x1 and y2 > y1")
    return vals  # type: ignore[return-value]
