"""OpenVINO backend (``--backend openvino``, ``--precision bf16``, ``auto``'s preference and its
fallback to ONNX Runtime). Tests that need OpenVINO skip without it; the fallback tests run always."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from deepfeat.backends import openvino_runtime, openvino_setup, tolerance
from deepfeat.backends.featurenet import FeatureNet, TorchRunner
from deepfeat.backends.tolerance import ATOL, COSINE_MIN, agreement
from deepfeat.data.images import decode_image, discover
from deepfeat.data.preprocess import parse_size_policy
from deepfeat.errors import UsageError
from deepfeat.pipeline import ExtractConfig, extract, network
from deepfeat.pooling import get_pooling
from deepfeat.store import FeatureStore

from .conftest import SHARED_DATA

FLOWERS = SHARED_DATA / "flowers17"


@pytest.fixture(scope="module")
def ov():
    return pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def bf16(ov):
    if not openvino_setup.bf16_supported():
        pytest.skip("this CPU has no bf16 support OpenVINO can use (AMX or AVX512_BF16)")


@pytest.fixture(scope="module")
def images(photos) -> list[str]:
    """Real photos of several aspect ratios: the sample photos, and three Flowers 17 photos when the
    shared data is here."""
    paths = list(photos.values())[:3]
    if FLOWERS.is_dir():
        flowers = discover([str(FLOWERS)])
        paths += [flowers[i] for i in (0, 72, 176)]
    return paths


def _pixels(paths, size, model):
    policy = parse_size_policy(size)
    return [decode_image(p, policy, model.data_config).pixels for p in paths]


def _assert_same(got, want):
    cos, diff = agreement(got, want)
    assert cos >= COSINE_MIN and diff <= ATOL, (cos, diff)


@pytest.mark.parametrize("size,scales", [("long:512", (1.0,)), ("long:384", (1.0, 0.707, 0.5))])
def test_openvino_equals_torch_at_aspect_preserving_sizes(ov, lite0, images, size, scales, monkeypatch):
    """f32 OpenVINO gives eager torch's descriptors (cosine >= 0.9999, max abs diff <= 1e-4) for two
    taps, on every shape: first on the dynamic compilation, then on a shape's own compilation."""
    monkeypatch.setattr(openvino_runtime, "MIN_SPEEDUP", 0.0)  # kept whatever its speed-up under load
    fnet = FeatureNet(lite0, ["blocks.5", "bn2"], get_pooling("gem"), scales)
    ref = TorchRunner(fnet, torch.device("cpu"))
    run = openvino_runtime.OpenVinoRunner(fnet, threads=2, export="dynamic")
    pixels = _pixels(images, size, lite0)
    assert len({p.shape for p in pixels}) >= 2
    for im in pixels + pixels[:1]:  # the first image's shape comes back: compiled for it
        for got, want in zip(run(im[None]), ref(im[None])):
            _assert_same(got, want)
    g = run.graphs
    assert run.export == "dynamic" and g.exports == 1 and g.checked
    assert g.shape_compiles == 1 and g.shape_problem is None and g.speedup is not None


def test_openvino_static_graph_pads_short_batches(ov, lite0, images):
    """One shape (--size model): a static export with a fixed batch; a short batch is padded."""
    fnet = FeatureNet(lite0, ["bn2"], get_pooling("mac"))
    pixels = np.stack(_pixels(images[:3], "model", lite0))
    run = openvino_runtime.OpenVinoRunner(fnet, threads=2, batch_size=2, export="static")
    _assert_same(run(pixels)[0], TorchRunner(fnet, torch.device("cpu"))(pixels)[0])
    assert run.export == "static" and run.graphs.exports == 1


def test_openvino_shape_constants_fall_back_to_static_exports(ov, lite0, images, caplog):
    """R-MAC's region grid is a trace-time constant: the dynamic graph fails its f32 check at another
    shape and per-shape static exports take over, still exact."""
    fnet = FeatureNet(lite0, ["blocks.4"], get_pooling("rmac"))
    run = openvino_runtime.OpenVinoRunner(fnet, threads=2, export="dynamic")
    ref = TorchRunner(fnet, torch.device("cpu"))
    for im in _pixels(images[:2], "long:160", lite0):
        _assert_same(run(im[None])[0], ref(im[None])[0])
    assert run.export == "static" and run.graphs.fallback_reason
    assert "does not match PyTorch" in caplog.text


