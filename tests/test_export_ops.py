"""Operators swapped while exporting (deepfeat.backends.export_ops): PyTorch's antialiased resampling
as weight matrices, timm's size early-out, and the exporter's graph dump on a failure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepfeat.backends.export_ops import aa_resize, antialiased_resampling, quiet_exporter
from deepfeat.backends.onnx_runtime import export


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize("src,dst", [((14, 14), (7, 10)), ((37, 37), (8, 6)), ((37, 37), (37, 28)),
                                     ((14, 14), (20, 14)), ((16, 16), (5, 33)), ((14, 14), (14, 14))])
def test_aa_resize_equals_pytorchs_antialiased_interpolate(mode, src, dst):
    """Shrinking, enlarging, one side each way, and the identity: PyTorch's own result within float
    rounding (a position embedding is a C x H x W map like these)."""
    x = torch.randn(1, 24, *src, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(x, size=dst, mode=mode, antialias=True)
    got = aa_resize(x, dst, mode)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_replacement_is_only_for_antialiased_calls_and_is_undone():
    x = torch.randn(1, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    original = F.interpolate
    with antialiased_resampling():
        assert F.interpolate is not original
        plain = F.interpolate(x, size=(5, 4), mode="bicubic")
        assert torch.equal(plain, original(x, size=(5, 4), mode="bicubic"))  # PyTorch's own
    assert F.interpolate is original


def test_dynamic_vit_graph_traced_at_the_models_own_size_runs_at_others(tmp_path):
    """Traced at 224 x 224 (ViT-Ti's own grid), where timm would skip the resampling: the graph still
    resamples the position embeddings, so it gives torch's descriptors at other sizes."""
    ort = pytest.importorskip("onnxruntime")
    from deepfeat.backends.featurenet import FeatureNet
    from deepfeat.backends.tolerance import F32
    from deepfeat.models import load_model
    from deepfeat.pooling import get_pooling

    fnet = FeatureNet(load_model("timm:vit_tiny_patch16_224@random"), ["norm"], get_pooling("cls+gem")).eval()
    export(fnet, (224, 224, 3), str(tmp_path / "g.onnx"), "dynamic")
    sess = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    for h, w in [(224, 224), (112, 160), (176, 64)]:
        px = np.random.default_rng(h).integers(0, 256, (1, h, w, 3), dtype=np.uint8)
        with torch.inference_mode():
            want = fnet(torch.from_numpy(px))[0].numpy()
        ok, numbers = F32.check(sess.run(None, {"pixels": px})[0], want)
        assert ok, (h, w, numbers)


class _Unexportable(torch.nn.Module):
    """A network with an operator the ONNX exporter does not know (``aten::cummax``)."""

    layers = ("x",)
    size_multiple = 1

    def forward(self, pixels):
        return (pixels.float().cummax(1)[0].mean((1, 2)),)


def test_a_failed_export_names_the_operator_without_printing_the_graph(tmp_path, capfd):
    with pytest.raises(Exception, match="aten::cummax"):
        export(_Unexportable(), (16, 16, 3), str(tmp_path / "g.onnx"), "static", 1)
    out, err = capfd.readouterr()
    assert "graph" not in out + err and len(out + err) < 2000
    assert not torch._C._jit_is_onnx_log_enabled()


def test_quiet_exporter_restores_the_log_switch():
    torch._C._jit_set_onnx_log_enabled(True)
    try:
        with quiet_exporter():
            assert not torch._C._jit_is_onnx_log_enabled()
        assert torch._C._jit_is_onnx_log_enabled()
    finally:
        torch._C._jit_set_onnx_log_enabled(False)
