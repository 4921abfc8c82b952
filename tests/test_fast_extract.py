"""Fast extraction at retrieval sizes: ONNX Runtime with dynamic shapes, padded batches with
masked pooling, and appending to a store with another backend (issue 15)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepfeat.backends.featurenet import FeatureNet, OnnxRunner, TorchRunner
from deepfeat.backends.padding import (
    PaddedTorchRunner,
    bucket_shape,
    check_maskable,
    masked_pool,
    valid_map_size,
    valid_mask,
)
from deepfeat.backends.tolerance import ATOL, COSINE_MIN, agreement
from deepfeat.data.images import decode_image, discover
from deepfeat.data.preprocess import parse_size_policy
from deepfeat.errors import StoreError, UsageError
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.pooling import get_pooling
from deepfeat.store import FeatureStore

from .conftest import SHARED_DATA

FLOWERS = SHARED_DATA / "flowers17"


@pytest.fixture(scope="module")
def retrieval_images(photos) -> list[str]:
    """Real photos of several aspect ratios: four Flowers 17 photos when the shared data is here,
    plus the sample photos (always here)."""
    paths = list(photos.values())[:3]
    if FLOWERS.is_dir():
        flowers = discover([str(FLOWERS)])
        paths += [flowers[i] for i in (0, 14, 72, 176)]  # four aspect ratios
    return paths


def _pixels(paths, size, model):
    policy = parse_size_policy(size)
    return [decode_image(p, policy, model.data_config).pixels for p in paths]


def _assert_same(got, want):
    cos, diff = agreement(got, want)
    assert cos >= COSINE_MIN and diff <= ATOL, (cos, diff)


@pytest.mark.parametrize("size,scales,pool", [("long:512", (1.0,), "gem"), ("long:512", (1.0, 0.707, 0.5), "gem"),
                                              ("long:384", (1.0,), "mac")])
def test_onnx_dynamic_graph_equals_torch_at_aspect_preserving_sizes(lite0, retrieval_images, size, scales, pool):
    """One dynamic-shape graph serves every image shape with torch's descriptors (cosine >= 0.9999,
    max abs diff <= 1e-4), for a tap before the last layer too."""
    fnet = FeatureNet(lite0, ["blocks.5", "bn2"], get_pooling(pool), scales)
    ref, ort = TorchRunner(fnet, torch.device("cpu")), OnnxRunner(fnet, export="dynamic")
    images = _pixels(retrieval_images, size, lite0)
    assert len({im.shape for im in images}) >= 2  # several shapes (6 with Flowers 17)
    for im in images:
        for got, want in zip(ort(im[None]), ref(im[None])):
            _assert_same(got, want)
    assert ort.export == "dynamic" and ort.graphs.graphs == 1 and ort.graphs.exports == 1


def test_repeated_batch_shapes_get_shape_fixed_sessions_with_the_same_descriptors(lite0, retrieval_images):
    """A batch shape seen a second time runs on a session of the dynamic graph with its dimensions
    fixed (faster, docs/benchmarks.md); it gives torch's descriptors, and at most max_fixed are kept."""
    fnet = FeatureNet(lite0, ["bn2"], get_pooling("gem"))
    ref, ort = TorchRunner(fnet, torch.device("cpu")), OnnxRunner(fnet, export="dynamic")
    images = _pixels(retrieval_images[:3], "long:160", lite0)
    assert len({im.shape for im in images}) == 3
    ort.graphs.max_fixed = 2
    one = images[0][None]
    want = ref(one)[0]
    for _ in range(3):  # once on the dynamic session, then on a fixed one made on the second sight
        _assert_same(ort(one)[0], want)
    assert ort.graphs.fixed_sessions == 1 and ort.graphs.fixed_problem is None
    pair = np.stack([images[0], images[0]])
    for _ in range(2):  # another batch size is another shape
        got = ort(pair)[0]
    _assert_same(got, ref(pair)[0])
    assert ort.graphs.fixed_sessions == 2
    for im in images[1:]:
        for _ in range(2):
            _assert_same(ort(im[None])[0], ref(im[None])[0])
    assert ort.graphs.fixed_sessions == 4 and len(ort.graphs._fixed) == 2  # least recently used out
    assert ort.export == "dynamic" and ort.graphs.exports == 1  # no export for any of them


