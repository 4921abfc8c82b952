"""The ``caffe:`` model source: ``caffe:DEPLOY.prototxt@WEIGHTS.caffemodel[?options]``.

The spec is split on the *last* ``@`` (so paths may contain ``@``); ``@random``
builds the architecture with random weights. Options come as keyword arguments of
:func:`deepfeat.models.load_model` or in the spec after ``?`` (``&``-separated
``key=value``, handy on the command line), keywords winning:

``mean``
    per-channel values in the network's channel order (``104,117,123``), one value
    for all channels, ``none``, or a ``.binaryproto``/``.npy`` mean image (C x H x W,
    centre-cropped to the input as Caffe's ``mean_file`` is). ``mean_file`` is a
    synonym.
``channel_order``
    ``BGR`` (default for 3 channels: Caffe models were fed OpenCV images), ``RGB``
    or ``L`` (default for 1 channel).
``raw_scale``
    what a white pixel is worth before mean subtraction (default 255: pixels 0..255).
``input_scale`` (or ``scale``)
    multiplier after mean subtraction (Caffe's ``transform_param.scale``; e.g.
    0.00390625 for LeNet). Default: the training data layer's value if the caffemodel
    records one, else 1.
``input_size``
    ``HxW`` or ``S``: run the net at another input size than the deploy file's.
``resize``
    the square size images are warped to before the centre crop of the input size
    (default 256 for ImageNet-size inputs, i.e. the classic 256 -> 227/224 flow;
    the input size itself, no crop, for small nets such as CIFAR/MNIST ones).
``interpolation``
    resize filter (default ``bilinear``, as Caffe's ``cv::resize``/``caffe.io``).
``output``
    the blob ``forward`` returns (default: the net's last output blob).
``labels``
    a labels file (one per line; ``synset_words.txt`` works).
``stages``
    comma-separated NetState stages for ``include { stage: ... }`` rules.
``seed``
    seed of ``@random`` weights.

Without a ``mean``, the mean comes from the caffemodel's training data layer
(``transform_param.mean_value``, or its ``mean_file`` if that file sits next to the
weights or prototxt); failing that, 3-channel nets with an ImageNet-size input
(at least 200 px) get the ILSVRC-2012 mean (B, G, R = 104.01, 116.67, 122.68),
and other nets no mean. What was decided, and why, is recorded in the model's meta
(``caffe.preprocessing``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from deepfeat.data.preprocess import INTERPOLATIONS, DataConfig
from deepfeat.errors import FormatError, ModelError, UsageError, suggest
from deepfeat.models.base import Model, file_sha256
from deepfeat.models.caffe.layers import InnerProduct
from deepfeat.models.caffe.net import CaffeNet, build_net, init_random
from deepfeat.models.caffe.netdef import NetDef, read_netdef
from deepfeat.models.caffe.wire import CaffeModelFile, read_blobproto, read_caffemodel
from deepfeat.models.labels import default_labels, read_labels
from deepfeat.models.options import parse_number, parse_query, parse_size
from deepfeat.models.source import ModelSource

log = logging.getLogger(__name__)

#: Per-channel means of BVLC's ``ilsvrc_2012_mean.npy``, in B, G, R order.
ILSVRC_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)

OPTIONS = ("mean", "mean_file", "channel_order", "raw_scale", "input_scale", "scale", "input_size", "resize",
           "interpolation", "output", "labels", "stages", "seed")


def read_mean(path: str | os.PathLike) -> np.ndarray:
    """A mean image from a ``.binaryproto`` (Caffe's ``compute_image_mean`` output) or a
    ``.npy`` file, as float32 ``C x H x W`` (a 1-D ``.npy`` gives per-channel values)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"mean file not found: {path}")
    if path.lower().endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise FormatError(f"{path}: not a readable .npy array ({e})") from None
    else:
        arr = read_blobproto(path)
    arr = np.array(arr, dtype=np.float32)  # a writable copy (the reader's arrays view the file's bytes)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim not in (1, 3):
        raise FormatError(f"{path}: a mean must be C x H x W (or per-channel values), got shape {arr.shape}")
    return np.ascontiguousarray(arr)


# ---------------------------------------------------------------------------
# Spec and options
# ---------------------------------------------------------------------------


