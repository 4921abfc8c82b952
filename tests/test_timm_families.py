"""Every timm family at ``@random`` weights and small inputs: its layers are listed, its default tap
pooled to the network's width, at two aspect ratios where the family takes any input size."""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from deepfeat.backends.featurenet import FeatureNet
from deepfeat.models import load_model
from deepfeat.models.taps import model_layer_table
from deepfeat.pipeline.network import default_layer
from deepfeat.pooling import get_pooling

slow = pytest.mark.slow
#: (family, tiny timm architecture, pooling)
FAMILIES = [
    ("ViT", "vit_tiny_patch16_224", "cls+gem"),
    ("DeiT", "deit_tiny_patch16_224", "cls"),
    ("ResNet", "resnet18", "gem"),
    ("ConvNeXt", "convnext_atto", "gem"),
    ("RegNet", "regnetx_002", "gem"),
    ("MobileNetV3", "mobilenetv3_small_050", "gem"),
    pytest.param("DINOv2+registers", "vit_small_patch14_reg4_dinov2", "reg", marks=slow),
    pytest.param("EVA02", "eva02_tiny_patch14_224", "cls", marks=slow),
    pytest.param("CLIP tower", "vit_base_patch16_clip_224", "cls", marks=slow),
    pytest.param("SigLIP tower", "vit_base_patch16_siglip_224", "avg", marks=slow),
    pytest.param("Swin", "swin_tiny_patch4_window7_224", "gem", marks=slow),
    pytest.param("MaxViT", "maxvit_nano_rw_256", "gem", marks=slow),
    pytest.param("EfficientNetV2", "tf_efficientnetv2_b0", "gem", marks=slow),
    pytest.param("MobileNetV4", "mobilenetv4_conv_small", "gem", marks=slow),
]


@pytest.mark.parametrize("family,arch,pooling", FAMILIES)
def test_family_layers_and_default_tap(family, arch, pooling):
    torch.manual_seed(0)
    model = load_model(f"timm:{arch}@random")
    net = model.net
    dc = model.data_config
    table = model_layer_table(model, (3, *dc.input_size))
    names = [row.name for row in table.layers]
    layer = default_layer(model)
    assert layer in names and "pre_logits" in names, family
    widths = {int(net.num_features), int(getattr(net, "head_hidden_size", net.num_features))}
    if dc.fixed_input_size:
        sizes = [dc.input_size]
    else:  # two aspect ratios, rounded to the patch stride
        m = dc.size_multiple * -(-32 // dc.size_multiple)
        sizes = [(2 * m, 3 * m), (3 * m, 2 * m)]
    fnet = FeatureNet(model, [layer], get_pooling(pooling))
    for h, w in sizes:
        px = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8)
        with torch.inference_mode():
            (desc,) = fnet(px)
        parts = len(pooling.split("+"))
        assert desc.shape[0] == 1 and desc.shape[1] in {parts * d for d in widths}, (family, desc.shape, widths)
        assert torch.isfinite(desc).all()
