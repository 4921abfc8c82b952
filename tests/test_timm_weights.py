"""Weights people have on disk: original release layouts converted by timm's own checkpoint filter,
and the preprocessing of a tagged name's pretrained config.

No hub weights are reachable here: a seeded ``timm.create_model`` network's state dict is rewritten
into the ORIGINAL release layout (DINOv2's ``dinov2_vits14_pretrain.pth`` key names: a ``mask_token``,
and with registers ``register_tokens`` and the class position inside ``pos_embed``), saved, and loaded
through ``timm:ARCH@FILE``; the outputs must equal the seeded network's.
"""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

from deepfeat.errors import ModelError
from deepfeat.models import load_model


def _seeded(arch: str):
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, dynamic_img_size=True).eval()
    with torch.no_grad():  # timm initialises these to zero / 1e-5: make every tensor count
        for name, p in net.named_parameters():
            if name in ("cls_token", "reg_token") or name.endswith(".gamma"):
                p.normal_(0, 0.5)
    return net


def _dinov2_release_layout(net) -> dict[str, torch.Tensor]:
    """The seeded timm network's weights with the key names and tensors of Meta's release files
    (the inverse of timm's ``_convert_dinov2``)."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, net.embed_dim)
    if "reg_token" in sd:  # timm: no_embed_class; release: pos_embed holds the class position first
        cls_pos = torch.randn(1, 1, net.embed_dim, generator=torch.Generator().manual_seed(3))
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - cls_pos
        sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    return sd


def _outputs(net, x):
    with torch.inference_mode():
        return net.forward_features(x)


@pytest.mark.parametrize("arch", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_release_file_is_converted_by_timms_filter(tmp_path, arch):
    ref = _seeded(arch)
    sd = _dinov2_release_layout(ref)
    assert set(sd) != set(ref.state_dict())  # really another layout
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(sd, path)
    model = load_model(f"timm:{arch}@{path}")
    assert model.extra_meta["weights_converted_by"] == "timm.models.vision_transformer.checkpoint_filter_fn"
    x = torch.randn(2, 3, 56, 70, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_outputs(model.net.eval(), x), _outputs(ref, x))


def test_timm_own_file_is_loaded_as_is(tmp_path):
    ref = _seeded("vit_small_patch14_dinov2")
    path = tmp_path / "timm.pth"
    torch.save(ref.state_dict(), path)
    model = load_model(f"timm:vit_small_patch14_dinov2@{path}")
    assert model.extra_meta["weights_converted_by"] is None
    x = torch.randn(1, 3, 42, 56, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_outputs(model.net.eval(), x), _outputs(ref, x))


@pytest.mark.parametrize("tagged", ["vit_small_patch14_dinov2.lvd142m", "vit_tiny_patch16_224.augreg_in21k",
                                    "deit_tiny_patch16_224.fb_in1k"])
def test_tag_pretrained_config_reaches_the_data_config(tmp_path, tagged):
    cfg = timm.get_pretrained_cfg(tagged).to_dict()
    path = tmp_path / "w.pth"
    torch.save(timm.create_model(tagged, pretrained=False).state_dict(), path)
    dc = load_model(f"timm:{tagged}@{path}").data_config
    assert dc.mean == pytest.approx(cfg["mean"]) and dc.std == pytest.approx(cfg["std"])
    assert dc.interpolation == cfg["interpolation"]
    assert dc.input_size == tuple(cfg["input_size"][1:])
    assert dc.crop_pct == pytest.approx(cfg["crop_pct"])


def test_dinov2_tag_gives_its_own_preprocessing():
    dc = load_model("timm:vit_small_patch14_dinov2.lvd142m@random").data_config
    assert dc.input_size == (518, 518) and dc.crop_pct == 1.0 and dc.interpolation == "bicubic"
    assert dc.size_multiple == 14


def test_unknown_tag_is_refused_with_the_known_ones():
    with pytest.raises(ModelError, match=r"no pretrained tag 'nosuch'.*lvd142m"):
        load_model("timm:vit_small_patch14_dinov2.nosuch@random")


def test_a_file_no_filter_can_read_is_refused_clearly(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"foo.weight": torch.zeros(3, 3), "bar.bias": torch.zeros(3)}, path)
    with pytest.raises(ModelError, match="vit_small_patch14_dinov2|VisionTransformer"):
        load_model(f"timm:vit_small_patch14_dinov2@{path}")
