"""Reading a traced (``torch.fx``) head node by node: what a node computes, its
tensor inputs and users, its shape (after shape propagation), and whether it is a
pooling, a flatten or the start of a classifier head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _fn_name(target: Any) -> str:
    return getattr(target, "__name__", str(target))


def _is_activation(m: nn.Module) -> bool:
    from deepfeat.models.taps import _is_activation as taps_is_activation

    return taps_is_activation(m)


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if hasattr(node, "meta") else None
    return tuple(int(s) for s in meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_tensor_node(node) -> bool:
    """A node computing a tensor (not a parameter fetch, not a shape query like ``x.size(0)``)."""
    return node.op != "get_attr" and (node.op == "placeholder" or "tensor_meta" in node.meta)


def _tensor_inputs(node) -> list:
    return [n for n in node.all_input_nodes if _is_tensor_node(n)]


def _tensor_users(node) -> list:
    return [n for n in node.users if _is_tensor_node(n) or n.op == "output"]


def _describe(node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    if node.op == "call_function":
        return f"function {_fn_name(node.target)}()"
    if node.op == "call_method":
        return f"method .{node.target}()"
    return f"{node.op} {node.target}"


def _arg(node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _dims(v: Any) -> tuple[int, ...] | None:
    if v is None:
        return None
    if isinstance(v, int):
        return (v,)
    try:
        return tuple(int(d) for d in v)
    except TypeError:
        return None


def _is_flatten(node, gm) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Flatten)
    if node.op == "call_function" and node.target is torch.flatten:
        return True
    return bool(node.op == "call_method" and node.target in ("flatten", "view", "reshape", "squeeze"))


def _is_spatial_mean(node) -> bool:
    if (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean):
        dims = _dims(_arg(node, 1, "dim"))
        return dims is not None and {d % 4 for d in dims} == {2, 3}
    return False


_ADAPTIVE_FUNCS = ("adaptive_avg_pool2d", "adaptive_max_pool2d")


def _pool_kind(node, gm) -> str | None:
    """'avg' or 'max' if *node* is a pooling a global/adaptive pool can be read from."""
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)):
            return "avg"
        if isinstance(m, (nn.AdaptiveMaxPool2d, nn.MaxPool2d)):
            return "max"
        return None
    if node.op == "call_function" and _fn_name(node.target) in _ADAPTIVE_FUNCS:
        return "avg" if "avg" in _fn_name(node.target) else "max"
    if _is_spatial_mean(node):
        return "avg"
    return None


def _is_head_start(node, gm) -> bool:
    """Where a classifier head begins: a pooling that ends at 1 x 1 (or an adaptive one),
    a spatial mean, or a flatten of a 4-D map."""
    shp_in = _shape(_tensor_inputs(node)[0]) if _tensor_inputs(node) else None
    shp_out = _shape(node)
    if shp_in is None or shp_out is None or len(shp_in) != 4:
        return False
    kind = _pool_kind(node, gm)
    if kind is not None:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.AvgPool2d, nn.MaxPool2d)):
            return len(shp_out) == 4 and shp_out[2:] == (1, 1) and shp_in[2] * shp_in[3] > 1
        return True
    return _is_flatten(node, gm) and len(shp_out) == 2


def _class_axis(dim: Any, ndim: int) -> bool:
    """Whether a softmax over *dim* of a rank-*ndim* value in the original head is over classes."""
    return dim == 1 or (ndim == 2 and dim == -1)