def test_dynamic_graph_is_traced_small_and_runs_without_the_growing_arena(lite0, retrieval_images, monkeypatch):
    """The dynamic graph is traced at a small shape of the same aspect (the export's memory does not
    grow with --size; H and W stay free), still gives torch's descriptors at the large size, and its
    sessions (dynamic and shape-fixed) run without ONNX Runtime's CPU arena, whose memory grows with
    every new input shape (docs/benchmarks.md)."""
    import deepfeat.backends.onnx_runtime as oxr

    traced = []
    real_export = oxr.export
    monkeypatch.setattr(oxr, "export", lambda fnet, shape, *a, **k: (traced.append(shape),
                                                                      real_export(fnet, shape, *a, **k)))
    fnet = FeatureNet(lite0, ["bn2"], get_pooling("gem"))
    ref, ort = TorchRunner(fnet, torch.device("cpu")), OnnxRunner(fnet, export="dynamic")
    im = _pixels(retrieval_images[:1], "long:640", lite0)[0][None]
    for _ in range(2):  # the dynamic session, then a shape-fixed one
        _assert_same(ort(im)[0], ref(im)[0])
    assert len(traced) == 1 and max(traced[0][:2]) <= oxr.TRACE_SIDE < max(im.shape[1:3])
    h, w = im.shape[1:3]
    assert (traced[0][0] > traced[0][1]) == (h > w)  # the image's aspect
    g = ort.graphs
    assert g.fixed_sessions == 1
    for sess in [g._dynamic, *g._fixed.values()]:
        assert sess.get_session_options().enable_cpu_mem_arena is False


def test_dynamic_graph_with_shape_constants_falls_back_to_static_graphs(lite0, retrieval_images, caplog):
    """R-MAC's region grid is a trace-time constant: the dynamic graph fails its check at a second
    shape and per-shape static graphs (bounded, least recently used out) take over, still exact."""
    fnet = FeatureNet(lite0, ["blocks.4"], get_pooling("rmac"))
    ref, ort = TorchRunner(fnet, torch.device("cpu")), OnnxRunner(fnet, export="dynamic")
    ort.graphs.max_static = 2
    images = _pixels(retrieval_images[:3], "long:160", lite0)
    for im in images + images[:1]:
        _assert_same(ort(im[None])[0], ref(im[None])[0])
    assert ort.export == "static" and ort.graphs.fallback_reason
    assert "does not match PyTorch" in caplog.text
    assert len({im.shape for im in images}) == 3
    # shapes 1, 2, 3 (1 out), 1 again (2 out): two graphs kept, 1 dynamic + 4 static exports
    assert ort.graphs.graphs == 2 and ort.graphs.evictions == 2 and ort.graphs.exports == 5


