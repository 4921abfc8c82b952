"""The ``onnx:`` model source: :func:`load_onnx` turns an ONNX file and its options into a
deepfeat :class:`~deepfeat.models.base.Model` (the image input and its layout, the
preprocessing, the classifier output and its labels, the default tap layer, the meta),
and registers itself as the ``onnx`` source."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from deepfeat.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, DataConfig
from deepfeat.errors import ModelError, UsageError, suggest
from deepfeat.models.base import Model, file_sha256
from deepfeat.models.labels import imagenet_labels, read_labels
from deepfeat.models.onnx_models.graph import OnnxGraph
from deepfeat.models.onnx_models.net import OnnxNet, OnnxTaps
from deepfeat.models.onnx_models.options import (
    DEFAULT_CROP_PCT,
    DEFAULT_INTERPOLATION,
    DEFAULT_SIZE,
    OPTIONS,
    _choice,
    _values,
    split_onnx_spec,
)
from deepfeat.models.onnx_models.proto import LAYOUTS, _dims, _read_proto, _require_onnx, detect_layout
from deepfeat.models.options import parse_number, parse_size
from deepfeat.models.source import ModelSource

_GENERIC_GRAPH_NAMES = frozenset({"", "main_graph", "torch_jit", "torch-jit-export", "tf2onnx", "graph"})


def _num_classes(dims: list[Any] | None) -> int | None:
    if not dims or len(dims) < 2:
        return None
    rest = [d for d in dims[1:] if d != 1]
    return rest[0] if len(rest) == 1 and isinstance(rest[0], int) and rest[0] > 1 else None


def _default_layer(graph: OnnxGraph, output: str) -> str | None:
    """The last spatial feature map the output is computed from (the usual retrieval layer)."""
    best = None
    for name in graph.ancestors(output):
        if name not in graph.dependent or name == graph.input_name or graph.rank(name) != 4:
            continue
        dims = graph.shapes.get(name) or []
        spatial = [dims[1], dims[2]] if graph.transposed(name) else [dims[2], dims[3]]
        if all(d == 1 for d in spatial):
            continue  # a globally pooled map
        best = name
    return best


def load_onnx(path: str | os.PathLike, *, spec: str | None = None, **options: Any) -> Model:
    """A deepfeat :class:`Model` from an ONNX file; *options* as in :mod:`deepfeat.models.onnx_models`."""
    onnx, _ = _require_onnx()
    unknown = set(options) - set(OPTIONS)
    if unknown:
        bad = min(unknown)
        raise UsageError(f"unknown onnx option {bad!r}.{suggest(bad, OPTIONS)} Options: {', '.join(OPTIONS)}")
    opts = {k: v for k, v in options.items() if v is not None and v != ""}
    path = os.fspath(path)
    proto = _read_proto(path)
    sha = file_sha256(path)
    notes: list[str] = []

    graph, dims = _open_graph(path, proto, sha, opts, notes)
    elem_dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.input_elem)
    if elem_dtype not in (np.float32, np.float16, np.float64, np.uint8):
        raise ModelError(f"{path}: the input {graph.input_name!r} is {elem_dtype}; deepfeat feeds float or uint8 images")
    sb, sc, sh, sw = graph.static_dims()
    if sc is not None and sc not in (1, 3):
        raise ModelError(f"{path}: the input {graph.input_name!r} has {sc} channels in the {graph.layout} layout; "
                         "images have 1 or 3 (pass layout= if the layout was detected wrongly)")
    cfg = _data_config(path, opts, elem_dtype, sc, sh, sw, notes)
    output, kind, n_classes = _classifier_output(path, graph, opts, notes)
    labels = _labels(path, opts, n_classes, notes)
    meta = _meta(path, proto, graph, dims, elem_dtype, sb, output, n_classes, notes)
    stem = os.path.splitext(os.path.basename(path))[0]
    net = OnnxNet(graph, output)
    g = proto.graph
    return Model(
        spec=spec or f"onnx:{path}",
        source="onnx",
        arch=stem if g.name in _GENERIC_GRAPH_NAMES else g.name,
        net=net,
        data_config=cfg,
        labels=labels,
        weights_path=path,
        weights_sha256=sha,
        classifier=None,
        output_kind=kind,
        extra_meta=meta,
        tapper=functools.partial(OnnxTaps, graph, output=output),
        layer_lister=functools.partial(graph.layer_table, output=output),
        exportable=False,
    )


def _open_graph(path: str, proto, sha: str, opts: dict[str, Any], notes: list[str]
                ) -> tuple[OnnxGraph, list[int | str | None] | None]:
    """The image input (which must be 4-D) and its layout, the tap layout and threads
    options, and the analysed :class:`OnnxGraph`; also the input's dims (None: no shape)."""
    g = proto.graph
    inits = {t.name for t in g.initializer}
    real = [v for v in g.input if v.name not in inits]
    dims = _dims(real[0]) if len(real) == 1 else None
    if dims is not None and len(dims) != 4:
        raise ModelError(f"{path}: the input {real[0].name!r} has shape {dims}; deepfeat runs image models whose "
                         "input is 4-D (N x C x H x W or N x H x W x C)")
    if "layout" in opts:
        layout = _choice(opts["layout"], "layout", LAYOUTS)
        notes.append(f"layout {layout} (given)")
    elif dims is not None:
        layout, how = detect_layout(dims)
        notes.append(f"layout {layout} {how}")
    else:
        layout = "NCHW"
        notes.append("layout NCHW assumed (the input has no shape; pass layout= to change)")
    tap_layout = _choice(opts.get("tap_layout", "auto"), "tap_layout", ("AUTO",) + LAYOUTS)
    tap_layout = "auto" if tap_layout == "AUTO" else tap_layout
    threads = None
    if "threads" in opts:
        try:
            threads = int(opts["threads"])
            if threads < 0:
                raise ValueError
        except (TypeError, ValueError):
            raise UsageError(f"threads must be a non-negative integer, not {opts['threads']!r}") from None
    return OnnxGraph(path, proto, layout=layout, tap_layout=tap_layout, threads=threads, sha256=sha), dims


