"""Dense class maps of a vision transformer: the classifier applied to every patch token.

A ViT's head is ``pool -> fc_norm -> head`` over the ``N x T x C`` tokens of ``forward_features``. Its
``fc_norm`` (a LayerNorm or the identity) and its ``head`` (a Linear layer) act on one token at a time,
so they can run on each patch token of the grid: the result is an ``N x classes x gh x gw`` map, one
class distribution per patch (as :func:`~deepfeat.surgery.fully_convolutional` with ``window=1`` on a
CNN). With ``global_pool='avg'`` and no ``fc_norm`` the mean of those per-patch logits is the network's
own logits (a class activation map); with class-token pooling the head was trained on the class token
only, and the map shows what it makes of each patch token. Built only where the head allows it;
otherwise a :class:`~deepfeat.errors.ModelError` says why (attention pooling, no classifier, a head
that is not one Linear layer).
"""

from __future__ import annotations

import torch
from torch import nn

from deepfeat.errors import ModelError
from deepfeat.models.base import Model
from deepfeat.models.layouts import Layout, token_layout
from deepfeat.surgery.modules import DenseClassifier

#: Tolerance of the built-in check (relative to the logits' magnitude), as :mod:`.checks`.
CHECK_TOLERANCE = 1e-4


class PatchTokens(nn.Module):
    """``forward_features`` of a token model, its patch tokens as an ``N x C x gh x gw`` map."""

    def __init__(self, net: nn.Module, layout: Layout):
        super().__init__()
        self.net = net
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches, _ = self.layout.split(self.net.forward_features(x), (int(x.shape[2]), int(x.shape[3])),
                                       where="forward_features")
        return patches


class TokenHead(nn.Module):
    """``fc_norm`` then ``head`` on every cell of an ``N x C x h x w`` map (channels last inside)."""

    def __init__(self, fc_norm: nn.Module, head: nn.Linear):
        super().__init__()
        self.fc_norm = fc_norm
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc_norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


def refusal(net: nn.Module) -> str | None:
    """Why the head of token model *net* cannot run per patch token, or None when it can."""
    if getattr(net, "attn_pool", None) is not None:
        return ("its head pools the tokens by attention (a learned query over all tokens, timm's 'map' "
                "pooling): no per-token form exists")
    head = getattr(net, "head", None)
    if not isinstance(head, nn.Linear):
        return (f"it has no linear classifier (head is {type(head).__name__}, num_classes="
                f"{getattr(net, 'num_classes', '?')}); load weights with a classifier")
    fc_norm = getattr(net, "fc_norm", nn.Identity())
    if not isinstance(fc_norm, (nn.Identity, nn.LayerNorm)):
        return f"its fc_norm is a {type(fc_norm).__name__}, not a per-token LayerNorm"
    if getattr(net, "global_pool", "token") not in ("token", "avg", ""):
        return f"its pooling {net.global_pool!r} is not the class token or the mean of the patches"
    return None


def token_dense(work: nn.Module, model: Model, **dense_kw) -> DenseClassifier:
    """The per-patch-token dense classifier of *work* (a copy of a token model), checked numerically:
    the head applied to the token it pools (class token, or mean of the patches) gives the logits."""
    layout = token_layout(work)
    if layout is None:
        raise ModelError(f"{model.arch}: not a token model")
    why = refusal(work)
    if why is not None:
        raise ModelError(f"{model.arch}: no dense class map by the head on every patch token: {why}")
    head = TokenHead(getattr(work, "fc_norm", nn.Identity()), work.head)
    _check(work, head, layout, model)
    return DenseClassifier(PatchTokens(work, layout), head, window=None, kind="tokens", window_mode=1, **dense_kw)


def _check(net: nn.Module, head: TokenHead, layout: Layout, model: Model) -> None:
    h, w = model.data_config.input_size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1)).to(model.device)
    with torch.no_grad():
        tokens = net.forward_features(x)
        ref = net.forward_head(tokens)
        if net.global_pool == "avg":
            pooled = tokens[:, layout.num_prefix:].mean(1)
        else:
            pooled = tokens[:, 0]
        got = head(pooled[:, :, None, None])[:, :, 0, 0]
    diff = float((got - ref).abs().max()) / max(1.0, float(ref.abs().max()))
    if diff > CHECK_TOLERANCE:
        raise ModelError(f"{model.arch}: the head on the pooled token differs from the network's logits "
                         f"(relative {diff:.2e}); its head does more than fc_norm + head")