def test_auto_runs_shape_constant_networks_in_torch_with_one_export(collection, tmp_path, monkeypatch, caplog):
    """--backend auto with R-MAC at an aspect-preserving size: the dynamic graph fails its check once,
    and auto runs eager torch (one export in all, not one per image shape), with torch's descriptors;
    --backend onnx still takes per-shape static graphs (the user asked for ONNX Runtime)."""
    from deepfeat.backends import onnx_runtime

    exported = []
    real_export = onnx_runtime.export
    monkeypatch.setattr(onnx_runtime, "export", lambda *a, **k: (exported.append(a[3]), real_export(*a, **k)))
    if "deepfeat.backends.openvino_runtime" in __import__("sys").modules:  # it imported the name: count there too
        monkeypatch.setattr("deepfeat.backends.openvino_runtime.export", onnx_runtime.export)
    kw = dict(inputs=[str(collection)], size="long:160", pooling="rmac", layers=["blocks.4"], workers=0,
              progress="none", limit=6, post="none")
    extract(ExtractConfig(output=str(tmp_path / "auto"), **kw))
    extract(ExtractConfig(output=str(tmp_path / "torch"), backend="torch", **kw))
    auto, eager = FeatureStore(tmp_path / "auto"), FeatureStore(tmp_path / "torch")
    assert exported == ["dynamic"]  # one check, shared by every engine auto tried
    assert auto.meta["inference"]["backend"] == "torch"
    assert "DynamicGraphError" in caplog.text and "at other input sizes" in caplog.text
    assert auto.paths == eager.paths
    _assert_same(auto.raw(), eager.raw())
    exported.clear()
    extract(ExtractConfig(output=str(tmp_path / "onnx"), backend="onnx", **kw))
    assert exported[0] == "dynamic" and exported[1:] and set(exported[1:]) == {"static"}
    assert FeatureStore(tmp_path / "onnx").meta["inference"]["backend"] == "onnx"


def test_masked_pooling_over_padded_maps_equals_unpadded_pooling(lite0, photos):
    """Feature maps of real photos at three sizes, padded into one batch with large garbage values:
    masked pooling gives each map's own pooling (to float rounding)."""
    taps = FeatureNet(lite0, ["blocks.5"], get_pooling("avg")).taps
    maps = []
    for p, size in zip(list(photos.values())[:3], ("long:200", "long:150", "long:96")):
        px = decode_image(p, parse_size_policy(size), lite0.data_config).pixels
        with torch.inference_mode():
            fmap, _prefix = taps(lite0.normalize(torch.from_numpy(px)[None]))["blocks.5"]
            maps.append(fmap[0])
    h = max(m.shape[1] for m in maps) + 2
    w = max(m.shape[2] for m in maps) + 3
    padded = torch.full((len(maps), maps[0].shape[0], h, w), 50.0)
    for i, m in enumerate(maps):
        padded[i, :, : m.shape[1], : m.shape[2]] = m
    mask = valid_mask([tuple(m.shape[1:]) for m in maps], (h, w))
    for spec in ("sum", "avg", "spoc", "mac", "gem", "gem:p=6"):
        pooling = get_pooling(spec)
        got = masked_pool(padded, mask, pooling)
        want = torch.cat([pooling(m[None]) for m in maps])
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), spec  # float32 rounding of the sums
        assert not torch.allclose(got, pooling(padded), rtol=1e-3), spec  # unmasked pooling would differ
    for spec in ("rmac", "rgem", "crow", "spoc:center_prior=1"):
        with pytest.raises(UsageError, match="cannot pool padded batches"):
            check_maskable(get_pooling(spec))


