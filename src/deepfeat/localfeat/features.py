"""Local features for spatial verification: keypoints with descriptors, per image.

Four extractors, chosen by a spec ``NAME[:key=value,...]``:

* ``cnn`` (default): dense CNN keypoints from a tapped feature map of the store's own
  model, DELF-style without the attention network (Noh et al., ICCV 2017): the
  keypoints are the local maxima (3 x 3) of the L2 norm of an intermediate layer's
  activations, strongest first; the descriptor of a keypoint is its L2-normalised
  activation vector. A feature-map cell ``(i, j)`` is mapped back to image pixels
  through the layer's stride: its centre ``((j + 0.5) * W_in / w, (i + 0.5) * H_in / h)``
  (the centre of the cell's receptive field for 'same'-padded convolutions), then to
  the original image's pixels. Options: ``layer`` (default: the last layer at stride
  16, e.g. ``blocks.4`` of EfficientNet-Lite0), ``scales`` (image scales, a list of
  :mod:`deepfeat.specs` joined by ``/``, e.g. ``1/0.707``, keypoints of all scales pooled), ``max`` (keypoints kept,
  default 500), ``size`` (the image's longer side in pixels before extraction,
  default 640).
* ``sift``: OpenCV SIFT (Lowe 2004) with RootSIFT descriptors (Arandjelovic &
  Zisserman 2012), so they compare by cosine like the CNN ones. ``max`` (default
  1000), ``size`` (default 640).
* ``orb``: OpenCV ORB binary descriptors (compared by Hamming distance). ``max``
  (default 1000), ``size`` (default 640).
* ``regions``: not keypoints but the regional descriptors of regional diffusion
  (Iscen et al., CVPR 2017; :mod:`deepfeat.rerank.regional`): the R-MAC grid of a
  tapped feature map (Tolias et al., ICLR 2016; :func:`deepfeat.pooling.rmac_regions`),
  every region pooled (``pool=mac|gem``, GeM with p = 3) and L2-normalised, kept one
  vector per region. Each region's box (``boxes``, x1, y1, x2, y2 in original pixels)
  is stored with it; ``xy`` is the box centre and ``sizes`` its side. Options:
  ``layer`` (default: the store's descriptor layer), ``L`` (grid levels, default 3: about
  20 regions for a 4:3 image), ``pool``, ``size`` (default 640), ``scales`` (each scale
  adds its own grid).

Keypoint coordinates are always in pixels of the original image (after EXIF
orientation), so a query region ``x1,y1,x2,y2`` in those pixels restricts them
directly (:meth:`LocalFeatures.within`). Each keypoint also carries its localisation
scale in original pixels, which sets the RANSAC tolerance of verification: the
layer's stride (cnn), or 4 pixels of the extraction frame (sift/orb, whose keypoints
are localised to about a pixel).

OpenCV comes with the ``[verify]`` extra (``pip install 'deepfeat[verify]'``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, BinaryIO, Sequence

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.specs import Param, SpecKind, format_float_g, register_spec_kind

#: version of the extraction code; recorded in the store section so a change is detected
LOCAL_FEATURES_VERSION = 1

EXTRACTORS = ("cnn", "sift", "orb", "regions")
#: localisation scale of a SIFT/ORB keypoint, in pixels of the extraction frame
OPENCV_TOLERANCE = 4.0
#: region poolings of the ``regions`` extractor
REGION_POOLS = ("mac", "gem")


@dataclass(frozen=True)
class ExtractorKind:
    """A local-feature extractor of the spec registry: its name and parameters."""

    name: str
    params: tuple[Param, ...]


def _max(default: int) -> Param:
    return Param("max", "int", default, "a positive integer", lambda v: v >= 1)


_SIZE = Param("size", "int", 640, "an integer of at least 32", lambda v: v >= 32)
_LAYER = Param("layer", "text", None, "a layer name", shown=False)
_SCALES = Param("scales", "floats", (1.0,), "numbers in (0, 4] joined by '/', e.g. 1/0.707",
                lambda v: len(v) >= 1 and all(0 < s <= 4 for s in v), shown=False)
EXTRACTOR_KINDS: dict[str, ExtractorKind] = {k.name: k for k in (
    ExtractorKind("cnn", (_LAYER, _max(500), _SIZE, _SCALES)),
    ExtractorKind("sift", (_max(1000), _SIZE)),
    ExtractorKind("orb", (_max(1000), _SIZE)),
    ExtractorKind("regions", (_LAYER, Param("L", "int", 3, "an integer from 1 to 8", lambda v: 1 <= v <= 8,
                                            aliases=("levels",)),
                              Param("pool", "choice", "mac", " or ".join(REGION_POOLS), choices=REGION_POOLS),
                              _SIZE, _SCALES)),
)}
_NOT_ONE_OF = "local-feature spec {raw!r}: {arg!r} is not one of {keyed}"
#: local-feature specs: one extractor, key=value parameters
LOCAL_SPECS = SpecKind("local-feature extractor", EXTRACTOR_KINDS, float_format=format_float_g, messages={
    "empty": "empty local-feature spec; choose {names}",
    "unknown_name": "unknown local-feature extractor {name!r}; choose {names}{hint}",
    "unknown_param": _NOT_ONE_OF, "positional": _NOT_ONE_OF,
    "bad_value": "local-feature spec {raw!r}: {key} must be {rule}, got {value!r}",
})


@dataclass(frozen=True)
class LocalSpec:
    """A parsed local-feature spec (see the module docstring)."""

    extractor: str = "cnn"
    max_keypoints: int = 500
    size: int = 640
    layer: str | None = None
    scales: tuple[float, ...] = (1.0,)
    levels: int = 3  # regions: R-MAC grid levels (L)
    pool: str = "mac"  # regions: mac | gem

    @property
    def binary(self) -> bool:
        """Binary descriptors (compared by Hamming distance), as ORB's."""
        return self.extractor == "orb"

    @property
    def regions(self) -> bool:
        """Regional descriptors (for regional diffusion), not keypoints (for verification)."""
        return self.extractor == "regions"

    @property
    def needs_model(self) -> bool:
        """Computed from a layer of the store's model (cnn, regions), not by OpenCV."""
        return self.extractor in ("cnn", "regions")

    def __str__(self) -> str:
        return LOCAL_SPECS.canonical(EXTRACTOR_KINDS[self.extractor], {
            "layer": self.layer, "max": self.max_keypoints, "size": self.size, "scales": tuple(self.scales),
            "L": self.levels, "pool": self.pool})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scales"] = list(self.scales)
        d["spec"] = str(self)
        if not self.regions:
            del d["levels"], d["pool"]
        return d