def split_caffe_spec(rest: str, spec: str) -> tuple[str, str, dict[str, str]]:
    """``DEPLOY@WEIGHTS?k=v&...`` -> (deploy, weights, options).

    The split is at the last '@' whose two sides are existing files (so paths may
    contain '@'), failing that at the last '@' after an existing prototxt, or the last '@'.
    """
    at = rest.rfind("@")
    q = rest.find("?", at + 1 if at >= 0 else 0)
    body, query = (rest[:q], rest[q + 1:]) if q >= 0 else (rest, "")
    ats = [j for j in range(len(body) - 1, -1, -1) if body[j] == "@"]
    at = next((i for i in ats if os.path.isfile(body[:i]) and
               (body[i + 1:] == "random" or os.path.isfile(body[i + 1:]))), -1)
    if at < 0:  # the weights are missing: at least find the prototxt, for a precise error
        at = next((i for i in ats if os.path.isfile(body[:i])), ats[0] if ats else -1)
    if at < 0 or not body[at + 1:]:
        raise ModelError(
            f"model spec {spec!r} needs the weights after '@': caffe:DEPLOY.prototxt@WEIGHTS.caffemodel "
            "(or @random for untrained weights)"
        )
    deploy, weights = body[:at], body[at + 1:]
    if not deploy:
        raise UsageError(f"model spec {spec!r} names no prototxt; e.g. caffe:deploy.prototxt@weights.caffemodel")
    opts = parse_query(query, spec)
    return deploy, weights, opts




def _mean_option(v: Any, channels: int, base_dirs: list[str]) -> tuple[tuple[float, ...], np.ndarray | None, str]:
    """-> (per-channel mean, mean image or None, description)."""
    if isinstance(v, np.ndarray):
        arr = np.asarray(v, dtype=np.float32)
        if arr.ndim == 3:
            return _mean_image(arr, channels, "the given mean image")
        v = arr.reshape(-1).tolist()
    if isinstance(v, (str, os.PathLike)):
        s = os.fspath(v).strip()
        if s.lower() in ("", "none", "no", "0"):
            return (0.0,) * channels, None, "no mean (mean=none)"
        looks_like_file = s.lower().endswith((".binaryproto", ".npy", ".proto")) or os.sep in s
        if looks_like_file or os.path.isfile(s):
            path = s if os.path.isabs(s) or os.path.isfile(s) else next(
                (os.path.join(d, s) for d in base_dirs if os.path.isfile(os.path.join(d, s))), s)
            arr = read_mean(path)
            if arr.ndim == 1:
                return _per_channel(arr.tolist(), channels, f"mean values from {path}")
            return _mean_image(arr, channels, f"mean image {path}")
        try:
            vals = [float(x) for x in s.replace(";", ",").split(",")]
        except ValueError:
            raise UsageError(f"mean {s!r} is neither numbers (e.g. 104,117,123) nor a .binaryproto/.npy file") from None
        return _per_channel(vals, channels, f"mean {s}")
    if isinstance(v, (int, float)):
        return _per_channel([float(v)], channels, f"mean {v}")
    try:
        vals = [float(x) for x in v]
    except (TypeError, ValueError):
        raise UsageError(f"mean must be numbers, a file or 'none', not {v!r}") from None
    return _per_channel(vals, channels, f"mean {vals}")


def _per_channel(vals: list[float], channels: int, what: str) -> tuple[tuple[float, ...], None, str]:
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise UsageError(f"{what}: {len(vals)} values for a {channels}-channel input (give 1 or {channels})")
    return tuple(float(x) for x in vals), None, what


def _mean_image(arr: np.ndarray, channels: int, what: str) -> tuple[tuple[float, ...], np.ndarray, str]:
    if arr.shape[0] != channels:
        raise UsageError(f"{what} has {arr.shape[0]} channels but the net's input has {channels}")
    return tuple(float(x) for x in arr.mean(axis=(1, 2))), arr, f"{what} ({'x'.join(map(str, arr.shape))})"


def _training_transform(weights: CaffeModelFile | None) -> dict[str, Any]:
    """transform_param of the caffemodel's data layer (TEST phase preferred)."""
    if weights is None:
        return {}
    found = [(l.phases, l.transform) for l in weights.layers if l.transform]
    for phases, t in found:
        if 1 in phases:
            return dict(t)  # type: ignore[arg-type]
    return dict(found[0][1]) if found else {}  # type: ignore[arg-type]


