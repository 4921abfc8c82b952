"""Layer tables and taps, including values before in-place activations."""

from __future__ import annotations

import pytest
import torch

from deepfeat.errors import LayerError
from deepfeat.models.taps import OUTPUT, Taps, capture, layer_table


def test_layer_table_embedded(lite0):
    t = layer_table(lite0.net, (3, 224, 224))
    rows = {l.name: l for l in t.layers}
    assert rows["conv_stem"].shape == [32, 112, 112]
    assert rows["blocks.5"].shape == [192, 7, 7]
    assert rows["conv_head"].shape == [1280, 7, 7]
    assert rows["classifier"].shape == [1000]
    assert rows[OUTPUT].shape == [1000]
    assert rows["bn1.act:in"].shape == [32, 112, 112]
    names = [l.name for l in t.layers]
    assert names.index("conv_stem") < names.index("blocks.0") < names.index("conv_head") < names.index("classifier")
    # every parameter is listed once, with its shape
    params = {p.name: p for p in t.params if p.kind == "param"}
    assert params["conv_stem.weight"].shape == [32, 3, 3, 3]
    assert t.to_dict()["total_params"] == sum(p.numel() for p in lite0.net.parameters())
    assert any(p.kind == "buffer" and p.name == "bn1.running_mean" for p in t.params)


def test_layer_table_other_size(lite0):
    rows = {l.name: l for l in layer_table(lite0.net, (3, 320, 480)).layers}
    assert rows["conv_stem"].shape == [32, 160, 240]
    assert rows["conv_head"].shape == [1280, 10, 15]


def test_taps_many_layers_one_pass(lite0):
    x = torch.randn(2, 3, 224, 224)
    out = capture(lite0, x, ["blocks.3", "conv_head", "bn2.act:in", "bn2", OUTPUT])
    assert out["blocks.3"].shape == (2, 80, 14, 14)
    assert out["conv_head"].shape == (2, 1280, 7, 7)
    # fused BN + in-place ReLU6: both the value before and after the activation
    pre, post = out["bn2.act:in"], out["bn2"]
    assert (pre < 0).any() and (pre > 6).any()
    assert torch.allclose(post, pre.clamp(0, 6))
    with torch.inference_mode():
        assert torch.allclose(out[OUTPUT], lite0.net(x), atol=1e-5)


def test_taps_before_inplace_relu_torchvision():
    from torchvision.models import squeezenet1_1

    net = squeezenet1_1().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        out = Taps(net, ["features.0", "features.1", "classifier.1", "classifier.2"])(x)
    assert net.features[1].inplace  # the ReLU runs in place on the conv output...
    assert (out["features.0"] < 0).any()  # ...but the tapped conv output is pre-ReLU
    assert torch.equal(out["features.1"], out["features.0"].clamp(min=0))
    assert torch.equal(out["classifier.2"], out["classifier.1"].clamp(min=0))


def test_taps_stop_early(lite0):
    ran = []
    h = lite0.net.conv_head.register_forward_hook(lambda *a: ran.append(1))
    try:
        capture(lite0, torch.randn(1, 3, 64, 64), ["blocks.1"])
    finally:
        h.remove()
    assert ran == []  # the pass stopped before the head


def test_unknown_layer_suggests(lite0):
    with pytest.raises(LayerError, match="'conv_haed' not found.*conv_head"):
        Taps(lite0.net, ["conv_haed"])


def test_taps_timm_model_any_arch():
    import timm

    net = timm.create_model("resnet10t", pretrained=False).eval()
    with torch.inference_mode():
        out = Taps(net, ["layer2", "layer4", "act1:in", "act1"])(torch.randn(1, 3, 64, 64))
    assert out["layer2"].shape[1] == 128 and out["layer4"].shape[1] == 512
    assert torch.equal(out["act1"], out["act1:in"].clamp(min=0))
