"""The ``onnx:`` model source: ``onnx:MODEL.onnx[?key=val&...]``, run by ONNX Runtime.

Any image model in ONNX form (exported from PyTorch, converted from Keras/TensorFlow
with tf2onnx, downloaded from a model zoo) becomes a deepfeat :class:`Model`: it
classifies, lists its tensors with shapes (``deepfeat layers``), and any
intermediate tensor can be tapped, pooled and extracted like a PyTorch layer.

An ONNX file says nothing about how its images were prepared, so the
preprocessing is given as options, in the spec after ``?`` (``&``-separated
``key=value``) or as keyword arguments of :func:`deepfeat.models.load_model`
(keywords win). The defaults are the PyTorch/ImageNet convention; they MUST be
set to what the model was trained with, or its predictions and features are
silently worse:

``input_size``  ``HxW`` or ``S``; default the graph's input size when static, else 224x224
``mean``        per-channel means after scaling, in the network's channel order
                (default ImageNet 0.485,0.456,0.406; ``none`` for 0)
``std``         per-channel stds (default ImageNet 0.229,0.224,0.225; ``none`` for 1)
``scale``       what a uint8 pixel is multiplied by first (default ``1/255``; ``1`` keeps 0..255)
``channel_order`` ``RGB`` (default), ``BGR`` or ``L`` (default for a 1-channel input)
``layout``      ``NCHW`` or ``NHWC``; default detected from the input shape (a
                trailing dimension of 1 or 3 means NHWC, as in Keras exports)
``interpolation`` resize filter (default ``bilinear``)
``crop_pct``    centre-crop fraction (default 0.875: resize to 256, crop 224)
``resize``      ``shorter`` (default: shorter side, aspect kept) or ``warp`` (both sides)
``output``      the tensor ``net`` returns (default the graph's first output)
``output_kind`` ``logits`` or ``probs``; default ``probs`` when the output comes from a
                ``Softmax`` node (through reshapes), else ``logits``
``labels``      a labels file (one per line; ``synset_words.txt`` works)
``tap_layout``  ``auto`` (default), ``NCHW`` or ``NHWC``: how tapped 4-D tensors are laid
                out in the graph (see below)
``threads``     ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``)

A graph whose input is ``uint8`` gets ``scale=1, mean=0, std=1`` by default and is fed
rounded 0..255 pixels.

Taps are ONNX tensor names (``deepfeat layers`` lists them; a node name means the
node's first output; ``output`` is the classifier output). Tapping builds a copy of
the graph cut down to the requested tensors, which become its outputs, so early
taps are cheap; one ONNX Runtime session is cached per set of names. Pooling wants
``N x C x H x W``: the layout of every 4-D tensor is tracked through the graph (the
input's layout, ``Transpose`` permutations, ``Conv``-like ops that are NCHW by
definition) and tensors that are NHWC in the graph (Keras models) are transposed
to ``N x C x H x W`` when tapped; ``tap_layout=NHWC``/``NCHW`` forces the choice.

A graph with a static batch dimension (often 1) is run in chunks of that size; a
graph with a static height and width only takes that size (``--size model`` or
``warp:HxW``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import FormatError, LayerError, ModelError, UsageError, suggest
from ..labels import imagenet_labels, read_labels
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, DataConfig
from ..taps import OUTPUT, LayerInfo, LayerTable, ParamInfo
from .base import Model, file_sha256
from .options import parse_number, parse_query, parse_size
from .registry import ModelSource, register_source

log = logging.getLogger(__name__)

OPTIONS = ("input_size", "mean", "std", "scale", "channel_order", "layout", "interpolation", "crop_pct", "resize",
           "output", "output_kind", "labels", "tap_layout", "threads")
LAYOUTS = ("NCHW", "NHWC")
TAP_LAYOUTS = ("auto", "NCHW", "NHWC")
DEFAULT_SIZE = (224, 224)
DEFAULT_INTERPOLATION = "bilinear"
DEFAULT_CROP_PCT = 0.875

#: ops whose 4-D outputs are N x C x H x W by the ONNX specification
_NCHW_OPS = frozenset({
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "DeformConv", "MaxPool", "AveragePool", "LpPool",
    "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "LRN",
    "DepthToSpace", "SpaceToDepth", "MaxRoiPool", "RoiAlign", "MaxUnpool", "Col2Im",
})
#: ops after which the layout of the result is not the layout of the operand
_LAYOUT_BREAKING_OPS = frozenset({
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Gemm", "MatMul", "Einsum", "Shape", "Size", "Gather",
    "GatherElements", "GatherND", "ScatterND", "Tile", "Expand", "ConstantOfShape", "NonZero", "TopK",
    "ArgMax", "ArgMin", "Range", "Split", "SplitToSequence", "Loop", "If", "Scan",
})
#: ops whose output depends on the input's shape only, not on its values
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
#: ops a classifier output may pass through after its Softmax
_PASS_THROUGH_OPS = frozenset({"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Dropout",
                               "Transpose"})
_GENERIC_GRAPH_NAMES = frozenset({"", "main_graph", "torch_jit", "torch-jit-export", "tf2onnx", "graph"})


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ModelError("onnx: models need the onnx and onnxruntime packages: pip install 'deepfeat[onnx]'") from None
    return onnx, ort


# ---------------------------------------------------------------------------
# Spec and option values
# ---------------------------------------------------------------------------


def split_onnx_spec(rest: str, spec: str) -> tuple[str, dict[str, str]]:
    """``PATH.onnx?k=v&...`` -> (path, options).

    The path ends at the first '?' that leaves an existing file before it (so paths
    may contain '?'), failing that at the first '?'.
    """
    rest = rest.strip()
    if os.path.isfile(rest) or "?" not in rest:
        path, query = rest, ""
    else:
        marks = [i for i, ch in enumerate(rest) if ch == "?"]
        at = next((i for i in marks if os.path.isfile(rest[:i])), marks[0])
        path, query = rest[:at], rest[at + 1:]
    if not path:
        raise UsageError(f"model spec {spec!r} names no file; e.g. onnx:model.onnx?mean=0.5&std=0.5")
    opts = parse_query(query, spec)
    return path, opts




def _values(v: Any, channels: int, what: str, none_value: float) -> tuple[float, ...]:
    """1 or *channels* numbers from ``"0.5"``, ``"0.485,0.456,0.406"``, a sequence, or ``none``."""
    if isinstance(v, str):
        s = v.strip()
        if s.lower() == "none":
            return (none_value,) * channels
        parts = [p for p in s.replace(";", ",").split(",") if p.strip()]
    elif isinstance(v, (int, float)):
        parts = [v]
    else:
        try:
            parts = list(v)
        except TypeError:
            raise UsageError(f"{what} must be 1 or {channels} numbers, not {v!r}") from None
    vals = [parse_number(p, what) for p in parts]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise UsageError(f"{what}: {len(vals)} values for a {channels}-channel input (give 1 or {channels})")
    return tuple(vals)


def _choice(v: Any, what: str, choices: Sequence[str], upper: bool = True) -> str:
    s = str(v).strip()
    s = s.upper() if upper else s.lower()
    if s not in choices:
        raise UsageError(f"{what} {v!r} unknown; choose from {', '.join(choices)}")
    return s


# ---------------------------------------------------------------------------
# The graph: analysis, sessions, runs
# ---------------------------------------------------------------------------


def _dims(value_info) -> list[int | str | None] | None:
    """Dimensions of a tensor ValueInfo (int, symbolic name, or None), or None without a shape."""
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    out: list[int | str | None] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _static(d: Any) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _refs(node) -> list[str]:
    """Every tensor name *node* reads, including outer-scope names used by its subgraphs."""
    names = [i for i in node.input if i]
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            for n in g.node:
                names.extend(_refs(n))
    return names


def detect_layout(dims: Sequence[Any]) -> tuple[str, str]:
    """``NCHW`` or ``NHWC`` for a 4-D image input, and how it was decided."""
    c1, c3 = _static(dims[1]), _static(dims[3])
    if c3 in (1, 3) and c1 not in (1, 3):
        return "NHWC", f"detected: the input's last dimension is {c3} (channels last)"
    if c1 in (1, 3):
        return "NCHW", f"detected: the input's second dimension is {c1} (channels first)"
    if c1 is not None and c3 is None:
        return "NHWC", f"assumed: the input's second dimension is {c1}, too many for channels"
    return "NCHW", "assumed (the input shape does not show where the channels are; pass layout= to change)"


class OnnxGraph:
    """A loaded ONNX graph with one image input, and the ONNX Runtime sessions built from it.

    ``run(x, names)`` takes the normalised ``N x C x H x W`` float tensor, feeds it in
    the graph's layout, dtype and batch size, and returns the named tensors as numpy
    arrays as the graph computes them. A session is built per set of names from a
    copy of the graph reduced to what those tensors need, and cached.
    """

    def __init__(self, path: str, proto, *, layout: str, tap_layout: str = "auto", threads: int | None = None,
                 sha256: str | None = None):
        self.path = path
        self.sha256 = sha256
        self.layout = layout
        self.tap_layout = tap_layout
        self.threads = threads
        self._proto = proto
        self._sessions: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()
        self._analyse(proto)

    # -- pickling (sessions are rebuilt; the file is re-read and must not have changed) --
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proto"] = None
        state["_sessions"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def proto(self):
        if self._proto is None:
            if self.sha256 is not None and file_sha256(self.path) != self.sha256:
                raise ModelError(f"{self.path} changed since the model was loaded; load it again")
            self._proto = _read_proto(self.path)
        return self._proto

    def _analyse(self, proto) -> None:
        onnx, _ = _require_onnx()
        g = proto.graph
        self.graph_name = g.name
        self.initializers: dict[str, tuple[list[int], int]] = {t.name: (list(t.dims), t.data_type)
                                                                for t in g.initializer}
        self.nodes: list[tuple[str, str, list[str], list[str], list[str]]] = []  # name, op, inputs, outputs, refs
        self.producer: dict[str, tuple[int, int]] = {}
        self.node_index: dict[str, int] = {}
        for i, n in enumerate(g.node):
            self.nodes.append((n.name, n.op_type, list(n.input), list(n.output), _refs(n)))
            for j, o in enumerate(n.output):
                if o and o not in self.producer:
                    self.producer[o] = (i, j)
            if n.name and n.name not in self.node_index:
                self.node_index[n.name] = i
        real_inputs = [v for v in g.input if v.name not in self.initializers]
        if not real_inputs:
            raise FormatError(f"{self.path}: the graph has no inputs (is this an ONNX model?)")
        if len(real_inputs) > 1:
            raise ModelError(f"{self.path}: the graph has {len(real_inputs)} inputs "
                             f"({', '.join(v.name for v in real_inputs)}); deepfeat runs image models with one input")
        inp = real_inputs[0]
        self.input_name = inp.name
        self.input_dims = _dims(inp)
        elem = inp.type.tensor_type.elem_type if inp.type.HasField("tensor_type") else 0
        self.input_elem = elem or onnx.TensorProto.FLOAT
        self.graph_outputs = [o.name for o in g.output]
        if not self.graph_outputs:
            raise FormatError(f"{self.path}: the graph has no outputs")

        # element types and dims of every tensor deepfeat may declare as an output
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int | str | None] | None] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(proto).graph
            infos = list(inferred.value_info) + list(inferred.output) + list(inferred.input)
        except Exception as e:  # noqa: BLE001 - custom ops or > 2 GB: types stay unknown, ORT infers them
            log.info("ONNX shape inference failed on %s: %s", self.path, e)
            infos = list(g.value_info) + list(g.output) + list(g.input)
        for v in infos:
            if v.type.HasField("tensor_type"):
                self.types[v.name] = v.type.tensor_type.elem_type
                self.shapes[v.name] = _dims(v)
            else:  # sequences, maps, optionals: not tappable as arrays
                self.types[v.name] = -1

        # which tensors depend on the pixel values (and so carry the batch dimension)
        dependent = {self.input_name}
        for name, op, _inputs, outputs, refs in self.nodes:
            if op not in _SHAPE_ONLY_OPS and any(r in dependent for r in refs):
                dependent.update(o for o in outputs if o)
        self.dependent = dependent

        # the layout of every 4-D tensor, propagated from the input
        layouts: dict[str, str | None] = {self.input_name: self.layout}
        for node, (name, op, inputs, outputs, refs) in zip(g.node, self.nodes):
            rank = self.rank(outputs[0]) if outputs and outputs[0] else None
            lay: str | None = None
            if op in _NCHW_OPS:
                lay = "NCHW"
            elif op == "Transpose":
                src = layouts.get(inputs[0]) if inputs else None
                perm = _int_list_attr(node, "perm")
                if src is not None:
                    perm = perm or [3, 2, 1, 0]
                    if len(perm) == 4:
                        cand = "".join(src[p] for p in perm)
                        lay = cand if cand in LAYOUTS else None
            elif op not in _LAYOUT_BREAKING_OPS:
                lay = next((layouts[i] for i in inputs if i and layouts.get(i) is not None), None)
            if rank is not None and rank != 4:
                lay = None
            if lay is not None:
                for o in outputs[:1]:
                    if o:
                        layouts[o] = lay
        self.layouts = layouts

    # -- facts about tensors --
    def rank(self, name: str) -> int | None:
        dims = self.shapes.get(name)
        return len(dims) if dims is not None else None

    def static_dims(self) -> tuple[int | None, int | None, int | None, int | None]:
        """(N, C, H, W) of the input where static, in NCHW terms."""
        d = self.input_dims
        if d is None:
            return None, None, None, None
        if self.layout == "NHWC":
            return _static(d[0]), _static(d[3]), _static(d[1]), _static(d[2])
        return _static(d[0]), _static(d[1]), _static(d[2]), _static(d[3])

    def transposed(self, name: str) -> bool:
        """Whether a 4-D tap of *name* is NHWC in the graph and returned transposed to NCHW."""
        if self.tap_layout != "auto":
            return self.tap_layout == "NHWC"
        lay = self.layouts.get(name)
        return (lay or self.layout) == "NHWC"

    def tensor_names(self) -> list[str]:
        return [self.input_name] + [o for *_, outputs, _ in self.nodes for o in outputs if o]

    def resolve(self, layers: Iterable[str], output: str) -> list[str]:
        """Tensor names for requested tap names (tensor names, node names, ``output``)."""
        out = []
        for raw in layers:
            name = str(raw).strip()
            if name == OUTPUT:
                out.append(output)
            elif name == self.input_name or name in self.producer:
                out.append(name)
            elif name in self.node_index:
                outputs = [o for o in self.nodes[self.node_index[name]][3] if o]
                if not outputs:
                    raise LayerError(f"ONNX node {name!r} has no outputs to tap")
                out.append(outputs[0])
            elif name in self.initializers:
                raise LayerError(f"{name!r} is a weight (an initializer) of the ONNX graph, not an activation; "
                                 "tap the output of the node that uses it")
            else:
                raise LayerError(f"tensor {name!r} not found in {os.path.basename(self.path)}."
                                 f"{self._hint(name)} Run `deepfeat layers --model SPEC` for the full list.")
            if self.types.get(out[-1]) == -1:
                raise LayerError(f"tensor {out[-1]!r} is not a tensor (a sequence or map) and cannot be tapped")
        return out

    def _hint(self, name: str) -> str:
        names = self.tensor_names() + list(self.node_index) + [OUTPUT]
        hint = suggest(name, names)
        if hint:
            return hint
        low = name.lower()
        containing = [n for n in self.tensor_names() if low in n.lower()]
        if containing:  # e.g. a PyTorch module name: its last tensors are what the module returns
            return f" Tensors whose names contain it (the last {min(5, len(containing))}): " \
                   f"{', '.join(containing[-5:])}."
        return ""

    # -- sessions --
    def _value_info(self, name: str):
        onnx, _ = _require_onnx()
        elem = self.types.get(name)
        if elem and elem > 0:
            return onnx.helper.make_tensor_value_info(name, elem, None)
        return onnx.helper.make_empty_tensor_value_info(name)

    def subgraph(self, outputs: Sequence[str]):
        """A copy of the model whose outputs are *outputs*, without the nodes they do not need."""
        onnx, _ = _require_onnx()
        proto = self.proto
        keep: set[int] = set()
        seen: set[str] = set()
        stack = list(outputs)
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            p = self.producer.get(t)
            if p is not None and p[0] not in keep:
                keep.add(p[0])
                stack.extend(self.nodes[p[0]][4])
        src = proto.graph
        m = onnx.ModelProto()
        m.ir_version = proto.ir_version
        m.producer_name = proto.producer_name
        m.producer_version = proto.producer_version
        m.opset_import.extend(proto.opset_import)
        m.functions.extend(proto.functions)
        g = m.graph
        g.name = src.name
        g.node.extend(src.node[i] for i in sorted(keep))
        g.initializer.extend(t for t in src.initializer if t.name in seen)
        g.sparse_initializer.extend(t for t in src.sparse_initializer if t.values.name in seen)
        g.input.extend(v for v in src.input if v.name == self.input_name or v.name in seen)
        g.value_info.extend(v for v in src.value_info if v.name in seen)
        g.output.extend(self._value_info(n) for n in outputs)
        return m

    def session(self, outputs: Sequence[str], cache: bool = True):
        key = tuple(outputs)
        with self._lock:
            sess = self._sessions.get(key)
            if sess is not None:
                return sess
            _, ort = _require_onnx()
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            threads = self.threads if self.threads is not None else torch.get_num_threads()
            if threads:
                opts.intra_op_num_threads = int(threads)
            data = self.subgraph(outputs).SerializeToString()
            try:
                sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - ORT's exceptions derive from Exception only
                raise ModelError(f"{self.path}: ONNX Runtime cannot run this graph: {e}") from None
            if cache:
                self._sessions[key] = sess
            return sess

    # -- running --
    def _feed(self, x: torch.Tensor) -> np.ndarray:
        onnx, _ = _require_onnx()
        if x.dim() != 4:
            raise UsageError(f"expected an N x C x H x W batch, got shape {tuple(x.shape)}")
        _, c, h, w = self.static_dims()
        if (h is not None and x.shape[2] != h) or (w is not None and x.shape[3] != w):
            raise UsageError(
                f"{os.path.basename(self.path)} takes {h or 'any'}x{w or 'any'} images only (a static input size in "
                f"the graph), got {x.shape[2]}x{x.shape[3]}; use the model's size (--size model) or warp:{h}x{w}, "
                "or re-export the model with a dynamic height and width")
        if c is not None and x.shape[1] != c:
            raise UsageError(f"{os.path.basename(self.path)} takes {c}-channel images, got {x.shape[1]} channels")
        arr = x.detach().to("cpu", torch.float32).numpy()
        if self.layout == "NHWC":
            arr = arr.transpose(0, 2, 3, 1)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.input_elem)
        if dtype == np.uint8:
            arr = np.clip(np.rint(arr), 0, 255)
        return np.ascontiguousarray(arr, dtype=dtype)

    def _run(self, sess, names: list[str], feed: np.ndarray) -> list[np.ndarray]:
        try:
            return sess.run(names, {self.input_name: feed})
        except Exception as e:  # noqa: BLE001 - ORT's exceptions derive from Exception only
            shape = "x".join(str(d) for d in feed.shape)
            raise ModelError(f"{os.path.basename(self.path)}: ONNX Runtime failed on a {shape} "
                             f"({self.layout}) input: {e}") from None

    def run(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The tensors *names* (graph layout) for the normalised NCHW batch *x*."""
        feed = self._feed(x)
        wanted = [n for n in dict.fromkeys(names) if n != self.input_name]
        out: dict[str, np.ndarray] = {}
        if self.input_name in names:
            out[self.input_name] = feed
        if not wanted:
            return out
        wanted = sorted(wanted)  # one session per set of names, whatever their order
        sess = self.session(tuple(wanted))
        n = feed.shape[0]
        b = self.static_dims()[0]
        if b is None or (n == b):
            return {**out, **dict(zip(wanted, self._run(sess, wanted, feed)))}
        if n == 0:
            raise UsageError("an empty batch")
        chunks: list[list[np.ndarray]] = []
        for start in range(0, n, b):
            part = feed[start:start + b]
            k = part.shape[0]
            if k < b:  # a static batch of b: pad the last chunk and drop the padding afterwards
                part = np.concatenate([part, np.zeros((b - k,) + part.shape[1:], dtype=part.dtype)])
            res = self._run(sess, wanted, part)
            chunks.append([r[:k] if name in self.dependent else r for name, r in zip(wanted, res)])
        for i, name in enumerate(wanted):
            out[name] = np.concatenate([c[i] for c in chunks]) if name in self.dependent else chunks[0][i]
        return out

    # -- listing --
    def layer_table(self, input_shape: Sequence[int], output: str) -> LayerTable:
        """Every node's output tensors (``Constant`` nodes aside) with their real shapes for one
        *input_shape* (C, H, W) input, from one ONNX Runtime run with all of them as outputs
        (shape inference if that run fails), and every initializer as a parameter row."""
        onnx, _ = _require_onnx()
        c, h, w = (int(v) for v in input_shape)
        b = self.static_dims()[0] or 1
        x = torch.zeros(b, c, h, w)
        rows = [(i, j, o) for i, (_n, op, _in, outs, _r) in enumerate(self.nodes) if op != "Constant"
                for j, o in enumerate(outs) if o and self.types.get(o) != -1]
        names = list(dict.fromkeys(o for *_, o in rows))
        shapes: dict[str, list[int] | None] = {}
        source = "ONNX Runtime"
        try:
            feed = self._feed(x)
            sess = self.session(tuple(names), cache=False)
            for name, arr in zip(names, sess.run(names, {self.input_name: feed})):
                shapes[name] = list(np.shape(arr))
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - fall back to what shape inference knows
            log.warning("running %s with every tensor as an output failed (%s); shapes come from ONNX shape "
                        "inference", self.path, e)
            source = "shape inference"
            shapes = {n: [d if isinstance(d, int) else None for d in (self.shapes.get(n) or [])] or None
                      for n in names}

        def tap_shape(name: str, shape: list[int] | None) -> tuple[list[int] | None, str]:
            if shape is None:
                return None, "shape unknown"
            if name not in self.dependent:
                return shape, "shape arithmetic (no batch dim)"
            s = list(shape[1:])
            if len(s) == 3 and self.transposed(name):
                return [s[2], s[0], s[1]], "NHWC in the graph; tapped as CxHxW"
            return s, ""

        table = LayerTable(input_shape=[c, h, w])
        table.layers.append(LayerInfo(self.input_name, "(input)", [c, h, w], 0, 0,
                                      note=f"{self.layout} {onnx.helper.tensor_dtype_to_np_dtype(self.input_elem)}"))
        for i, j, o in rows:
            name, op, inputs, outs, _ = self.nodes[i]
            params = 0 if j else sum(math.prod(self.initializers[t][0]) for t in inputs if t in self.initializers)
            shape, note = tap_shape(o, shapes.get(o))
            if name and name != o:
                note = (note + "; " if note else "") + f"node {name}"
            if source != "ONNX Runtime":
                note = (note + "; " if note else "") + f"shape from {source}"
            kind = op if len([t for t in outs if t]) == 1 else f"{op} [output {j}]"
            depth = name.strip("/").count("/") if name else 0
            table.layers.append(LayerInfo(o, kind, shape, params, depth, note=note))
        out_row = next((l for l in table.layers if l.name == output), None)
        table.layers.append(LayerInfo(OUTPUT, f"(network output: {output})", out_row.shape if out_row else None,
                                      0, 0, note="alias"))
        for name, (dims, dtype) in self.initializers.items():
            np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype) if dtype else None
            floating = np_dtype is not None and np.issubdtype(np_dtype, np.floating)
            table.params.append(ParamInfo(name, list(dims), "param" if floating else "constant",
                                          str(np_dtype) if np_dtype is not None else "unknown"))
        return table

    # -- structure --
    def ancestors(self, name: str) -> list[str]:
        """Tensors *name* is computed from, in graph order (itself last)."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            p = self.producer.get(t)
            if p is not None:
                stack.extend(self.nodes[p[0]][4])
        return [t for t in self.tensor_names() if t in seen]

    def softmax_output(self, name: str) -> bool:
        """Whether *name* is a Softmax result, possibly reshaped or cast afterwards."""
        for _ in range(64):
            p = self.producer.get(name)
            if p is None:
                return False
            _n, op, inputs, _o, _r = self.nodes[p[0]]
            if op == "Softmax":
                return True
            if op not in _PASS_THROUGH_OPS or not inputs:
                return False
            name = inputs[0]
        return False


def _int_list_attr(node, name: str) -> list[int] | None:
    for a in node.attribute:
        if a.name == name:
            return [int(v) for v in a.ints]
    return None


def _read_proto(path: str):
    onnx, _ = _require_onnx()
    if not os.path.isfile(path):
        raise ModelError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(path)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError, or onnx's own errors on external data
        raise FormatError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not proto.HasField("graph") or not proto.graph.node:
        raise FormatError(f"{path}: not an ONNX model (no graph nodes)")
    return proto


# ---------------------------------------------------------------------------
# What deepfeat sees: a torch module, taps, a layer lister
# ---------------------------------------------------------------------------


def _to_torch(arr: np.ndarray, device: torch.device, transpose: bool = False) -> torch.Tensor:
    if transpose and arr.ndim == 4:
        arr = arr.transpose(0, 3, 1, 2)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype in (torch.float16, torch.float64, torch.bfloat16):
        t = t.float()
    return t.to(device)


class OnnxNet(torch.nn.Module):
    """The ONNX graph as a module: normalised ``N x C x H x W`` float tensor -> the
    chosen output, computed by ONNX Runtime on the CPU (and returned on the input's device)."""

    def __init__(self, graph: OnnxGraph, output: str):
        super().__init__()
        self.graph = graph
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _to_torch(self.graph.run(x, [self.output])[self.output], x.device)

    def extra_repr(self) -> str:
        return f"{os.path.basename(self.graph.path)}, output={self.output!r}, layout={self.graph.layout}"


class OnnxTaps:
    """Capture named tensors of an ONNX graph: ``taps(x) -> {name: tensor}`` (batch first,
    4-D tensors as ``N x C x H x W``)."""

    def __init__(self, graph: OnnxGraph, layers: Sequence[str], output: str):
        self.graph = graph
        self.requested = list(layers)
        self.layers = graph.resolve(layers, output)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        names = [n for n in self.layers if n != self.graph.input_name]
        arrays = self.graph.run(x, names) if names else {}
        out: dict[str, torch.Tensor] = {}
        for req, name in zip(self.requested, self.layers):
            if name == self.graph.input_name:
                out[req] = x.clone()
            else:
                out[req] = _to_torch(arrays[name], x.device, transpose=self.graph.transposed(name))
        return out


# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


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
    """A deepfeat :class:`Model` from an ONNX file; *options* as in the module docstring."""
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

    # the image input and its layout
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
    graph = OnnxGraph(path, proto, layout=layout, tap_layout=tap_layout, threads=threads, sha256=sha)
    elem_dtype = onnx.helper.tensor_dtype_to_np_dtype(graph.input_elem)
    if elem_dtype not in (np.float32, np.float16, np.float64, np.uint8):
        raise ModelError(f"{path}: the input {graph.input_name!r} is {elem_dtype}; deepfeat feeds float or uint8 images")
    sb, sc, sh, sw = graph.static_dims()
    if sc is not None and sc not in (1, 3):
        raise ModelError(f"{path}: the input {graph.input_name!r} has {sc} channels in the {layout} layout; images "
                         "have 1 or 3 (pass layout= if the layout was detected wrongly)")

    # geometry
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
    cfg = DataConfig(input_size=(h, w), mean=tuple(mean), std=tuple(std), scale=scale, channel_order=order,
                     interpolation=interp, crop_pct=crop_pct, resize_mode=resize,
                     fixed_input_size=sh is not None or sw is not None)

    # the classifier output
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
    n_classes = _num_classes(graph.shapes.get(output))

    # labels
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
            "layout": layout,
            "tap_layout": tap_layout,
            "batch": sb if sb is not None else "dynamic",
            "output": output,
            "outputs": graph.graph_outputs,
            "nodes": len(g.node),
            "preprocessing": notes,
        },
    }
    if default_layer is not None:
        meta["default_layer"] = default_layer
    stem = os.path.splitext(os.path.basename(path))[0]
    net = OnnxNet(graph, output)
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


def _load(rest: str, spec: str, **options: Any) -> Model:
    path, query = split_onnx_spec(rest, spec)
    return load_onnx(path, spec=spec, **{**query, **options})


def _ready() -> list[str]:
    return []


SOURCE = register_source(
    ModelSource(
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
)