def test_per_shape_compilations_and_kernel_cache_are_bounded_by_input_size(ov, lite0, images, monkeypatch):
    """Memory at large inputs: per-shape compilations are evicted to stay within MAX_COMPILED_PIXELS
    (the most recent always kept), still exact; OpenVINO's kernel cache per shape is off for large inputs."""
    monkeypatch.setattr(openvino_runtime, "MIN_SPEEDUP", 0.0)
    fnet = FeatureNet(lite0, ["bn2"], get_pooling("gem"))
    pixels = _pixels(images, "long:160", lite0)
    assert len({im.shape for im in pixels}) >= 2
    graphs = openvino_runtime.CompiledGraphs(fnet, "dynamic", threads=2, max_pixels=100 * 100)  # < one image
    graphs._wants_compile = lambda key: True  # every shape on its own compilation
    ref = TorchRunner(fnet, torch.device("cpu"))
    for im in pixels + pixels[:1]:
        _assert_same(graphs.run(im[None])[0], ref(im[None])[0])
        assert list(graphs._shapes) == [(1, *im.shape)]  # the most recent only: over the budget alone
    assert graphs.shape_compiles >= 3 and graphs.evictions == graphs.shape_compiles - 1
    assert graphs.config["CPU_RUNTIME_CACHE_CAPACITY"] == openvino_setup.RUNTIME_CACHE_CAPACITY  # small
    assert openvino_setup.runtime_cache_capacity(768 * 1024) == 0
    assert openvino_setup.runtime_cache_capacity(384 * 512) == openvino_setup.RUNTIME_CACHE_CAPACITY > 0


@pytest.mark.slow
def test_bf16_within_its_tolerance_and_really_bf16(bf16, lite0, images, monkeypatch):
    """bf16: every descriptor within BF16_COSINE_MIN / BF16_RTOL of eager torch's float32 one, on the
    dynamic bf16 compilation (odd sides above 256 included: the graph's shape arithmetic is integer)
    and on per-shape ones; and bf16 is really used."""
    fnet = FeatureNet(lite0, ["blocks.5", "bn2"], get_pooling("gem"))
    ref = TorchRunner(fnet, torch.device("cpu"))
    run = openvino_runtime.OpenVinoRunner(fnet, threads=2, export="dynamic", precision="bf16")
    monkeypatch.setattr(openvino_runtime, "MIN_SPEEDUP", 0.0)  # per-shape compilations whatever their speed
    pixels = _pixels(images, "long:384", lite0)
    pixels.append(np.ascontiguousarray(pixels[0][:287, :383]))  # odd sides, one above 256
    cosines = []
    for phase in ("dynamic", "per shape"):
        if phase == "per shape":
            run.graphs._wants_compile = lambda key: True  # every shape on its own compilation now
        for im in pixels:
            for got, want in zip(run(im[None]), ref(im[None])):
                ok, why = openvino_setup.compare(got, want, "bf16")
                assert ok, (phase, im.shape, why)
                cosines.append(agreement(got, want)[0])
    g = run.graphs
    assert g.dynamic_precision == "bf16" and g.dynamic_problem is None
    assert g.shape_compiles == len({im.shape for im in pixels}) and g.shape_problem is None
    assert min(cosines) < 0.99999  # not float32 (which is within 1e-10 of 1 here)
    assert openvino_setup.compare(np.ones((1, 4)), np.array([[1, 1, 1, 0.2]]), "bf16")[0] is False


def test_bf16_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    kw = dict(inputs=["x"], output=str(tmp_path / "o"), precision="bf16")
    for backend in ("torch", "onnx"):
        with pytest.raises(UsageError, match="bf16 runs on OpenVINO only"):
            ExtractConfig(backend=backend, **kw).validate()
    with pytest.raises(UsageError, match="on the CPU"):
        ExtractConfig(device="cuda", **kw).validate()
    with pytest.raises(UsageError, match="--precision 'fp8' unknown"):
        ExtractConfig(inputs=["x"], output=str(tmp_path / "o"), precision="fp8").validate()
    monkeypatch.setattr(openvino_setup, "available", lambda: True)
    monkeypatch.setattr(openvino_setup, "cpu_capabilities", lambda: ["FP32", "INT8"])
    with pytest.raises(UsageError, match="no bfloat16 support .*AMX"):
        ExtractConfig(**kw).validate()
    monkeypatch.setattr(openvino_setup, "available", lambda: False)
    with pytest.raises(UsageError, match=r"pip install 'deepfeat\[openvino\]'"):
        ExtractConfig(backend="openvino", inputs=["x"], output=str(tmp_path / "o")).validate()


