"""Query descriptors made exactly as the store's: :class:`QueryEmbedder` (the model and descriptor
network described by the store's own ``meta.json``, loaded only when an image query arrives;
image files, optionally a region ``x1,y1,x2,y2`` cut out first as the Oxford protocol requires),
and :func:`parse_bbox`."""

from __future__ import annotations

import os
from typing import BinaryIO, Sequence

import numpy as np

from deepfeat.errors import StoreError, UsageError
from deepfeat.store import FeatureStore


class QueryEmbedder:
    """Embeds query images as *store* embedded its own (feature *feature*), on *device*."""

    def __init__(self, store: FeatureStore, feature: str, device: str = "cpu"):
        self.store = store
        self.feature = feature
        self.device = device
        self._model = None
        self._fnet = None

    @property
    def model(self):
        """The store's model, its weights checked against the store's hash (loaded on first use)."""
        if self._model is None:
            from deepfeat.models import load_model

            spec = self.store.meta["model"]["spec"]
            model = load_model(spec, device=self.device)
            sha = self.store.meta["model"].get("weights_sha256")
            if sha and model.weights_sha256 and sha != model.weights_sha256:
                raise StoreError(f"the weights of {spec} changed since the store was made "
                                 f"(sha256 {model.weights_sha256[:12]} vs {sha[:12]})")
            self._model = model
        return self._model

    @property
    def feature_net(self):
        """The descriptor network of the store's meta: layers, pooling (and codebook), scales."""
        if self._fnet is None:
            from deepfeat.backends.featurenet import FeatureNet
            from deepfeat.pooling import get_pooling, load_pooling

            meta = self.store.meta
            codebook = self.store.path / "pooling.npz"
            pooling = load_pooling(codebook) if codebook.is_file() else get_pooling(meta["pooling"])
            self._fnet = FeatureNet(self.model, meta["layers"], pooling, tuple(meta.get("scales", [1.0])),
                                    meta.get("scale_combine", "sum")).eval()
        return self._fnet

    def embed_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Descriptors (post-processed) of decoded images of the store's size policy."""
        import torch

        out = []
        layer_i = self.store.meta["layers"].index(self.feature)
        for px in pixels:  # one at a time: query images may differ in size
            with torch.inference_mode():
                v = self.feature_net(torch.from_numpy(px)[None].to(self.model.device))[layer_i]
            out.append(v.float().cpu().numpy().reshape(1, -1))
        x = np.concatenate(out).astype(np.float32)
        return np.ascontiguousarray(self.store.post.apply(x), dtype=np.float32)

    def decode(self, image: str | os.PathLike | BinaryIO, bbox: Sequence[float] | None = None) -> np.ndarray:
        """Pixels of *image* (cut to *bbox* first) decoded as the store's were."""
        from deepfeat.data.images import decode_image
        from deepfeat.data.preprocess import parse_size_policy

        policy = parse_size_policy(self.store.meta.get("size", "model"))
        return decode_image(image, policy, self.model.data_config, crop_box=tuple(bbox) if bbox else None,
                            draft=self.store.meta.get("draft_decode", True)).pixels

    def embed_images(self, images: Sequence[str | os.PathLike | BinaryIO],
                     bboxes: Sequence[Sequence[float] | None] | None = None) -> np.ndarray:
        """Descriptors of image files (or file objects), each optionally cropped to a box."""
        bboxes = bboxes or [None] * len(images)
        return self.embed_pixels([self.decode(im, bb) for im, bb in zip(images, bboxes)])


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