def test_valid_map_size_is_the_unpadded_images_own_map(lite0):
    fnet = FeatureNet(lite0, ["blocks.3", "bn2"], get_pooling("avg"))
    for h, w in ((97, 130), (64, 64), (161, 33)):
        bh, bw = bucket_shape(h, w, 32)
        assert (bh % 32, bw % 32) == (0, 0) and bh >= h and bw >= w
        with torch.inference_mode():
            own = fnet.taps(torch.zeros(1, 3, h, w))
            big = fnet.taps(torch.zeros(1, 3, bh, bw))
        for name in fnet.layers:
            assert valid_map_size((h, w), (bh, bw), tuple(big[name][0].shape[2:])) == tuple(own[name][0].shape[2:])


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.5, 0.25)])  # every scale keeps 128 x 256 32-aligned
def test_padded_batches_match_unpadded_descriptors(lite0, retrieval_images, scales):
    """Padded, masked batches (the GPU path, run here on the CPU): exactly the unpadded descriptors
    when no padding is needed; each image's result independent of the others in its batch; and
    near the unpadded descriptor otherwise (convolutions see the padding near the border)."""
    fnet = FeatureNet(lite0, ["bn2"], get_pooling("gem"), scales)
    ref, padded = TorchRunner(fnet, torch.device("cpu")), PaddedTorchRunner(fnet, "cpu", multiple=32)
    photos = _pixels(retrieval_images[:3], "short:260", lite0)
    aligned = [np.ascontiguousarray(im[:128, :256]) for im in photos]
    _assert_same(padded.run_list(aligned)[0], ref(np.stack(aligned))[0])
    mixed = [np.ascontiguousarray(im[:h, :w]) for im, (h, w) in zip(photos, ((120, 250), (128, 256), (100, 230)))]
    together = padded.run_list(mixed)[0]  # all three in the 128 x 256 bucket (and 64 x 128, 32 x 64)
    for i, im in enumerate(mixed):
        _assert_same(together[i: i + 1], padded.run_list([im])[0])
    cos, _ = agreement(together, np.concatenate([ref(im[None])[0] for im in mixed]))
    assert cos > 0.8, cos  # not exact: docs/benchmarks.md measures it at long:512


def test_pad_to_refuses_poolings_without_a_mask_before_anything_is_written(collection, tmp_path):
    out = tmp_path / "s"
    with pytest.raises(UsageError, match="cannot pool padded batches"):
        extract(ExtractConfig(inputs=[str(collection)], output=str(out), size="long:224", pooling="rmac",
                              pad_to=32, workers=0, progress="none"))
    assert not out.exists()


def test_pad_to_refuses_transformer_tokens_before_anything_is_written(collection, tmp_path):
    """Padded patches would take part in attention and change every token: refused, in one line."""
    out = tmp_path / "s"
    with pytest.raises(UsageError, match="token sequence.*attention"):
        extract(ExtractConfig(inputs=[str(collection)], output=str(out), size="long:224", pooling="gem",
                              model="timm:vit_tiny_patch16_224@random", layers=["norm"], pad_to=32, workers=0,
                              progress="none"))
    assert not out.exists()


def test_padded_extraction_end_to_end(collection, tmp_path):
    """--pad-to on the torch backend: one batch for several shapes, descriptors near the exact ones."""
    kw = dict(size="long:224", pooling="gem", workers=0, progress="none", limit=8, post="none")
    extract(ExtractConfig(inputs=[str(collection)], output=str(tmp_path / "p"), pad_to=32, **kw))
    extract(ExtractConfig(inputs=[str(collection)], output=str(tmp_path / "e"), backend="torch", **kw))
    p, e = FeatureStore(tmp_path / "p"), FeatureStore(tmp_path / "e")
    assert p.meta["inference"] == {"backend": "torch", "precision": "f32", "device": "cpu", "pad_to": 32}
    assert p.paths == e.paths
    assert agreement(p.raw(), e.raw())[0] > 0.85  # padding is not exact (see above)


