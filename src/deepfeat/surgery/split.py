"""Splitting a network into a feature trunk and a classifier head, with ``torch.fx``.

A timm model is split at ``forward_features`` / ``forward_head``; any other traceable
network at the start of its classifier head (a global or adaptive pooling, a spatial
mean, or a flatten of a 4-D map), found by walking back from the output along the
single-input chain. The head comes back as a graph whose placeholder is the feature
map, with shapes propagated at the model's native input size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepfeat.errors import ModelError
from deepfeat.models.base import Model
from deepfeat.surgery.checks import _native_input
from deepfeat.surgery.fxnodes import _describe, _is_activation, _is_head_start, _tensor_inputs, _tensor_users
from deepfeat.surgery.modules import _ForwardFeatures, _ForwardHead


def _shape_prop(gm, *example: torch.Tensor) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*example)


class _LeafTracer(torch.fx.Tracer):
    """Keeps every Linear/Conv/Norm/activation a single node, whoever defined it (timm's
    ``Linear`` subclass, Caffe's ``InnerProduct``)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.BatchNorm1d, nn.Dropout, nn.Flatten,
                          nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)):
            return True
        if type(m) is nn.LayerNorm:  # subclasses (LayerNorm2d) are traced into permute + layer_norm
            return True
        return _is_activation(m) or super().is_leaf_module(m, qualname)


def _trace(module: nn.Module, arch: str):
    try:
        graph = _LeafTracer().trace(module)
    except Exception as e:  # noqa: BLE001 - fx raises many types for untraceable code; all mean the same here
        raise ModelError(f"{arch}: cannot read the network's structure to cast its classifier as convolutions "
                         f"(torch.fx tracing failed: {type(e).__name__}: {e})") from None
    return torch.fx.GraphModule(module, graph)


def _split_timm(net: nn.Module, model: Model) -> tuple[nn.Module, Any]:
    trunk = _ForwardFeatures(net)
    head = _trace(_ForwardHead(net), model.arch)
    with torch.no_grad():
        fmap = trunk(_native_input(model))
    if fmap.dim() != 4:
        raise ModelError(f"{model.arch}: forward_features gives a {fmap.dim()}-D output, not an N x C x H x W map "
                         "(a transformer without a spatial map has no dense form)")
    _shape_prop(head, fmap)
    return trunk, head


def _output_chain(nodes: list) -> list:
    """The nodes before the output along its single-input chain, first to last."""
    out_node = next(n for n in nodes if n.op == "output")
    # walk back from the output along the single-input chain
    chain = []
    cur = _tensor_inputs(out_node)
    cur = cur[0] if len(cur) == 1 else None
    while cur is not None and cur.op not in ("placeholder",):
        chain.append(cur)
        ins = _tensor_inputs(cur)
        if len(ins) != 1 or len(_tensor_users(ins[0])) != 1:
            break
        cur = ins[0]
    chain.reverse()
    return chain


def _trunk_module(gm, nodes: list, fmap_node):
    """The graph up to *fmap_node*, returning it."""
    from torch import fx

    trunk_graph = fx.Graph()
    env: dict = {}
    for n in nodes:
        env[n] = trunk_graph.node_copy(n, lambda a: env[a])
        if n is fmap_node:
            break
    trunk_graph.output(env[fmap_node])
    trunk = fx.GraphModule(gm, trunk_graph)
    trunk.graph.eliminate_dead_code()
    trunk.recompile()
    return trunk


def _head_module(gm, nodes: list, fmap_node, head_nodes: list, arch: str):
    """The graph of *head_nodes*, taking the feature map as its placeholder."""
    from torch import fx

    head_graph = fx.Graph()
    henv: dict = {fmap_node: head_graph.placeholder("fmap")}
    order = {n: i for i, n in enumerate(nodes)}

    def copy_head(n):
        """Copy *n* and what it needs that is computed from the feature map (``x.size(0)``)
        or is a parameter; anything else from before the feature map is not a head."""
        if n in henv:
            return henv[n]
        if n.op != "get_attr" and order[n] < order[fmap_node]:
            raise ModelError(f"{arch}: the classifier head uses {_describe(n)} from before the feature map, "
                             "so it has no convolutional form")
        for a in n.all_input_nodes:
            copy_head(a)
        henv[n] = head_graph.node_copy(n, lambda a: henv[a])
        return henv[n]

    for n in head_nodes:
        copy_head(n)
    head_graph.output(henv[head_nodes[-1]])
    return fx.GraphModule(gm, head_graph)


def _split_fx(net: nn.Module, model: Model) -> tuple[nn.Module, Any]:
    """Split a traced network at the start of its classifier head: the trunk returns the
    feature map, the head graph takes it as its placeholder."""
    gm = _trace(net, model.arch)
    _shape_prop(gm, _native_input(model))
    nodes = list(gm.graph.nodes)
    chain = _output_chain(nodes)
    start = next((i for i, n in enumerate(chain) if _is_head_start(n, gm)), None)
    if start is None:
        raise ModelError(f"{model.arch}: no global pooling or flatten of a feature map was found before the "
                         "classifier, so there is no head to cast as convolutions")
    fmap_node = _tensor_inputs(chain[start])[0]
    trunk = _trunk_module(gm, nodes, fmap_node)
    head = _head_module(gm, nodes, fmap_node, chain[start:], model.arch)
    with torch.no_grad():
        fmap = trunk(_native_input(model))
    _shape_prop(head, fmap)
    return trunk, head
