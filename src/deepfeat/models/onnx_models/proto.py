"""Reading an ONNX file and the facts of its tensors: onnx/onnxruntime on demand, the
model proto (with clear errors for files that are not ONNX models), a ValueInfo's
dimensions, what a node reads, and the layout of a 4-D image input."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from deepfeat.errors import FormatError, ModelError

LAYOUTS = ("NCHW", "NHWC")


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ModelError("onnx: models need the onnx and onnxruntime packages: pip install 'deepfeat[onnx]'") from None
    return onnx, ort


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


def _int_list_attr(node, name: str) -> list[int] | None:
    for a in node.attribute:
        if a.name == name:
            return [int(v) for v in a.ints]
    return None


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