def test_auto_prefers_openvino_where_it_was_measured_faster(lite0, monkeypatch):
    """auto: OpenVINO f32 for one scale of an aspect-preserving size, ONNX Runtime with --scales and
    for one-shape policies; OpenVINO always for bf16; never on CUDA."""
    monkeypatch.setattr(openvino_setup, "available", lambda: True)
    fnet = FeatureNet(lite0, ["bn2"], get_pooling("gem"))
    cpu = torch.device("cpu")

    def prefers(**kw):
        return network.auto_prefers_openvino(ExtractConfig(inputs=["x"], output="o", **kw), fnet, cpu)

    assert prefers(size="long:1024") and prefers(size="long:512") and prefers(size="native")
    assert not prefers(size="long:1024", scales=(1.0, 0.707, 0.5))
    assert not prefers(size="model") and not prefers(size="warp:300")
    assert prefers(size="long:512", precision="bf16") and prefers(size="model", precision="bf16")
    assert not network.auto_prefers_openvino(ExtractConfig(inputs=["x"], output="o", size="long:1024"), fnet,
                                             torch.device("cuda"))
    monkeypatch.setattr(openvino_setup, "available", lambda: False)
    assert not prefers(size="long:1024")


def test_auto_falls_back_to_onnx_runtime_without_openvino(collection, tmp_path, monkeypatch):
    """auto with OpenVINO not importable (or not installed): ONNX Runtime, as before."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    assert not openvino_setup.available()
    rep = extract(ExtractConfig(inputs=[str(collection / "a")], output=str(tmp_path / "s"), size="long:160",
                                workers=0, progress="none", limit=3))
    assert rep.backend == "onnx"
    assert FeatureStore(tmp_path / "s").meta["inference"] == {"backend": "onnx", "precision": "f32",
                                                              "export": "dynamic"}


def test_auto_falls_back_to_onnx_runtime_when_openvino_fails_its_check(ov, collection, tmp_path, monkeypatch,
                                                                     caplog):
    pytest.importorskip("onnxruntime")

    def wrong(self, pixels):
        raise openvino_setup.OpenVinoCheckError("OpenVINO (f32) does not give eager PyTorch's descriptors")

    monkeypatch.setattr(openvino_runtime.CompiledGraphs, "run", wrong)
    rep = extract(ExtractConfig(inputs=[str(collection / "a")], output=str(tmp_path / "s"), size="long:160",
                                workers=0, progress="none", limit=3))
    assert rep.backend == "onnx" and "openvino backend unavailable" in caplog.text
    assert FeatureStore(tmp_path / "s").meta["inference"]["backend"] == "onnx"


def test_cli_extract_with_openvino_end_to_end(ov, collection, tmp_path, capsys):
    """`deepfeat extract --backend openvino` on real photos: torch's descriptors, and the meta says
    which backend and precision made them."""
    from deepfeat.cli import main

    args = [str(collection / "a"), "--size", "long:224", "--pool", "gem", "--post", "none", "--progress", "none",
            "--limit", "5", "--workers", "1"]
    assert main(["extract", *args, "-o", str(tmp_path / "ov"), "--backend", "openvino"]) == 0
    assert "backend openvino" in capsys.readouterr().out
    assert main(["extract", *args, "-o", str(tmp_path / "t"), "--backend", "torch"]) == 0
    ovs, ts = FeatureStore(tmp_path / "ov"), FeatureStore(tmp_path / "t")
    assert ovs.meta["inference"] == {"backend": "openvino", "precision": "f32", "export": "dynamic"}
    assert ovs.paths == ts.paths
    _assert_same(ovs.raw(), ts.raw())


def test_bf16_store_records_precision_and_appends_under_the_bf16_tolerance(bf16, collection, tmp_path):
    """A bf16 store says so; appending f32 rows (ONNX Runtime here) is checked against its rows
    with the bf16 tolerance, which is recorded; a resumed run keeps the store's precision."""
    kw = dict(size="long:224", pooling="gem", workers=0, progress="none", post="none")
    out = tmp_path / "s"
    rep = extract(ExtractConfig(inputs=[str(collection / "a")], output=str(out), precision="bf16", **kw))
    store = FeatureStore(out)
    assert rep.backend == "openvino"
    assert store.meta["inference"] == {"backend": "openvino", "precision": "bf16", "export": "dynamic"}
    extract(ExtractConfig(inputs=[str(collection / "a"), str(collection / "b")], output=str(out), backend="onnx",
                          **kw))
    check = FeatureStore(out).meta["backend_check"]
    assert check["tolerance"] == {"min_cosine": tolerance.BF16_COSINE_MIN,
                                  "max_rel_diff": tolerance.BF16_RTOL}
    assert check["min_cosine"] >= tolerance.BF16_COSINE_MIN and check["new"]["precision"] == "f32"
    cfg = ExtractConfig(output=str(out), resume=True, progress="none", workers=0)
    extract(cfg)
    assert cfg.precision == "bf16"
