""":func:`fully_convolutional`: a model's classifier cast as convolutions.

A :class:`~deepfeat.models.caffe.net.CaffeNet` is rewritten layer by layer
(:mod:`.caffe`); any other PyTorch network is split into trunk and head with
``torch.fx`` (:mod:`.split`) and its head converted op by op (:mod:`.head`). The
result is checked numerically (:mod:`.checks`).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from torch import nn

from deepfeat.errors import ModelError, UsageError
from deepfeat.models.base import Model
from deepfeat.models.layouts import token_layout
from deepfeat.surgery.caffe import _caffe_classes, _convert_caffe
from deepfeat.surgery.checks import _check_native, _check_sliding
from deepfeat.surgery.fxnodes import _shape
from deepfeat.surgery.head import _convert_head
from deepfeat.surgery.modules import DenseClassifier, _ForwardFeatures
from deepfeat.surgery.split import _split_fx, _split_timm
from deepfeat.surgery.tokens import token_dense

log = logging.getLogger(__name__)


def _parse_window(window: Any) -> str | int:
    if window != "native":
        try:
            ok = int(window) >= 1 and float(window) == int(window)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise UsageError(f"window must be 'native' or a positive number of feature cells, not {window!r}")
        window = int(window)
    return window


def _dense_from_graph(work: nn.Module, model: Model, window: str | int, **dense_kw: Any):
    """Split *work* (a copy of the net) into trunk and head, convert the head; returns
    (the dense classifier, the traced head, the feature-map shape) for the checks."""
    arch = model.arch
    if hasattr(work, "forward_features") and hasattr(work, "forward_head"):
        trunk, head_gm = _split_timm(work, model)
    else:
        trunk, head_gm = _split_fx(work, model)
    fmap_shape = _shape(next(iter(head_gm.graph.nodes)))
    head, used_window, kind = _convert_head(head_gm, window, arch)
    if hasattr(work, "reset_classifier") and isinstance(trunk, _ForwardFeatures):
        try:  # the converted head holds the classifier now; keep the trunk lean
            work.reset_classifier(0)
        except Exception as e:  # noqa: BLE001 - an exotic timm head; the extra weights are harmless
            log.debug("%s: reset_classifier(0) failed (%s); the trunk keeps the unused classifier", arch, e)
    dense = DenseClassifier(trunk, head, window=used_window, kind=kind, window_mode=window, **dense_kw)
    return dense, head_gm, fmap_shape


def fully_convolutional(model: Model, *, window: str | int = "native", softmax: bool = True,
                        check: bool = True) -> DenseClassifier:
    """Cast *model*'s classifier as convolutions (see the :mod:`deepfeat.surgery` docstring).

    Returns a :class:`DenseClassifier`, an independent copy (the model is not
    changed) mapping the normalised ``N x C x H x W`` batch to ``N x classes x h x w``
    probabilities (``softmax=False``: the model's own output kind, logits or
    probabilities). *window* is the sliding pooling window in feature cells for
    global-pooling heads: ``"native"`` (the feature-map size at the native input, so
    the native input gives one cell equal to the classifier) or an int (1 = one
    classification per feature-map cell). With *check* (default) the conversion is
    verified numerically on random input; a head that cannot be converted raises
    :class:`~deepfeat.errors.ModelError` naming the operation in the way.
    """
    if not isinstance(model, Model):
        raise UsageError(f"fully_convolutional needs a deepfeat Model (from load_model), got {type(model).__name__}")
    window = _parse_window(window)
    net = model.net
    if not isinstance(net, nn.Module) or getattr(model, "tapper", None) is not None:
        raise ModelError(f"{model.spec}: the {model.source} model does not run as PyTorch layers deepfeat can "
                         "rewrite; load the same network from a PyTorch or Caffe source for net surgery")
    was_training = net.training
    net.eval()
    try:
        work = copy.deepcopy(net).eval()
    finally:
        net.train(was_training)
    caffe = _caffe_classes()
    probs_out = model.output_kind == "probs"
    dense_kw: dict[str, Any] = {
        "softmax": softmax and not probs_out, "output_kind": "probs" if (softmax or probs_out) else "logits",
        "native_size": tuple(model.data_config.input_size), "arch": model.arch,
    }
    if caffe is not None and isinstance(work, caffe[0]):
        body, used_window, kind = _convert_caffe(work, model, window)
        dense = DenseClassifier(body, nn.Identity(), window=used_window, kind=kind, window_mode=window, **dense_kw)
        head_gm = fmap_shape = None
    elif token_layout(work) is not None:  # a ViT: the head on every patch token (surgery/tokens.py)
        dense = token_dense(work, model, **dense_kw)
        head_gm = fmap_shape = None
        window = None  # no native-window check: per-token, checked on the pooled token when built
    else:
        dense, head_gm, fmap_shape = _dense_from_graph(work, model, window, **dense_kw)
    dense.eval()
    if check:
        if window == "native":
            _check_native(dense, model)
        if head_gm is not None and fmap_shape is not None:
            _check_sliding(head_gm, dense.head, fmap_shape, dense.window, model.arch)
    return dense