def parse_local_spec(text: str | LocalSpec | None) -> LocalSpec:
    """``cnn``, ``cnn:layer=blocks.4,max=300,scales=1/0.707``, ``sift:max=2000``, ``orb``,
    ``regions:L=3,pool=gem``... (the grammar of :mod:`deepfeat.specs`)."""
    if isinstance(text, LocalSpec):
        return text
    part = LOCAL_SPECS.parse_part((text or "cnn").strip())
    v = part.params
    return LocalSpec(part.kind.name, v.get("max", 0), v["size"], v.get("layer"), tuple(v.get("scales", (1.0,))),
                     v.get("L", 3), v.get("pool", "mac"))


register_spec_kind("local", LOCAL_SPECS, lambda s: str(parse_local_spec(s)))


@dataclass
class LocalFeatures:
    """Keypoints of one image: ``xy`` (M x 2, original pixels), ``sizes`` (M), ``desc``
    (M x D, float32 unit vectors or uint8 binary), and the image's original (W, H).
    Regional descriptors also carry their ``boxes`` (M x 4: x1, y1, x2, y2, original pixels)."""

    xy: np.ndarray
    sizes: np.ndarray
    desc: np.ndarray
    image_size: tuple[int, int]
    binary: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    boxes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.xy)

    @classmethod
    def empty(cls, dim: int, binary: bool = False, boxes: bool = False) -> "LocalFeatures":
        """No keypoints (an image that could not be read): verifies nothing."""
        return cls(np.zeros((0, 2), np.float32), np.zeros(0, np.float32),
                   np.zeros((0, dim), np.uint8 if binary else np.float32), (0, 0), binary,
                   boxes=np.zeros((0, 4), np.float32) if boxes else None)

    def within(self, bbox: Sequence[float] | None) -> "LocalFeatures":
        """The keypoints inside a region ``(x1, y1, x2, y2)`` of the original image; for
        regional descriptors, the regions with at least half of their area inside it."""
        if bbox is None:
            return self
        x1, y1, x2, y2 = bbox
        if self.boxes is not None:
            b = self.boxes
            iw = np.clip(np.minimum(b[:, 2], x2) - np.maximum(b[:, 0], x1), 0, None)
            ih = np.clip(np.minimum(b[:, 3], y2) - np.maximum(b[:, 1], y1), 0, None)
            m = iw * ih >= 0.5 * (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        else:
            m = (self.xy[:, 0] >= x1) & (self.xy[:, 0] <= x2) & (self.xy[:, 1] >= y1) & (self.xy[:, 1] <= y2)
        return LocalFeatures(self.xy[m], self.sizes[m], self.desc[m], self.image_size, self.binary, self.meta,
                             None if self.boxes is None else self.boxes[m])


def require_cv2():
    try:
        import cv2
    except ImportError:
        raise UsageError("sift/orb local features and spatial verification need OpenCV: "
                         "pip install 'deepfeat[verify]'") from None
    return cv2


def default_cnn_layer(model) -> str:
    """The last top-level-most layer whose output has stride 16 (``blocks.4`` of
    EfficientNet-Lite0, ``layer3`` of a ResNet): fine enough to localise, deep enough
    to describe."""
    from deepfeat.models.taps import model_layer_table

    side = 224
    table = model_layer_table(model, (model.data_config.channels, side, side))
    best: tuple[int, int, str] | None = None
    for order, row in enumerate(table.layers):
        shape = list(row.shape or [])
        if len(shape) != 3 or row.name.endswith(":in") or shape[1] != side // 16:
            continue
        key = (-row.name.count("."), order, row.name)
        if best is None or key > best:
            best = key
    if best is None:
        raise UsageError(f"model {model.spec} has no feature map at stride 16; give cnn:layer=NAME")
    return best[2]


class LocalExtractor:
    """Computes :class:`LocalFeatures` of image files as a :class:`LocalSpec` says.

    *model* is needed for ``cnn`` and ``regions`` (the store's model: its preprocessing and layers)."""

    def __init__(self, spec: str | LocalSpec, model=None):
        self.spec = parse_local_spec(spec)
        self.model = model
        self._taps = None
        self.layer: str | None = None
        if self.spec.needs_model:
            if model is None:
                raise UsageError(f"{self.spec.extractor} local features need the store's model")
            from deepfeat.models.taps import make_taps, resolve_layers

            if self.spec.layer:
                self.layer = self.spec.layer
            elif self.spec.regions:
                from deepfeat.pipeline.network import default_layer

                self.layer = default_layer(model)
            else:
                self.layer = default_cnn_layer(model)
            resolve_layers(model.net, [self.layer], getattr(model, "layer_aliases", None))  # clear error if unknown
            self._taps = make_taps(model, [self.layer])
        else:
            require_cv2()

    def describe(self) -> dict[str, Any]:
        """What the features are, for the store section's meta."""
        d = self.spec.to_dict()
        d["layer"] = self.layer
        d["binary"] = self.spec.binary
        d["version"] = LOCAL_FEATURES_VERSION
        if self.model is not None and self.spec.needs_model:
            d["model"] = self.model.spec
        return d

    def _decode(self, image: str | os.PathLike | BinaryIO, crop: Sequence[float] | None = None):
        from deepfeat.data.images import decode_image
        from deepfeat.data.preprocess import DataConfig, SizePolicy

        cfg = self.model.data_config if self.model is not None else DataConfig()
        if not self.spec.needs_model:
            cfg = DataConfig(interpolation=cfg.interpolation, channel_order="RGB")
        return decode_image(image, SizePolicy("long", self.spec.size), cfg,
                            crop_box=tuple(crop) if crop is not None else None)

    def extract(self, image: str | os.PathLike | BinaryIO, crop: Sequence[float] | None = None) -> LocalFeatures:
        """The features of an image, or of its region *crop* ``(x1, y1, x2, y2)`` cut out
        first (original pixels; the coordinates returned stay in the whole image's pixels)."""
        dec = self._decode(image, crop)
        px = dec.pixels
        x0 = y0 = 0.0
        cw, ch = dec.width, dec.height
        if crop is not None:
            x0, y0 = max(0.0, float(crop[0])), max(0.0, float(crop[1]))
            cw, ch = min(float(dec.width), float(crop[2])) - x0, min(float(dec.height), float(crop[3])) - y0
        fx, fy = cw / px.shape[1], ch / px.shape[0]  # frame -> original pixels
        boxes = None
        if self.spec.regions:
            xy, sizes, desc, boxes = self._regions(px)
            boxes = (boxes * np.array([fx, fy, fx, fy], np.float32) + np.array([x0, y0, x0, y0], np.float32))
        elif self.spec.extractor == "cnn":
            xy, sizes, desc = self._cnn(px)
        else:
            xy, sizes, desc = self._opencv(px)
        xy = xy * np.array([fx, fy], np.float32) + np.array([x0, y0], np.float32)
        sizes = sizes * np.float32((fx + fy) / 2)
        return LocalFeatures(xy.astype(np.float32), sizes.astype(np.float32), desc, (dec.width, dec.height),
                             self.spec.binary, boxes=None if boxes is None else boxes.astype(np.float32))

    def _regions(self, px: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The R-MAC regions of the tapped map at every scale (:func:`deepfeat.pooling.regional_vectors`):
        box centres, sides, unit descriptors and boxes, in frame pixels."""
        import torch

        from deepfeat.pooling import gem, mac, regional_vectors, rescale

        H, W = px.shape[:2]
        pool = mac if self.spec.pool == "mac" else (lambda r: gem(r, 3.0))
        boxes, descs = [], []
        with torch.inference_mode():
            x = self.model.normalize(torch.from_numpy(px)[None].to(self.model.device))
            for s in self.spec.scales:
                a = self._taps(rescale(x, s))[self.layer].float()  # 1 x C x h x w
                vecs, regions = regional_vectors(a, pool, self.spec.levels)
                cx, cy = W / a.shape[3], H / a.shape[2]  # one cell in frame pixels, at any scale
                boxes.append(np.array([(c0 * cx, r0 * cy, c1 * cx, r1 * cy) for r0, c0, r1, c1 in regions],
                                      np.float32).reshape(-1, 4))
                descs.append(vecs[0].cpu().numpy())
        box = np.concatenate(boxes)
        xy = np.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2], 1)
        sizes = np.sqrt((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))
        return xy, sizes, np.ascontiguousarray(np.concatenate(descs), dtype=np.float32), box

    def _cnn(self, px: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import torch
        import torch.nn.functional as F

        from deepfeat.pooling import rescale

        H, W = px.shape[:2]
        xys, sizes, descs, strengths = [], [], [], []
        with torch.inference_mode():
            x = self.model.normalize(torch.from_numpy(px)[None].to(self.model.device))
            for s in self.spec.scales:
                xs = rescale(x, s)
                a = self._taps(xs)[self.layer].float()[0]  # C x h x w
                c, h, w = a.shape
                norm = a.norm(dim=0)
                peak = (F.max_pool2d(norm[None, None], 3, stride=1, padding=1)[0, 0] == norm) & (norm > 0)
                ii, jj = torch.nonzero(peak, as_tuple=True)
                sx, sy = xs.shape[3] / w, xs.shape[2] / h  # stride in the scaled input
                to_frame_x, to_frame_y = W / xs.shape[3], H / xs.shape[2]
                xys.append(torch.stack([(jj.float() + 0.5) * sx * to_frame_x,
                                        (ii.float() + 0.5) * sy * to_frame_y], 1).cpu().numpy())
                sizes.append(np.full(len(ii), (sx * to_frame_x + sy * to_frame_y) / 2, np.float32))
                d = a[:, ii, jj].T
                descs.append(F.normalize(d, dim=1).cpu().numpy())
                strengths.append(norm[ii, jj].cpu().numpy())
        xy, size, desc, st = (np.concatenate(v) for v in (xys, sizes, descs, strengths))
        keep = np.argsort(-st, kind="stable")[: self.spec.max_keypoints]
        return xy[keep], size[keep], np.ascontiguousarray(desc[keep], dtype=np.float32)

    def _opencv(self, px: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cv2 = require_cv2()
        gray = cv2.cvtColor(px, cv2.COLOR_RGB2GRAY) if px.shape[2] == 3 else px[:, :, 0]
        if self.spec.extractor == "sift":
            det = cv2.SIFT_create(nfeatures=self.spec.max_keypoints)
        else:
            det = cv2.ORB_create(nfeatures=self.spec.max_keypoints)
        kps, desc = det.detectAndCompute(gray, None)
        n = len(kps)
        if self.spec.extractor == "sift":
            dim = 128
        else:
            dim = 32
        if desc is None or n == 0:
            dtype = np.uint8 if self.spec.binary else np.float32
            return np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros((0, dim), dtype)
        # strongest first (SIFT/ORB return them in detection order), capped
        resp = np.array([k.response for k in kps], np.float32)
        keep = np.argsort(-resp, kind="stable")[: self.spec.max_keypoints]
        xy = np.array([kps[i].pt for i in keep], np.float32).reshape(-1, 2)
        sizes = np.full(len(keep), OPENCV_TOLERANCE, np.float32)
        desc = desc[keep]
        if self.spec.extractor == "sift":  # RootSIFT: L1-normalise, square root -> unit L2 norm
            desc = desc.astype(np.float32)
            desc /= np.maximum(desc.sum(1, keepdims=True), 1e-12)
            desc = np.sqrt(desc)
        return xy, sizes, np.ascontiguousarray(desc)


def descriptor_dim(extractor: LocalExtractor) -> int:
    """The descriptor dimension an extractor produces (probed for cnn layers)."""
    spec = extractor.spec
    if spec.extractor == "sift":
        return 128
    if spec.extractor == "orb":
        return 32
    from deepfeat.models.taps import model_layer_table

    cfg = extractor.model.data_config
    table = model_layer_table(extractor.model, (cfg.channels, 224, 224))
    for row in table.layers:
        if row.name == extractor.layer:
            return int(row.shape[0])
    raise UsageError(f"layer {extractor.layer!r} not found in {extractor.model.spec}")
