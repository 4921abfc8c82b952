"""Pictures of transformer taps: tokens and channels-last maps read by their layout (checked against
timm's ``forward_intermediates(output_fmt='NCHW')``), the patch-norm map. ``@random`` weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("matplotlib")

from deepfeat.models import load_model
from deepfeat.viz.maps import layer_map, patch_norms, plot_patch_norm
from deepfeat.viz.network import plot_activations


def _pixels(h: int, w: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_vit_block_is_its_patch_grid_and_patch_norms_are_token_norms():
    torch.manual_seed(0)
    model = load_model("timm:vit_small_patch14_reg4_dinov2@random")
    px = _pixels(56, 98)
    fmap, prefix = layer_map(model, px, "blocks.3")
    x = model.normalize(torch.from_numpy(px)[None])
    with torch.inference_mode():
        ref = model.net.forward_intermediates(x, indices=[3], output_fmt="NCHW", intermediates_only=True,
                                              norm=False)[0][0]
    assert fmap.shape == (384, 4, 7) and set(prefix) == {"cls", "reg"} and prefix["reg"].shape == (1, 4, 384)
    torch.testing.assert_close(fmap, ref)
    np.testing.assert_allclose(patch_norms(fmap), ref.norm(dim=0).numpy(), rtol=1e-5)


def test_swin_stage_shows_its_real_channels():
    torch.manual_seed(0)
    model = load_model("timm:swin_tiny_patch4_window7_224@random")
    px = _pixels(224, 224)
    fmap, prefix = layer_map(model, px, "layers.1")
    with torch.inference_mode():
        ref = model.net.forward_intermediates(model.normalize(torch.from_numpy(px)[None]), indices=[1],
                                              output_fmt="NCHW", intermediates_only=True)[0][0]
    assert fmap.shape == (192, 28, 28) and prefix is None
    torch.testing.assert_close(fmap, ref)


def test_patch_norm_and_activation_pictures_of_a_vit(tmp_path):
    from deepfeat.data.samples import write_sample_photos

    photo = write_sample_photos(tmp_path)[0]
    model = load_model("timm:vit_tiny_patch16_224@random")
    fig = plot_patch_norm(model, photo, size="long:160")
    assert "blocks.11" in fig.axes[1].get_title() and "cls" in fig.axes[1].get_title()
    fig = plot_activations(model, photo, "norm", n=4, size="long:160")
    assert "192 x" in fig.axes[0].get_title()