def _data_config(path: str, opts: dict[str, Any], elem_dtype, sc: int | None, sh: int | None, sw: int | None,
                 notes: list[str]) -> DataConfig:
    """The preprocessing: geometry (the graph's static size, or input_size), channel order,
    scale, mean and std (defaults for float and uint8 inputs, noted), resize and crop."""
    if "input_size" in opts:
        h, w = parse_size(opts["input_size"], "input_size")
        if (sh is not None and sh != h) or (sw is not None and sw != w):
            raise UsageError(f"input_size {h}x{w} does not fit {os.path.basename(path)}, whose input is fixed at "
                             f"{sh or 'any'}x{sw or 'any'}")
    else:
        h, w = sh or DEFAULT_SIZE[0], sw or DEFAULT_SIZE[1]
        notes.append(f"input size {h}x{w} " + ("from the graph" if sh and sw else
                                               "(default; the graph's input size is dynamic)"))
    order = _choice(opts.get("channel_order", "L" if sc == 1 else "RGB"), "channel_order", ("RGB", "BGR", "L"))
    channels = 1 if order == "L" else 3
    if sc is not None and sc != channels:
        raise UsageError(f"channel_order {order} does not fit the graph's {sc}-channel input")
    uint8_input = elem_dtype == np.uint8
    if "scale" in opts:
        scale = parse_number(opts["scale"], "scale")
        if scale <= 0:
            raise UsageError(f"scale must be positive, not {opts['scale']!r}")
    else:
        scale = 1.0 if uint8_input else 1.0 / 255.0
    default_mean = (0.0,) * channels if uint8_input or channels == 1 else IMAGENET_MEAN
    default_std = (1.0,) * channels if uint8_input or channels == 1 else IMAGENET_STD
    mean = _values(opts["mean"], channels, "mean", 0.0) if "mean" in opts else default_mean
    std = _values(opts["std"], channels, "std", 1.0) if "std" in opts else default_std
    if any(s == 0 for s in std):
        raise UsageError(f"std must not be 0, got {opts.get('std')!r}")
    for key in ("mean", "std", "scale", "channel_order"):
        if key not in opts:
            notes.append(f"{key} is the default" + (" for a uint8 input" if uint8_input else "")
                         + " (set it to the model's training preprocessing)")
    interp = str(opts.get("interpolation", DEFAULT_INTERPOLATION)).lower()
    if interp not in INTERPOLATIONS:
        raise UsageError(f"interpolation {interp!r} unknown; choose from {', '.join(INTERPOLATIONS)}")
    crop_pct = parse_number(opts["crop_pct"], "crop_pct") if "crop_pct" in opts else DEFAULT_CROP_PCT
    if not 0 < crop_pct <= 1:
        raise UsageError(f"crop_pct must be in (0, 1], not {opts['crop_pct']!r}")
    resize = _choice(opts.get("resize", "shorter"), "resize", ("shorter", "warp"), upper=False)
    return DataConfig(input_size=(h, w), mean=tuple(mean), std=tuple(std), scale=scale, channel_order=order,
                      interpolation=interp, crop_pct=crop_pct, resize_mode=resize,
                      fixed_input_size=sh is not None or sw is not None)


