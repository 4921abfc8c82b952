"""ONNX export of a vision transformer at sizes other than its own: the dynamic graph is traced at a
multiple of the patch size, so the exporter's real limit is what the user sees (timm's antialiased
bicubic resampling of the position embeddings, ``aten::_upsample_bicubic2d_aa``, has no opset-17
form), not timm's "should be divisible by patch size". The stated fallback to torch stands."""

from __future__ import annotations

import pytest

timm = pytest.importorskip("timm")
pytest.importorskip("onnx")

from deepfeat.backends.featurenet import FeatureNet
from deepfeat.backends.onnx_runtime import export, probe_shape, rounded_shape
from deepfeat.models import load_model
from deepfeat.pooling import get_pooling


@pytest.fixture(scope="module")
def fnet():
    return FeatureNet(load_model("timm:vit_tiny_patch16_224@random"), ["norm"], get_pooling("cls+gem"))


def test_trace_and_probe_shapes_are_multiples_of_the_patch(fnet):
    assert rounded_shape((248, 201, 3), fnet) == (240, 192, 3)
    assert rounded_shape((7, 40, 3), fnet) == (16, 32, 3)
    h, w, _ = rounded_shape(probe_shape((248, 200, 3)), fnet)
    assert h % 16 == 0 and w % 16 == 0


def test_dynamic_export_fails_on_the_real_operator(fnet, tmp_path):
    with pytest.raises(Exception, match="_upsample_bicubic2d_aa") as err:
        export(fnet, (248, 200, 3), str(tmp_path / "g.onnx"), "dynamic")
    assert "divisible" not in str(err.value)
