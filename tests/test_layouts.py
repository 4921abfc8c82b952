"""Tap layouts (tokens, channels-last maps) read from the model, checked against timm's own answers.

Weights: seeded ``timm.create_model`` (no hub weights are reachable here), saved to a file and
loaded back through deepfeat's ``timm:ARCH@FILE`` spec, so the file path is the one users take.
"""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from deepfeat.backends.featurenet import FeatureNet
from deepfeat.errors import LayerError, UsageError
from deepfeat.models import load_model
from deepfeat.models.layouts import LayoutTaps, tap_layout
from deepfeat.pooling import gem, get_pooling


def _saved(tmp_path, arch: str, **kw):
    """(timm reference net, deepfeat model loaded from its saved weights)."""
    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False, **kw).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(ref.state_dict(), path)
    return ref, load_model(f"timm:{arch}@{path}")


def _pixels(model, h: int, w: int, n: int = 2):
    g = torch.Generator().manual_seed(1)
    px = torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)
    return px, model.normalize(px)


def _pooled(model, layer: str, pooling: str, px) -> torch.Tensor:
    with torch.inference_mode():
        return FeatureNet(model, [layer], get_pooling(pooling))(px)[0]


def test_vit_cls_is_timm_pre_logits_and_avg_excludes_prefix(tmp_path):
    ref, model = _saved(tmp_path, "vit_tiny_patch16_224", dynamic_img_size=True)
    px, x = _pixels(model, 64, 96)
    with torch.inference_mode():
        feats = ref.forward_features(x)
        pre = ref.forward_head(feats, pre_logits=True)
        avg = ref.pool(feats, pool_type="avg")
    torch.testing.assert_close(_pooled(model, "norm", "cls", px), pre)
    torch.testing.assert_close(_pooled(model, "pre_logits", "none", px), pre)
    torch.testing.assert_close(_pooled(model, "norm", "avg", px), avg)
    both = _pooled(model, "norm", "cls+avg", px)
    assert both.shape == (2, 2 * ref.embed_dim)


def test_registers_excluded_from_the_patch_grid_and_reg_pooling(tmp_path):
    ref, model = _saved(tmp_path, "vit_small_patch14_reg4_dinov2", dynamic_img_size=True)
    assert tap_layout(model.net, "norm").num_reg == 4 and tap_layout(model.net, "norm").num_cls == 1
    px, x = _pixels(model, 56, 84)
    with torch.inference_mode():
        feats = ref.forward_features(x)
        avg = ref.pool(feats, pool_type="avg")  # timm's avg skips num_prefix_tokens = 1 cls + 4 reg
    torch.testing.assert_close(_pooled(model, "norm", "avg", px), avg)
    torch.testing.assert_close(_pooled(model, "norm", "reg", px), feats[:, 1:5].mean(1))
    torch.testing.assert_close(_pooled(model, "norm", "cls", px), feats[:, 0])


def test_patch_map_is_timm_forward_intermediates(tmp_path):
    ref, model = _saved(tmp_path, "vit_tiny_patch16_224", dynamic_img_size=True)
    _, x = _pixels(model, 48, 80)
    with torch.inference_mode():
        want = ref.forward_intermediates(x, indices=[5], output_fmt="NCHW", intermediates_only=True)[0]
        fmap, tokens = LayoutTaps(model, ["blocks.5"])(x)["blocks.5"]
    assert fmap.shape == (2, ref.embed_dim, 3, 5)
    torch.testing.assert_close(fmap, want)
    assert tokens["cls"].shape == (2, 1, ref.embed_dim) and "reg" not in tokens


def test_swin_channels_last_map_is_permuted_before_pooling(tmp_path):
    ref, model = _saved(tmp_path, "swin_tiny_patch4_window7_224")
    assert tap_layout(model.net, "norm").kind == "nhwc"
    px, x = _pixels(model, 224, 224, n=1)
    with torch.inference_mode():
        nhwc = ref.forward_features(x)
    assert nhwc.shape == (1, 7, 7, 768)
    got = _pooled(model, "norm", "gem", px)
    assert got.shape == (1, 768)  # not 7: GeM over H x W, never over W and C
    torch.testing.assert_close(got, gem(nhwc.permute(0, 3, 1, 2)))


def test_token_poolings_refuse_maps_and_attention_internals():
    model = load_model("timm:resnet18@random")
    px, _ = _pixels(model, 64, 64, n=1)
    with pytest.raises(UsageError, match="needs a class token"):
        _pooled(model, "layer4", "cls", px)
    vit = load_model("timm:vit_tiny_patch16_224@random")
    with pytest.raises(LayerError, match="attention- or window-internal"):
        _pooled(vit, "blocks.0.attn.q_norm", "gem", _pixels(vit, 32, 32, n=1)[0])
    with pytest.raises(LayerError, match="does not know how to read"):
        tap_layout(vit.net, "cls_token_holder")


def test_token_description():
    vit = load_model("timm:vit_small_patch16_224@random")
    layout = tap_layout(vit.net, "norm")
    assert layout.describe([197, 384], (224, 224)) == "197 tokens (1 cls + 14x14 patches) x 384"


def test_onnx_runtime_agrees_with_torch_on_tokens_at_the_model_size():
    pytest.importorskip("onnxruntime")
    import numpy as np

    from deepfeat.backends import tolerance
    from deepfeat.backends.featurenet import OnnxRunner, TorchRunner

    torch.manual_seed(0)
    model = load_model("timm:vit_tiny_patch16_224@random")
    fnet = FeatureNet(model, ["norm"], get_pooling("cls+gem")).eval()
    px = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    a = TorchRunner(fnet, torch.device("cpu"))(px)[0]
    b = OnnxRunner(fnet, export="static")(px)[0]
    assert a.shape == (2, 384) and tolerance.agrees(a, b)
