"""A loaded ONNX graph with one image input: its analysis (producers, which tensors carry
the batch, the layout of every 4-D tensor), facts about its tensors, tap-name resolution
and structure. Running it is :class:`~.session.GraphSessions`, listing it
:class:`~.listing.GraphListing`; :class:`OnnxGraph` is all three."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

from deepfeat.errors import FormatError, LayerError, ModelError, suggest
from deepfeat.models.base import file_sha256
from deepfeat.models.onnx_models.listing import GraphListing
from deepfeat.models.onnx_models.proto import LAYOUTS, _dims, _int_list_attr, _read_proto, _refs, _require_onnx, _static
from deepfeat.models.onnx_models.session import GraphSessions
from deepfeat.models.taps import OUTPUT

log = logging.getLogger(__name__)

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


class OnnxGraph(GraphSessions, GraphListing):
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

    # -- structure --
    def upstream(self, outputs: Iterable[str]) -> tuple[set[str], set[int]]:
        """The tensors *outputs* are computed from (themselves included) and the nodes computing them."""
        seen: set[str] = set()
        nodes: set[int] = set()
        stack = list(outputs)
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            p = self.producer.get(t)
            if p is not None and p[0] not in nodes:
                nodes.add(p[0])
                stack.extend(self.nodes[p[0]][4])
        return seen, nodes

    def ancestors(self, name: str) -> list[str]:
        """Tensors *name* is computed from, in graph order (itself last)."""
        seen, _ = self.upstream([name])
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