def data_config(netdef: NetDef, net: CaffeNet, weights: CaffeModelFile | None, opts: dict[str, Any],
                base_dirs: list[str]) -> tuple[DataConfig, list[str]]:
    """The preprocessing for a Caffe net, and notes on where each part came from."""
    shape = net.blob_shapes[net.input_blobs[0]]
    if len(shape) != 4:
        raise ModelError(f"the net's input '{net.input_blobs[0]}' is {len(shape)}-D; deepfeat feeds images "
                         "as N x C x H x W")
    _, c, h, w = shape
    if c not in (1, 3):
        raise ModelError(f"the net's input '{net.input_blobs[0]}' has {c} channels; images have 1 or 3 "
                         "(use deepfeat.models.caffe.load_caffe_net to run it on your own tensors)")
    notes: list[str] = []
    order = str(opts.get("channel_order") or ("L" if c == 1 else "BGR")).upper()
    if order not in ("RGB", "BGR", "L"):
        raise UsageError(f"channel_order must be RGB, BGR or L, not {order!r}")
    if (order == "L") != (c == 1):
        raise UsageError(f"channel_order {order} does not fit the net's {c}-channel input")
    raw_scale = parse_number(opts["raw_scale"], "raw_scale", positive=True) if opts.get("raw_scale") is not None else 255.0
    trained = _training_transform(weights)
    in_scale_opt = opts.get("input_scale", opts.get("scale"))
    if in_scale_opt is not None:
        input_scale = parse_number(in_scale_opt, "input_scale", positive=True)
    elif "scale" in trained:
        input_scale = float(trained["scale"])  # type: ignore[arg-type]
        notes.append(f"input_scale {input_scale:g} from the caffemodel's training data layer")
    else:
        input_scale = 1.0
    imagenet_like = c == 3 and min(h, w) >= 200

    mean_opt = opts.get("mean", opts.get("mean_file"))
    if mean_opt is not None:
        mean, mean_image, what = _mean_option(mean_opt, c, base_dirs)
        notes.append(f"{what} (given)")
    elif trained.get("mean_value"):
        mean, mean_image, what = _per_channel(list(trained["mean_value"]), c,  # type: ignore[arg-type]
                                              "mean_value from the caffemodel's training data layer")
        notes.append(what)
    else:
        mean, mean_image = (0.0,) * c, None
        mean_file = trained.get("mean_file")
        found = None
        if mean_file:
            name = os.path.basename(str(mean_file))
            found = next((os.path.join(d, name) for d in base_dirs if os.path.isfile(os.path.join(d, name))), None)
        if found:
            mean, mean_image, what = _mean_option(found, c, base_dirs)
            notes.append(f"{what}, found next to the model for the training mean_file {mean_file!r}")
        elif imagenet_like:
            mean = ILSVRC_MEAN_BGR if order == "BGR" else ILSVRC_MEAN_BGR[::-1]
            notes.append("ILSVRC-2012 per-channel mean (default for ImageNet-size Caffe models; pass mean= to change)"
                         + (f"; the training mean_file {mean_file!r} was not found" if mean_file else ""))
        else:
            notes.append("no mean subtracted" + (
                f": the training mean_file {mean_file!r} was not found next to the model; pass mean=..."
                if mean_file else " (none given or recorded in the caffemodel)"))
            if mean_file:
                log.warning("caffe model trained with mean_file %r, which was not found next to the weights or "
                            "prototxt: no mean is subtracted; pass mean=... (values or the file)", mean_file)

    if opts.get("resize") is not None:
        rh, rw = parse_size(opts["resize"], "resize")
        if rh != rw:
            raise UsageError("resize takes one size S (images are warped to S x S before the centre crop)")
        if rh < max(h, w):
            raise UsageError(f"resize {rh} is smaller than the input {h}x{w}")
        crop_pct = max(h, w) / rh if h == w else 1.0
    elif imagenet_like and h == w and h <= 256:
        crop_pct = h / 256.0
    else:
        crop_pct = 1.0
    interp = str(opts.get("interpolation") or "bilinear").lower()
    if interp not in INTERPOLATIONS:
        raise UsageError(f"interpolation {interp!r} unknown; choose from {', '.join(INTERPOLATIONS)}")
    fixed = any(isinstance(m, InnerProduct) and len(m.in_shape) > 1 for m in net.modules())
    cfg = DataConfig(
        input_size=(h, w), mean=tuple(mean), std=(1.0 / input_scale,) * c, scale=raw_scale / 255.0,
        channel_order=order, interpolation=interp, crop_pct=crop_pct, resize_mode="warp",
        fixed_input_size=fixed, mean_image=mean_image,
    )
    return cfg, notes


def _num_classes(net: CaffeNet) -> int | None:
    dims = [d for d in net.blob_shapes[net.output_blob][1:]]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return int(dims[0]) if len(dims) == 1 else None


def load_caffe_net(deploy: str | os.PathLike, weights: str | os.PathLike | None = None, *,
                   input_size: Any = None, output: str | None = None, stages: Any = (),
                   seed: int | None = None) -> CaffeNet:
    """Just the network (a :class:`CaffeNet` module), without deepfeat's preprocessing.

    *weights* None or ``"random"`` gives random weights (seeded by *seed*).
    """
    netdef = read_netdef(deploy, stages=_stages(stages))
    wf = None if weights is None or os.fspath(weights) == "random" else read_caffemodel(weights)
    net = build_net(netdef, wf, input_shapes=_input_shapes(netdef, input_size), output=output)
    if wf is None:
        init_random(net, 0 if seed is None else int(seed))
    return net


