"""Vision transformers on ONNX Runtime and OpenVINO at sizes other than their own (issue 27).

timm resamples the position embeddings to the input's patch grid with antialiased bicubic
interpolation, which has no ONNX form; while exporting, deepfeat computes it as two weight
matrices built from the traced grid (deepfeat.backends.export_ops), so one dynamic graph serves
every size. Checked end to end: ``extract --size long:N`` on real photos of two aspect ratios,
ViT and DINOv2-with-registers architectures with seeded random weights, every backend gives
eager torch's descriptors, and ``--backend auto`` runs the exported graph instead of falling back."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")
pytest.importorskip("onnxruntime")

from deepfeat.backends.featurenet import FeatureNet
from deepfeat.backends.onnx_runtime import probe_shape, rounded_shape
from deepfeat.backends.tolerance import F32
from deepfeat.data.images import decode_image
from deepfeat.data.preprocess import parse_size_policy
from deepfeat.models import load_model
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.pooling import get_pooling
from deepfeat.store import FeatureStore


def test_trace_and_probe_shapes_are_multiples_of_the_patch():
    fnet = FeatureNet(load_model("timm:vit_tiny_patch16_224@random"), ["norm"], get_pooling("cls+gem"))
    assert rounded_shape((248, 201, 3), fnet) == (240, 192, 3)
    assert rounded_shape((7, 40, 3), fnet) == (16, 32, 3)
    h, w, _ = rounded_shape(probe_shape((248, 200, 3)), fnet)
    assert h % 16 == 0 and w % 16 == 0


@pytest.fixture(scope="module")
def two_aspects(tmp_path_factory, photos):
    """A landscape and a portrait real photo."""
    folder = tmp_path_factory.mktemp("aspects")
    src = Image.open(next(iter(photos.values()))).convert("RGB")
    src.resize((200, 130)).save(folder / "landscape.jpg", quality=92)
    src.crop((0, 0, src.width // 2, src.height)).resize((120, 210)).save(folder / "portrait.jpg", quality=92)
    return folder


def _aspect_pixels(folder, size: str, model) -> list:
    policy = parse_size_policy(size)
    pixels = [decode_image(str(p), policy, model.data_config).pixels for p in sorted(folder.iterdir())]
    assert len({p.shape for p in pixels}) == 2 and all(p.shape[0] != p.shape[1] for p in pixels)
    return pixels


@pytest.mark.parametrize("arch,size", [("vit_tiny_patch16_224", "long:112"),
                                       ("vit_small_patch14_reg4_dinov2", "long:98")])
def test_onnx_runtime_and_openvino_equal_torch_on_transformers_at_aspect_preserving_sizes(arch, size, two_aspects,
                                                                                          tmp_path):
    """One dynamic graph, exported once, gives eager torch's descriptors (tolerance F32) on ONNX Runtime
    and OpenVINO at two aspect ratios away from the model's size (ViT-Ti/16: 224, DINOv2: 518, whose
    37 x 37 position embeddings are resampled down by a different factor per side); the dynamic
    graph passes its own check, so ``auto`` (which refuses per-shape exports) keeps it."""
    from deepfeat.backends.export_cache import ExportCache
    from deepfeat.backends.featurenet import OnnxRunner, TorchRunner

    torch.manual_seed(0)
    model = load_model(f"timm:{arch}@random")
    fnet = FeatureNet(model, ["norm"], get_pooling("cls+gem")).eval()
    cache = ExportCache(tmp_path / "cache")
    runners = [OnnxRunner(fnet, export="dynamic", on_mismatch="raise", disk_cache=cache)]
    if importlib.util.find_spec("openvino") is not None:
        from deepfeat.backends.openvino_runtime import OpenVinoRunner

        runners.append(OpenVinoRunner(fnet, export="dynamic", on_mismatch="raise", disk_cache=cache))
    ref = TorchRunner(fnet, torch.device("cpu"))
    for px in _aspect_pixels(two_aspects, size, model):
        want = ref(px[None])[0]
        assert want.shape == (1, 2 * model.net.num_features)
        for run in runners:
            ok, numbers = F32.check(run(px[None])[0], want)
            assert ok, (run.name, px.shape, numbers)
    assert all(r.export == "dynamic" for r in runners)
    assert cache.misses == 1  # one export, whatever the shape and the engine


def test_auto_backend_runs_the_exported_transformer_at_long_sizes(two_aspects, tmp_path, caplog):
    """``extract --backend auto --size long:N`` on a ViT: the exported graph runs (no fallback to torch,
    no warning) and the store holds torch's descriptors."""
    torch.manual_seed(0)
    weights = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict(), weights)
    caplog.set_level(logging.WARNING)
    stores = {}
    for backend in ("torch", "auto"):
        rep = extract(ExtractConfig(inputs=[str(two_aspects)], output=str(tmp_path / backend), layers=["norm"],
                                    model=f"timm:vit_tiny_patch16_224@{weights}", pooling="cls+gem", post="none",
                                    size="long:112", backend=backend, workers=0, progress="none"))
        assert rep.ok == 2
        stores[backend] = FeatureStore(tmp_path / backend)
    assert stores["auto"].meta["inference"]["backend"] in ("onnx", "openvino")
    assert stores["auto"].meta["inference"]["export"] == "dynamic"
    assert "unavailable" not in caplog.text and "dynamic-shape graph" not in caplog.text
    assert stores["auto"].paths == stores["torch"].paths
    ok, numbers = F32.check(stores["auto"].raw(), stores["torch"].raw())
    assert ok, numbers


def test_openvino_bf16_runs_a_transformer_at_aspect_preserving_sizes(two_aspects):
    """``--precision bf16``: the dynamic bf16 compilation is checked at an odd-sized probe, rounded to the
    patch stride (a ViT takes no other size); descriptors within the bf16 tolerance of float32."""
    pytest.importorskip("openvino")
    from deepfeat.backends import openvino_setup
    from deepfeat.backends.featurenet import TorchRunner
    from deepfeat.backends.openvino_runtime import OpenVinoRunner
    from deepfeat.backends.tolerance import BF16

    if not openvino_setup.bf16_supported():
        pytest.skip("this CPU has no bf16 support OpenVINO can use (AMX or AVX512_BF16)")
    torch.manual_seed(0)
    model = load_model("timm:vit_tiny_patch16_224@random")
    fnet = FeatureNet(model, ["norm"], get_pooling("cls+gem")).eval()
    run = OpenVinoRunner(fnet, precision="bf16", export="dynamic", on_mismatch="raise")
    ref = TorchRunner(fnet, torch.device("cpu"))
    for px in _aspect_pixels(two_aspects, "long:112", model):
        ok, numbers = BF16.check(run(px[None])[0], ref(px[None])[0])
        assert ok, (px.shape, numbers)
    assert run.graphs.dynamic_precision == "bf16" and run.graphs.dynamic_problem is None