def _classifier_output(path: str, graph: OnnxGraph, opts: dict[str, Any], notes: list[str]
                       ) -> tuple[str, str, int | None]:
    """(the tensor ``net`` returns, logits or probs, its number of classes or None)."""
    if "output" in opts:
        output = str(opts["output"])
        if output not in graph.producer:
            if output in graph.node_index:
                output = graph.resolve([output], output)[0]
            else:
                raise UsageError(f"output {output!r} is not a tensor of {os.path.basename(path)}."
                                 f"{suggest(output, graph.graph_outputs + list(graph.producer))} "
                                 f"Graph outputs: {', '.join(graph.graph_outputs)}")
    else:
        output = graph.graph_outputs[0]
        if len(graph.graph_outputs) > 1:
            notes.append(f"output {output!r}, the first of {len(graph.graph_outputs)} graph outputs (pass output=)")
    if "output_kind" in opts:
        kind = _choice(opts["output_kind"], "output_kind", ("logits", "probs"), upper=False)
    else:
        kind = "probs" if graph.softmax_output(output) else "logits"
        notes.append(f"output_kind {kind} " + ("(the output is a Softmax)" if kind == "probs"
                                               else "(no Softmax at the output)"))
    return output, kind, _num_classes(graph.shapes.get(output))


def _labels(path: str, opts: dict[str, Any], n_classes: int | None, notes: list[str]) -> list[str] | None:
    """The class names: a labels= file (beside the model if not found as given), else
    ImageNet's for 1000 (or 1001, TF-slim) outputs, else none."""
    if "labels" in opts:
        lp = str(opts["labels"])
        if not os.path.isfile(lp) and os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(path)), lp)):
            lp = os.path.join(os.path.dirname(os.path.abspath(path)), lp)
        labels = read_labels(lp)
        if n_classes is not None and len(labels) != n_classes:
            raise UsageError(f"labels file has {len(labels)} labels but the model has {n_classes} outputs")
    elif n_classes == 1000:
        labels = list(imagenet_labels())
    elif n_classes == 1001:
        labels = ["background"] + list(imagenet_labels())
        notes.append("1001 outputs: ImageNet labels after a 'background' class (TF-slim convention; pass labels=)")
    else:
        labels = None
    return labels


def _meta(path: str, proto, graph: OnnxGraph, dims, elem_dtype, sb: int | None, output: str,
          n_classes: int | None, notes: list[str]) -> dict[str, Any]:
    """The model's ``extra_meta``: classes, the ONNX file's facts, the preprocessing notes,
    and the default tap layer when one is found."""
    g = proto.graph
    default_layer = _default_layer(graph, output)
    opsets = {(o.domain or "ai.onnx"): int(o.version) for o in proto.opset_import}
    producer = " ".join(p for p in (proto.producer_name, proto.producer_version) if p)
    meta: dict[str, Any] = {
        "num_classes": n_classes,
        "onnx": {
            "file": os.path.basename(path),
            "opset": opsets.get("ai.onnx"),
            "opsets": opsets,
            "ir_version": int(proto.ir_version),
            "producer": producer or None,
            "graph_name": g.name,
            "input": graph.input_name,
            "input_shape": dims,
            "input_dtype": str(elem_dtype),
            "layout": graph.layout,
            "tap_layout": graph.tap_layout,
            "batch": sb if sb is not None else "dynamic",
            "output": output,
            "outputs": graph.graph_outputs,
            "nodes": len(g.node),
            "preprocessing": notes,
        },
    }
    if default_layer is not None:
        meta["default_layer"] = default_layer
    return meta


def _load(rest: str, spec: str, **options: Any) -> Model:
    path, query = split_onnx_spec(rest, spec)
    return load_onnx(path, spec=spec, **{**query, **options})


def _ready() -> list[str]:
    return []


SOURCE = ModelSource(
    name="onnx",
    prefix="onnx",
    example="onnx:model.onnx",
    description="any ONNX image model (PyTorch, Keras/TensorFlow via tf2onnx), run by ONNX Runtime; "
                "preprocessing as ?options",
    load=_load,
    ready=_ready,
    requires=("onnxruntime", "onnx"),
    extra="onnx",
)
