"""The layer listing of an ONNX graph (``deepfeat layers``): every node output with its
real shape for one input size, and the initializers as parameters."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from deepfeat.errors import UsageError
from deepfeat.models.onnx_models.proto import _require_onnx
from deepfeat.models.taps import OUTPUT, LayerInfo, LayerTable, ParamInfo

log = logging.getLogger(__name__)


class GraphListing:
    """The listing half of :class:`~.graph.OnnxGraph` (a mixin: it uses the graph's
    analysis and :meth:`~.session.GraphSessions.session`)."""

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
