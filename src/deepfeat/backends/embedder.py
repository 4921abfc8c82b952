"""New images described exactly as a store's were: the descriptor recipe of a store's ``meta.json``
(model and weights hash, layers, pooling, scales, size policy, draft decoding, post-processing) and
:class:`Embedder`, which makes descriptors by it. Search queries, a classifier's inputs and any
other artefact made from a store use this one path."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from deepfeat.errors import DeepfeatError, StoreError

#: the keys of a store's meta.json that say how a descriptor is made
RECIPE_KEYS = ("layers", "pooling", "post", "size", "scales", "scale_combine", "draft_decode")
#: fitted parts of a recipe that live in files beside meta.json
RECIPE_FILES = ("post.npz", "pooling.npz")


def descriptor_recipe(meta: dict[str, Any], feature: str) -> dict[str, Any]:
    """The part of a store's *meta* that makes its *feature* descriptors, for an artefact to carry."""
    recipe = {k: meta[k] for k in RECIPE_KEYS if k in meta}
    recipe["model"] = {k: meta["model"][k] for k in ("spec", "weights_sha256") if k in meta["model"]}
    recipe["feature"] = feature
    recipe["dim"] = int(meta["features"][feature]["dim"]) if "features" in meta else None
    return recipe


def copy_recipe_files(store_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy the fitted post-processing and pooling files of a store (if any) into *out_dir*, for an
    artefact that carries the store's recipe."""
    copied = []
    for name in RECIPE_FILES:
        src = Path(store_dir) / name
        if src.is_file():
            shutil.copyfile(src, Path(out_dir) / name)
            copied.append(name)
    return copied


class Embedder:
    """Descriptors of images made by a *recipe* (:func:`descriptor_recipe`, or a store's meta with a
    ``feature`` key) whose fitted files (``post.npz``, ``pooling.npz``) lie in *folder*. The model is
    loaded on first use, and its weights are checked against the recipe's hash.

    *graph_cache*: on the CPU, embed with the descriptor graph an extraction of the same recipe
    left in the graph cache (:mod:`deepfeat.pipeline.prepared_net`: ONNX Runtime, the store's own
    backend by default, and no PyTorch loaded) when there is one; else, as without it, the model
    in eager PyTorch."""

    def __init__(self, recipe: dict[str, Any], folder: str | os.PathLike, device: str = "cpu",
                 graph_cache: bool = False):
        self.recipe = recipe
        self.folder = Path(folder)
        self.device = device
        self.graph_cache = graph_cache
        self._model = None
        self._net = None
        self._net_codebook: str | None = None  # sha256 of the pooling.npz the network was built with
        self._post = None
        self._graph: Any = None  # the prepared runner; False: looked for, none

    @property
    def model(self):
        if self._model is None:
            from deepfeat.models import load_model

            spec = self.recipe["model"]["spec"]
            model = load_model(spec, device=self.device)
            sha = self.recipe["model"].get("weights_sha256")
            if sha and model.weights_sha256 and sha != model.weights_sha256:
                raise StoreError(f"the weights of {spec} changed since the store was made "
                                 f"(sha256 {model.weights_sha256[:12]} vs {sha[:12]})")
            self._model = model
        return self._model

    @property
    def graph(self):
        """The prepared descriptor graph of this recipe (a runner), or None: see the class."""
        if self._graph is None:
            self._graph = False
            if self.graph_cache and not (self.folder / "pooling.npz").is_file():
                from deepfeat.backends.export_cache import open_cache
                from deepfeat.backends.prepared import cpu_only, load, open_runner, resolved_key

                if cpu_only(self.device):
                    entry = load(open_cache(True), resolved_key(self.recipe["model"]["spec"], self.recipe))
                    sha = self.recipe["model"].get("weights_sha256")
                    if entry is not None and (not sha or entry.model.get("weights_sha256") == sha):
                        self._graph = open_runner(entry) or False
        return self._graph or None

    def data_config(self):
        """How images are prepared for the network (the prepared graph's record, else the model's)."""
        graph = self.graph
        return graph.entry.config() if graph is not None else self.model.data_config

    @property
    def feature_net(self):
        """The descriptor network of the recipe: layers, pooling (and its codebook), scales."""
        if self._net is None:
            from deepfeat.backends.featurenet import FeatureNet
            from deepfeat.pooling import get_pooling, load_pooling

            codebook = self.folder / "pooling.npz"
            self._net_codebook = self._codebook_digest()
            pooling = load_pooling(codebook) if codebook.is_file() else get_pooling(self.recipe["pooling"])
            self._net = FeatureNet(self.model, self.recipe["layers"], pooling,
                                   tuple(self.recipe.get("scales", [1.0])),
                                   self.recipe.get("scale_combine", "sum")).eval()
        return self._net

    def adopt(self, other: Embedder) -> bool:
        """Take the model *other* has loaded when both make the same network descriptors (the same
        recipe but for the post-processing, applied after the network; the same device), and its
        descriptor network too when the pooling codebook (``pooling.npz``) is the one it was built
        with. False (nothing taken) when the recipes differ."""
        mine = {k: v for k, v in self.recipe.items() if k not in ("post", "dim")}
        theirs = {k: v for k, v in other.recipe.items() if k not in ("post", "dim")}
        if mine != theirs or self.device != other.device:
            return False
        self._model = other._model
        if self.graph_cache == other.graph_cache:  # the prepared graph of the same recipe
            self._graph = other._graph
        if other._net is not None and other._net_codebook == self._codebook_digest():
            self._net, self._net_codebook = other._net, other._net_codebook
        return True

    def _codebook_digest(self) -> str | None:
        p = self.folder / "pooling.npz"
        return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None

    @property
    def post(self):
        """The fitted post-processing chain (``post.npz``) or the recipe's unfitted one."""
        if self._post is None:
            from deepfeat.postprocess import PostChain

            fitted = self.folder / "post.npz"
            self._post = PostChain.load(fitted) if fitted.is_file() else PostChain.parse(self.recipe.get("post", "none"))
        return self._post

    def decode(self, image: str | os.PathLike | BinaryIO, bbox: Sequence[float] | None = None,
               max_pixels: int | None = None) -> np.ndarray:
        """Pixels of *image* (cut to *bbox* first) decoded as the store's were, through the
        pixel and aspect guards of :func:`~deepfeat.data.images.check_decode` (at most
        *max_pixels*; None: the decoder's default limit)."""
        from deepfeat.data.images import DEFAULT_MAX_PIXELS, decode_image
        from deepfeat.data.preprocess import parse_size_policy

        policy = parse_size_policy(self.recipe.get("size", "model"))
        return decode_image(image, policy, self.data_config(), crop_box=tuple(bbox) if bbox else None,
                            draft=self.recipe.get("draft_decode", True),
                            max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels).pixels

    def embed_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Post-processed descriptors (N x D float32) of decoded images, one forward pass each
        (images of aspect-preserving size policies differ in size)."""
        layer_i = self.recipe["layers"].index(self.recipe["feature"])
        out = []
        graph = self.graph
        for px in pixels:
            if graph is not None:
                out.append(np.asarray(graph(px[None])[layer_i], np.float32).reshape(1, -1))
                continue
            import torch

            with torch.inference_mode():
                v = self.feature_net(torch.from_numpy(px)[None].to(self.model.device))[layer_i]
            out.append(v.float().cpu().numpy().reshape(1, -1))
        if not out:
            return np.zeros((0, self.recipe.get("dim") or 0), np.float32)
        x = np.concatenate(out).astype(np.float32)
        return np.ascontiguousarray(self.post.apply(x), dtype=np.float32)

    def embed_images(self, images: Sequence[str | os.PathLike | BinaryIO],
                     bboxes: Sequence[Sequence[float] | None] | None = None) -> np.ndarray:
        """Descriptors of image files (or file objects), each optionally cropped to a box."""
        bboxes = bboxes or [None] * len(images)
        return self.embed_pixels([self.decode(im, bb) for im, bb in zip(images, bboxes)])

    def embed_files(self, paths: Sequence[str]) -> tuple[np.ndarray, list[str | None]]:
        """Descriptors of the files that decode, and per path an error message (None when it worked);
        row i of the array is the i-th path without an error."""
        pixels, errors = [], []
        for p in paths:
            try:
                pixels.append(self.decode(p))
                errors.append(None)
            except DeepfeatError as e:
                errors.append(str(e))
            except Exception as e:  # noqa: BLE001 - any other decoder failure is this image's problem only
                errors.append(f"{type(e).__name__}: {e}")
        return self.embed_pixels(pixels), errors
