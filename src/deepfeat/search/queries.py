"""Queries for a :class:`~deepfeat.search.engine.SearchEngine`, embedded exactly as the store was made:
the model and descriptor network described by the store's own ``meta.json`` (loaded only when an
image query arrives), image files (optionally a region ``x1,y1,x2,y2`` cut out first, as the
Oxford protocol requires), rows/ids/paths already in the store, or ``.npy`` vectors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from deepfeat.errors import StoreError, UsageError


class QueriesMixin:
    """:class:`~deepfeat.search.engine.SearchEngine`'s queries: model, embedding, store rows."""

    @property
    def model(self):
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

    def row(self, key: str | int) -> int:
        """Feature row of a store id (int or digits) or a stored path."""
        if isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isdigit()):
            hit = np.nonzero(self.ids == int(key))[0]
            if not len(hit):
                raise UsageError(f"id {key} is not in the store (or failed to extract)")
            return int(hit[0])
        for cand in (key, os.path.normpath(key)):
            if cand in self._path_rows:
                return self._path_rows[cand]
        raise UsageError(f"{key!r} is not a path or id in the store")

    def resolve_queries(self, queries: Sequence[str], bbox: Sequence[float] | None = None
                        ) -> tuple[np.ndarray, list[str], list[int | None]]:
        """Turn CLI query strings into vectors: ``.npy`` files, stored paths/ids, or image files.

        Returns (xq, labels, rows) where rows[i] is the store row of a stored query (or None)."""
        vecs, labels, rows = [], [], []
        for q in queries:
            if q.endswith(".npy") and Path(q).is_file():
                try:
                    v = np.load(q, allow_pickle=False).astype(np.float32)
                except ValueError as e:  # objects (pickles refused), strings, a damaged header
                    raise UsageError(f"{q} does not hold numeric vectors: {e}") from None
                v = v.reshape(-1, v.shape[-1]) if v.ndim > 1 else v.reshape(1, -1)
                if v.shape[1] != self.xb.shape[1]:
                    raise UsageError(f"{q}: vectors of dim {v.shape[1]}, the store's are {self.xb.shape[1]}")
                vecs.append(v)
                labels.extend([f"{q}[{i}]" for i in range(len(v))])
                rows.extend([None] * len(v))
                continue
            row = None
            if bbox is None:
                try:
                    row = self.row(q)
                except UsageError:
                    row = None
            if row is not None:
                vecs.append(self.xb[row: row + 1])
                labels.append(self.paths[row])
                rows.append(row)
                continue
            if not Path(q).is_file():
                raise UsageError(f"query {q!r} is not an image file, a .npy file, or a path/id in the store")
            vecs.append(self.embed_images([q], [bbox]))
            labels.append(q + (f" [{','.join(str(v) for v in bbox)}]" if bbox else ""))
            rows.append(None)
        return np.ascontiguousarray(np.concatenate(vecs), dtype=np.float32), labels, rows


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    if not text:
        return None
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--bbox {text!r}: give x1,y1,x2,y2 in pixels") from None
    if len(vals) != 4 or vals[2] <= vals[0] or vals[3] <= vals[1]:
        raise UsageError(f"--bbox {text!r}: give x1,y1,x2,y2 with x2 > x1 and y2 > y1")
    return vals  # type: ignore[return-value]