def test_append_with_another_backend_only_when_they_agree(collection, tmp_path, monkeypatch):
    """A store made with torch can be appended with ONNX Runtime (their descriptors agree on the
    store's own images, and the check is recorded); a store whose descriptors the new backend does
    not reproduce is refused with the numbers, and nothing is added."""
    kw = dict(size="long:224", pooling="gem", workers=0, progress="none", post="none")
    out = tmp_path / "s"
    extract(ExtractConfig(inputs=[str(collection / "a")], output=str(out), backend="torch", **kw))
    rep = extract(ExtractConfig(inputs=[str(collection / "a"), str(collection / "b")], output=str(out),
                                backend="onnx", **kw))
    store = FeatureStore(out)
    assert rep.processed == 12 and len(store) == 24
    check = store.meta["backend_check"]
    assert check["recorded"]["backend"] == "torch" and check["new"] == {"backend": "onnx", "precision": "f32",
                                                                         "export": "dynamic"}
    assert check["min_cosine"] >= COSINE_MIN and check["images"] == 3
    assert store.meta["inference"]["backend"] == "torch" and store.meta["inference_also"][0]["backend"] == "onnx"

    # a store whose rows the new backend does not reproduce (here: the new backend's descriptors
    # perturbed; a store's files edited on disk are refused earlier, as damaged: tests/test_trust_store.py)
    bad = tmp_path / "bad"
    extract(ExtractConfig(inputs=[str(collection / "a")], output=str(bad), backend="torch", **kw))
    before = sorted(p.name for p in (bad / "shards").iterdir())
    from deepfeat.backends.featurenet import OnnxRunner

    agreeing = OnnxRunner.__call__
    rng = np.random.default_rng(0)
    monkeypatch.setattr(OnnxRunner, "__call__", lambda self, px: [
        a + rng.normal(0, a.std(), a.shape).astype(a.dtype) for a in agreeing(self, px)])
    with pytest.raises(StoreError, match=r"backend torch .* other descriptors .*cosine"):
        extract(ExtractConfig(inputs=[str(collection)], output=str(bad), backend="onnx", **kw))
    monkeypatch.setattr(OnnxRunner, "__call__", agreeing)
    assert sorted(p.name for p in (bad / "shards").iterdir()) == before
    # the same backend appends without a check
    rep = extract(ExtractConfig(inputs=[str(collection)], output=str(bad), backend="torch", **kw))
    assert rep.processed == 12 and "backend_check" not in FeatureStore(bad).meta


def test_threads_flag_and_defaults(collection, tmp_path, capsys):
    from deepfeat.backends.onnx_runtime import default_threads, work_pixels
    from deepfeat.backends.openvino_setup import available
    from deepfeat.cli import main

    assert default_threads(2) == (2, 2) and default_threads(1) == (1, 1)  # measured best on 2 cores at 224
    t, w = default_threads(16)
    assert t + w >= 16 and t >= 2 and w >= 2
    # from long:512 up decoding gets half the cores (measured on a quiet 2-core machine)
    assert work_pixels("long:1024") == 1024 * 1024 and work_pixels("model") is None
    assert work_pixels("long:512", (1.0, 0.5)) == 512 * 512 * 1.25
    assert default_threads(2, work_pixels("long:1024")) == (2, 1)
    assert default_threads(2, work_pixels("long:512")) == (2, 1)
    assert default_threads(2, work_pixels("long:384")) == (2, 2)
    with pytest.raises(UsageError, match="--threads"):
        ExtractConfig(inputs=["x"], output=str(tmp_path / "o"), threads=0).validate()
    rc = main(["extract", str(collection / "a"), "-o", str(tmp_path / "t"), "--size", "long:160", "--threads", "1",
               "--workers", "1", "--progress", "none", "--limit", "3"])
    assert rc == 0 and ("backend onnx" if not available() else "backend openvino") in capsys.readouterr().out
    assert torch.get_num_threads() == max(1, min(2, __import__("os").cpu_count() or 1))  # restored after the run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_paths_agree_with_the_cpu(lite0, retrieval_images):  # pragma: no cover - no GPU in CI
    fnet_cpu = FeatureNet(lite0, ["bn2"], get_pooling("gem"))
    images = _pixels(retrieval_images, "long:320", lite0)
    want = np.concatenate([TorchRunner(fnet_cpu, torch.device("cpu"))(im[None])[0] for im in images])
    import copy

    fnet = copy.deepcopy(fnet_cpu).to("cuda")
    eager = np.concatenate([TorchRunner(fnet, torch.device("cuda"))(im[None])[0] for im in images])
    padded = PaddedTorchRunner(fnet, "cuda", multiple=32).run_list(images)[0]
    assert agreement(eager, want)[0] > 0.999  # TF32 convolutions
    assert agreement(padded, want)[0] > 0.98
