"""Dense class maps of vision transformers: the head on every patch token, checked against timm's
own tokens and head; refused with a reason where the head has no per-token form. ``@random`` weights
(seeded; no hub weights are reachable here)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

from deepfeat.errors import ModelError
from deepfeat.models import load_model
from deepfeat.surgery import dense_map, fully_convolutional


def _vit(**kw):
    """vit_tiny through deepfeat's loader, its network swapped for a seeded timm variant built with *kw*."""
    torch.manual_seed(0)
    model = load_model("timm:vit_tiny_patch16_224@random")
    if kw:
        net = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, **kw)
        model = dataclasses.replace(model, net=net.eval())
    return model


def _x(h: int, w: int) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("hw", [(64, 96), (96, 48)])
def test_every_cell_is_the_head_on_its_patch_token(hw):
    model = _vit()
    dense = fully_convolutional(model, softmax=False)
    x = _x(*hw)
    with torch.inference_mode():
        got = dense(x)
        tokens = model.net.forward_features(x)
        ref = model.net.head(tokens[:, 1:])  # class token excluded, row-major patch grid
    gh, gw = hw[0] // 16, hw[1] // 16
    assert got.shape == (1, 1000, gh, gw)
    torch.testing.assert_close(got[0].permute(1, 2, 0).reshape(gh * gw, 1000), ref[0])


def test_avg_pooled_vit_map_is_a_class_activation_map():
    model = _vit(global_pool="avg", fc_norm=False, class_token=False)
    dense = fully_convolutional(model, softmax=False)
    x = _x(80, 112)
    with torch.inference_mode():
        cells = dense(x)
        logits = model.net(x)
    torch.testing.assert_close(cells.mean(dim=(2, 3)), logits, atol=1e-5, rtol=1e-5)


def test_dense_map_of_a_photo_has_one_cell_per_patch(tmp_path):
    from deepfeat.data.samples import write_sample_photos

    photo = write_sample_photos(tmp_path)[0]
    dm = dense_map(_vit(), photo, size="warp:96x160")
    assert dm.shape == (6, 10) and dm.probs.shape == (1000, 6, 10)
    np.testing.assert_allclose(dm.probs.sum(axis=0), 1.0, rtol=1e-5)


def test_attention_pooling_head_is_refused_with_the_reason():
    with pytest.raises(ModelError, match="pools the tokens by attention"):
        fully_convolutional(_vit(global_pool="map"))


def test_a_network_without_classifier_is_refused_with_the_reason():
    model = dataclasses.replace(_vit(), net=timm.create_model("vit_tiny_patch16_224", num_classes=0).eval())
    with pytest.raises(ModelError, match="no linear classifier"):
        fully_convolutional(model)