def _stages(v: Any) -> tuple[str, ...]:
    if not v:
        return ()
    if isinstance(v, str):
        return tuple(s.strip() for s in v.split(",") if s.strip())
    return tuple(str(s) for s in v)


def _input_shapes(netdef: NetDef, input_size: Any) -> dict[str, tuple[int, ...]] | None:
    if input_size is None:
        return None
    first = netdef.inputs[0] if netdef.inputs else None
    if first is None:
        return None
    h, w = parse_size(input_size, "input_size")
    shape = first.shape
    if shape is None:
        return {first.blob: (1, 3, h, w)}
    if len(shape) != 4:
        raise UsageError(f"input_size needs a 4-D input; '{first.blob}' is {len(shape)}-D")
    return {first.blob: (shape[0], shape[1], h, w)}


def load_caffe(deploy: str | os.PathLike, weights: str | os.PathLike, *, spec: str | None = None,
               **options: Any) -> Model:
    """A deepfeat :class:`Model` from a deploy prototxt and a caffemodel (or ``"random"``);
    *options* as in the module docstring."""
    unknown = set(options) - set(OPTIONS)
    if unknown:
        bad = min(unknown)
        raise UsageError(f"unknown caffe option {bad!r}.{suggest(bad, OPTIONS)} Options: {', '.join(OPTIONS)}")
    deploy, weights = os.fspath(deploy), os.fspath(weights)
    if not os.path.isfile(deploy):
        raise ModelError(f"prototxt not found: {deploy}")
    random_weights = weights == "random"
    if not random_weights and not os.path.isfile(weights):
        raise ModelError(f"caffemodel not found: {weights}")
    netdef = read_netdef(deploy, stages=_stages(options.get("stages")))
    wf = None if random_weights else read_caffemodel(weights)
    net = build_net(netdef, wf, input_shapes=_input_shapes(netdef, options.get("input_size")),
                    output=options.get("output") or None)
    if random_weights:
        init_random(net, int(options.get("seed") or 0))
    base_dirs = [d for d in {os.path.dirname(os.path.abspath(weights)) if not random_weights else "",
                             os.path.dirname(os.path.abspath(deploy))} if d]
    cfg, notes = data_config(netdef, net, wf, options, sorted(base_dirs))
    n_classes = _num_classes(net)
    labels = None
    if options.get("labels"):
        labels = read_labels(str(options["labels"]))
        if n_classes is not None and len(labels) != n_classes:
            raise UsageError(f"labels file has {len(labels)} labels but the model has {n_classes} outputs")
    elif n_classes is not None:
        labels = default_labels(n_classes)
    probs = net.output_layer is not None and net.layer_types[net.output_layer] == "Softmax"
    meta = {
        "num_classes": n_classes,
        "caffe": {
            "prototxt": os.path.basename(deploy),
            "prototxt_sha256": file_sha256(deploy),
            "prototxt_format": netdef.format,
            "weights_format": wf.format if wf is not None else None,
            "net_name": netdef.name,
            "input_blob": net.input_blobs[0],
            "input_shape": list(net.blob_shapes[net.input_blobs[0]][1:]),
            "output_blob": net.output_blob,
            "preprocessing": notes,
        },
    }
    return Model(
        spec=spec or f"caffe:{deploy}@{weights}",
        source="caffe",
        arch=netdef.name or os.path.splitext(os.path.basename(deploy))[0],
        net=net,
        data_config=cfg,
        labels=labels,
        weights_path=None if random_weights else weights,
        weights_sha256=None if random_weights else file_sha256(weights),
        classifier=net.classifier_module(),
        output_kind="probs" if probs else "logits",
        extra_meta=meta,
        layer_aliases=dict(net.layer_aliases),
    )


def _load(rest: str, spec: str, **options: Any) -> Model:
    deploy, weights, query = split_caffe_spec(rest, spec)
    return load_caffe(deploy, weights, spec=spec, **{**query, **options})


def _ready() -> list[str]:
    return []


SOURCE = ModelSource(
    name="caffe",
    prefix="caffe",
    example="caffe:deploy.prototxt@weights.caffemodel",
    description="Caffe deploy.prototxt + .caffemodel (current and V1 formats), run in PyTorch without Caffe",
    load=_load,
    ready=_ready,
)
