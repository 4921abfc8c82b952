"""The extraction pipeline and the feature store, end to end on real photos."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from deepfeat.backends.featurenet import FeatureNet
from deepfeat.cli import main
from deepfeat.data.images import decode_image, discover
from deepfeat.data.preprocess import parse_size_policy
from deepfeat.errors import StoreError, UsageError
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.pipeline.faults import ENV as FAULTS
from deepfeat.pooling import get_pooling
from deepfeat.store import FeatureStore

FAST = dict(workers=0, progress="none", batch_size=8)


def _cfg(inputs, out, **kw) -> ExtractConfig:
    return ExtractConfig(inputs=[str(i) for i in inputs], output=str(out), **{**FAST, **kw})


def _reference(model, path, size, layer, pool) -> np.ndarray:
    """The descriptor of one image computed directly, one image at a time."""
    px = decode_image(path, parse_size_policy(size), model.data_config).pixels
    fnet = FeatureNet(model, [layer], get_pooling(pool))
    with torch.inference_mode():
        return fnet(torch.from_numpy(px)[None])[0][0].numpy()


def test_default_extract_just_works(collection, tmp_path, lite0):
    rep = extract(_cfg([collection], tmp_path / "s"))
    assert rep.ok == 24 and rep.failed == 0
    store = FeatureStore(tmp_path / "s")
    assert len(store) == 24 and store.dim == 1280
    assert store.meta["layers"] == ["bn2"] and store.meta["pooling"].startswith("gem")
    assert store.meta["model"]["spec"] == "efficientnet_lite0" and len(store.meta["model"]["weights_sha256"]) == 64
    X = store.vectors()
    assert X.shape == (24, 1280) and X.dtype == np.float32
    assert np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)  # default post = l2
    # row i belongs to path i: equal to the descriptor computed for that file alone
    for row in (0, 7, 23):
        ref = _reference(lite0, store.paths[row], "model", "bn2", store.meta["pooling"])
        assert np.allclose(store.raw()[row], ref, rtol=1e-4, atol=1e-5)
    items = store.items()
    assert items.column("id").to_pylist() == list(range(24))
    assert set(items.column("status").to_pylist()) == {"ok"}
    assert (tmp_path / "s" / "items.parquet").is_file()


@pytest.mark.parametrize("size", ["short:200", "long:256", "native", "warp:160x200"])
def test_size_policies_bucket_without_distortion(collection, tmp_path, lite0, size):
    store_dir = tmp_path / "s"
    extract(_cfg([collection], store_dir, size=size, layers=["blocks.4"], pooling="mac", post="none",
                 shard_size=10))
    store = FeatureStore(store_dir)
    assert len(store) == 24 and store.meta["size"] == size
    for row in (1, 12, 22):
        ref = _reference(lite0, store.paths[row], size, "blocks.4", "mac")
        assert np.allclose(store.raw()[row], ref, rtol=1e-4, atol=1e-5), store.paths[row]
    # sizes recorded are the originals
    w = store.items().column("width").to_pylist()
    assert set(w) <= {240, 300, 320, 400}


def test_input_forms(collection, tmp_path):
    files = discover([collection])
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(files[:3]) + "\n")
    inputs = [f"@{lst}", str(collection / "b" / "*.jpg"), files[5]]
    extract(_cfg(inputs, tmp_path / "s", pooling="mac"))
    store = FeatureStore(tmp_path / "s")
    expected = discover(inputs)
    assert store.paths == expected and len(expected) > 5


def test_backends_agree(collection, tmp_path):
    extract(_cfg([collection], tmp_path / "t", limit=10, pooling="gem"))
    extract(_cfg([collection], tmp_path / "o", limit=10, pooling="gem", backend="onnx"))
    a, b = FeatureStore(tmp_path / "t").vectors(), FeatureStore(tmp_path / "o").vectors()
    assert FeatureStore(tmp_path / "t").paths == FeatureStore(tmp_path / "o").paths
    cos = (a * b).sum(1)
    assert cos.min() > 0.9999
    assert np.abs(a - b).max() < 1e-4


@pytest.mark.slow
def test_backends_agree_variable_size_rmac(collection, tmp_path):
    kw = dict(limit=8, pooling="rmac", size="long:224", post="none", shard_size=4)
    extract(_cfg([collection], tmp_path / "t", **kw))
    extract(_cfg([collection], tmp_path / "o", backend="onnx", **kw))
    a, b = FeatureStore(tmp_path / "t").raw(), FeatureStore(tmp_path / "o").raw()
    assert np.abs(a - b).max() < 1e-4


def test_broken_images_are_recorded_not_fatal(collection, odd_images, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(collection / "a", mixed)
    for name in ("empty.jpg", "not_image.jpg", "truncated.jpg", "bad_crc.png", "bomb.png", "cmyk.jpg",
                 "gray16.png", "exif_rotated.jpg", "palette_alpha.png"):
        shutil.copy(odd_images[name], mixed / f"odd_{name}")
    rep = extract(_cfg([mixed], tmp_path / "s", workers=2))
    store = FeatureStore(tmp_path / "s")
    failed = {Path(p).name: e for p, e in zip(store.failed().column("path").to_pylist(),
                                              store.failed().column("error").to_pylist())}
    assert set(failed) == {"odd_empty.jpg", "odd_not_image.jpg", "odd_truncated.jpg", "odd_bad_crc.png",
                           "odd_bomb.png"}
    assert "truncated" in failed["odd_truncated.jpg"] and "empty" in failed["odd_empty.jpg"]
    assert rep.failed == 5 and rep.ok == 12 + 4 and len(store) == 16
    assert rep.failures_report and Path(rep.failures_report).read_text().count("\n") == 6
    notes = dict(zip(store.ok_items().column("path").to_pylist(), store.ok_items().column("notes").to_pylist()))
    assert notes[str(mixed / "odd_cmyk.jpg")] == "cmyk"


def test_append_and_meta_mismatch(collection, tmp_path):
    out = tmp_path / "s"
    extract(_cfg([collection / "a"], out, pooling="mac"))
    n_a = len(FeatureStore(out))
    rep = extract(_cfg([collection / "a", collection / "b"], out, pooling="mac"))
    store = FeatureStore(out)
    assert len(store) == 24 and rep.processed == 24 - n_a  # only the new images were processed
    assert store.ids.tolist() == list(range(24))
    with pytest.raises(StoreError, match="pooling"):
        extract(_cfg([collection], out, pooling="gem"))
    with pytest.raises(StoreError, match="non-empty directory"):
        other = tmp_path / "other"
        other.mkdir()
        (other / "x.txt").write_text("x")
        extract(_cfg([collection], other))


def test_exports_round_trip(collection, tmp_path, capsys):
    out = tmp_path / "s"
    extract(_cfg([collection], out, limit=6, pooling="mac"))
    store = FeatureStore(out)
    X = store.vectors()
    for fmt in ("npz", "h5", "pkl", "csv"):
        f = tmp_path / f"feats.{fmt}"
        assert main(["export", str(out), "-o", str(f)]) == 0
        if fmt == "npz":
            z = np.load(f, allow_pickle=False)
            assert np.array_equal(z["features"], X) and z["paths"].tolist() == store.paths
            assert json.loads(str(z["meta"]))["pooling"] == "mac"
        elif fmt == "h5":
            import h5py

            with h5py.File(f) as h:
                assert np.array_equal(h["features"][()], X)
                assert [p.decode() for p in h["paths"][()]] == store.paths
        elif fmt == "pkl":
            with open(f, "rb") as fh:  # our own file
                d = pickle.load(fh)
            assert list(d) == store.paths and np.array_equal(np.stack(list(d.values())), X)
        else:
            rows = f.read_text().splitlines()
            assert rows[0].startswith("id,path,f0,f1")
            vals = np.array([[float(v) for v in r.split(",")[2:]] for r in rows[1:]], dtype=np.float32)
            assert np.array_equal(vals, X)
    assert main(["info", str(out)]) == 0
    assert "features: 6" in capsys.readouterr().out


def test_float16_and_multiscale_and_two_layers(collection, tmp_path, lite0):
    out = tmp_path / "s"
    extract(_cfg([collection], out, limit=4, layers=["blocks.5", "bn2"], pooling="gem", dtype="float16",
                 scales=(1.0, 0.707), post="none"))
    store = FeatureStore(out)
    assert store.feature_names == ["blocks.5", "bn2"]
    a = next(store.features("blocks.5"))[1]
    assert a.dtype == np.float16 and a.shape == (4, 192)
    assert store.raw("bn2").shape == (4, 1280)


def test_usage_errors(tmp_path, collection):
    with pytest.raises(UsageError, match="backend"):
        extract(_cfg([collection], tmp_path / "s", backend="tf"))
    with pytest.raises(UsageError, match="size policy"):
        extract(_cfg([collection], tmp_path / "s", size="huge"))
    with pytest.raises(UsageError, match="not an existing feature store"):
        extract(_cfg([], tmp_path / "nothing", resume=True))
    assert main(["extract", str(collection), "-o", str(tmp_path / "x"), "--pool", "bogus"]) == 2


def _extract_cmd(collection, out):
    return [sys.executable, "-m", "deepfeat.cli", "extract", str(collection), "-o", str(out), "--shard-size", "3",
            "--batch-size", "3", "--workers", "1", "--pool", "gem", "--progress", "lines"]


def _store_bytes(out: Path) -> dict[str, bytes]:
    files = {}
    for f in sorted((out / "shards").iterdir()):
        if f.suffix == ".npy":
            files[f.name] = f.read_bytes()
    t = pq.read_table(out / "items.parquet")
    files["items"] = json.dumps(t.to_pylist()).encode()
    return files


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume_is_identical(collection, tmp_path, sig):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_extract_cmd(collection, ref), check=True, env=env, capture_output=True)
    out = tmp_path / "run"
    # the run waits for the signal once it has committed 2 of its 8 shards (deepfeat.pipeline.faults)
    proc = subprocess.Popen(_extract_cmd(collection, out), env={**env, FAULTS: "commit-hang=2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = []
    for line in proc.stderr:  # until the run says it waits (or ends without saying so)
        seen.append(line)
        if line.startswith(b"fault: 2 shard(s) committed"):
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    err = b"".join(seen) + err
    n_before = len(list((out / "shards").glob("*.items.parquet")))
    assert 0 < n_before < 8
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and b"interrupted" in err
    if sig == signal.SIGTERM:  # a service manager's stop: the same clean stop, its own exit code
        assert proc.returncode == 143 and b"terminated (SIGTERM): committed shards are kept" in err
    res = subprocess.run(_extract_cmd(collection, out), env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert f"{n_before} shard(s) were already done" in res.stdout
    assert _store_bytes(out) == _store_bytes(ref)
    # --resume alone (no inputs, no flags) finds nothing left to do
    assert main(["extract", "--resume", "-o", str(out), "--progress", "none", "--workers", "0"]) == 0


def test_check_images_cli(odd_images, tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    for name, p in odd_images.items():
        shutil.copy(p, d / name)
    report = tmp_path / "report.json"
    bad = tmp_path / "bad"
    rc = main(["check-images", str(d), "--report", str(report), "--move-bad", str(bad)])
    assert rc == 1
    rows = {Path(r["path"]).name: r for r in json.loads(report.read_text())}
    errors = {n for n, r in rows.items() if r["status"] == "error"}
    assert errors == {"empty.jpg", "not_image.jpg", "truncated.jpg", "bad_crc.png", "bomb.png"}
    warn = {n: r["problems"] for n, r in rows.items() if r["status"] == "warning"}
    assert any("CMYK" in p for p in warn["cmyk.jpg"])
    assert any("16-bit" in p for p in warn["gray16.png"])
    assert any("EXIF" in p for p in warn["exif_rotated.jpg"])
    assert any("transparency" in p for p in warn["palette_alpha.png"])
    assert sorted(p.name for p in bad.iterdir()) == sorted(errors)
    assert not (d / "truncated.jpg").exists()
    assert "5 unusable" in capsys.readouterr().err


def test_mop_codebook_fitted_saved_and_reused(collection, tmp_path):
    out = tmp_path / "s"
    extract(_cfg([collection], out, limit=12, layers=["blocks.5"], pooling="mop:k=4,local=16,dim=4",
                 post="none", pool_fit_samples=8))
    store = FeatureStore(out)
    assert (out / "pooling.npz").is_file() and len(store) == 12
    X = store.raw()
    assert np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-4)
    # appending reuses the saved codebook, so old rows and new rows are comparable
    extract(_cfg([collection], out, layers=["blocks.5"], pooling="mop:k=4,local=16,dim=4", post="none"))
    assert np.array_equal(FeatureStore(out).raw()[:12], X)


def test_pca_whitening_chain_fitted_and_changed_without_reextraction(collection, tmp_path, capsys):
    out = tmp_path / "s"
    extract(_cfg([collection], out, pooling="gem", post="pca-whiten:8,l2"))
    store = FeatureStore(out)
    assert (out / "post.npz").is_file() and store.vectors().shape == (24, 8)
    raw_before = store.raw().copy()
    assert main(["postprocess", str(out), "--post", "pca:4"]) == 0
    store = FeatureStore(out)
    assert store.vectors().shape == (24, 4) and np.array_equal(store.raw(), raw_before)
    assert main(["postprocess", str(out), "--post", "l2"]) == 0
    assert not (out / "post.npz").exists() and FeatureStore(out).vectors().shape == (24, 1280)


def test_post_from_a_saved_chain_file_and_bad_chains_fail_before_extracting(collection, tmp_path):
    """--post FILE.npz uses a chain fitted elsewhere (as it is); a bad chain fails at once."""
    fitted = tmp_path / "fitted"
    extract(_cfg([collection], fitted, pooling="gem", post="pca-whiten:8,l2", limit=16))
    other = tmp_path / "other"
    extract(_cfg([collection], other, pooling="gem", post=str(fitted / "post.npz")))
    store = FeatureStore(other)
    assert store.meta["post"] == "pca-whiten:8,l2" and store.meta["post_fitted_on"] == str(fitted / "post.npz")
    want = FeatureStore(fitted).post.apply(store.raw())  # fitted on 16 images, applied to all 24
    np.testing.assert_array_equal(store.vectors(), want)
    with pytest.raises(UsageError, match="post-processes 1280-D descriptors but this store's are 40-D"):
        extract(_cfg([collection], tmp_path / "wrongdim", layers=["blocks.2"], pooling="gem",
                     post=str(fitted / "post.npz")))
    assert not (tmp_path / "wrongdim").exists()
    assert main(["postprocess", str(fitted), "--post", "pca:4"]) == 0
    assert main(["postprocess", str(fitted), "--post", str(other / "post.npz")]) == 0
    np.testing.assert_array_equal(FeatureStore(fitted).vectors(), want[:16])
    for bad, msg in (("pca-whitn:8", "unknown post-processing step"), (str(tmp_path / "nope.npz"), "not found")):
        with pytest.raises(UsageError, match=msg):
            extract(_cfg([collection], tmp_path / "bad", post=bad))
        assert not (tmp_path / "bad").exists()  # nothing extracted, nothing written


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory, photos) -> Path:
    """Real photos saved large enough (and at awkward sizes) for JPEG draft decoding to kick in."""
    root = tmp_path_factory.mktemp("large")
    sizes = [(1037, 771), (771, 1037), (1201, 899), (997, 997), (1333, 750)]
    for (name, p), (w, h) in zip(photos.items(), sizes):
        Image.open(p).convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(root / f"{name}.jpg", quality=90)
    return root


@pytest.mark.parametrize("size", ["long:160", "short:150", "model"])
def test_draft_decoded_sizes_match_the_plan(large_jpegs, tmp_path, lite0, size):
    """Header-predicted sizes (used to batch) equal the draft-decoded sizes: no crash, same features."""
    extract(_cfg([large_jpegs], tmp_path / "s", size=size, layers=["blocks.5"], pooling="gem", post="none",
                 workers=1, batch_size=5))
    store = FeatureStore(tmp_path / "s")
    assert len(store) == 5
    for row in range(5):
        ref = _reference(lite0, store.paths[row], size, "blocks.5", "gem")
        assert np.allclose(store.raw()[row], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("where", ["array", "items"])
def test_full_disk_is_reported_and_loses_nothing(collection, tmp_path, monkeypatch, where):
    """ENOSPC while writing a shard (in its array, or after its array, in its items file, the
    commit marker): a clear error, earlier shards kept, no temp files left, and the same command
    completes the store once there is space again. (tests/test_reliability.py fills a real
    file system in the middle of a shard.)"""
    import errno

    import deepfeat.store.atomic as store_mod

    real_save, real_write = np.save, store_mod.pq.write_table
    calls = {"n": 0}

    def full_after_two(f, arr, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            f.write(b"partial")  # the disk fills half-way through a shard's array
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, arr, **kw)

    def items_full_after_two(table, where, **kw):  # calls: the plan, then one per shard
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(table, where, **kw)

    out = tmp_path / "s"
    if where == "array":
        monkeypatch.setattr(store_mod.np, "save", full_after_two)
    else:
        monkeypatch.setattr(store_mod.pq, "write_table", items_full_after_two)
    with pytest.raises(StoreError, match="No space left on device.*free space and run the same command"):
        extract(_cfg([collection], out, shard_size=5, pooling="mac"))
    assert FeatureStore(out).committed_shards() == [0, 1]
    assert not [f for f in (out / "shards").iterdir() if ".tmp-" in f.name]
    monkeypatch.setattr(store_mod.np, "save", real_save)
    monkeypatch.setattr(store_mod.pq, "write_table", real_write)
    rep = extract(_cfg([collection], out, shard_size=5, pooling="mac"))
    assert rep.skipped_shards == 2 and len(FeatureStore(out)) == 24
    ref = tmp_path / "ref"
    extract(_cfg([collection], ref, shard_size=5, pooling="mac"))
    assert np.array_equal(FeatureStore(out).raw(), FeatureStore(ref).raw())


def test_onnx_static_batch_pads_and_splits(lite0):
    """The ONNX runner's static-batch graph: a short batch is padded, a long one split, and each
    image's descriptor is the same as when it is computed with other images."""
    from deepfeat.backends.featurenet import OnnxRunner, TorchRunner

    fnet = FeatureNet(lite0, ["blocks.4"], get_pooling("gem"))
    x = np.random.default_rng(0).integers(0, 256, (7, 96, 96, 3), dtype=np.uint8)
    ref = TorchRunner(fnet, torch.device("cpu"))(x)[0]
    r = OnnxRunner(fnet, batch_size=3)
    for chunk in (x[:1], x[:3], x):  # padded 1 -> 3, exact, split 7 -> 3 + 3 + 1
        out = r(chunk)[0]
        assert out.shape == (len(chunk), ref.shape[1])
        assert np.abs(out - ref[: len(chunk)]).max() < 1e-4
    assert r.graphs.graphs == 1 and r.export == "static"  # one graph for every batch size


def test_auto_backend_choice_and_fallback(collection, tmp_path, lite0, caplog):
    from deepfeat.backends import openvino_setup

    rep = extract(_cfg([collection], tmp_path / "a", limit=4, pooling="mac"))
    assert rep.backend == "onnx"  # one shape on the CPU: ONNX Runtime
    rep = extract(_cfg([collection], tmp_path / "b", limit=4, pooling="mac", size="long:128"))
    many = "openvino" if openvino_setup.available() else "onnx"  # many shapes on the CPU: a dynamic-shape graph
    assert rep.backend == many
    assert FeatureStore(tmp_path / "b").meta["inference"] == {"backend": many, "precision": "f32", "export": "dynamic"}
    rep = extract(_cfg([collection], tmp_path / "c", limit=4, pooling="mac", size="long:128", device="cpu",
                       backend="torch"))
    assert rep.backend == "torch" and FeatureStore(tmp_path / "c").meta["inference"]["backend"] == "torch"

    from deepfeat.backends.featurenet import FallbackRunner, TorchRunner

    class Broken:
        name = "onnx"

        def __call__(self, pixels):
            raise RuntimeError("Exporting the operator 'aten::weird' to ONNX opset 17 is not supported")

    fnet = FeatureNet(lite0, ["blocks.2"], get_pooling("mac"))
    r = FallbackRunner(Broken(), TorchRunner(fnet, torch.device("cpu")))
    x = np.zeros((2, 64, 64, 3), np.uint8)
    out = r(x)[0]
    assert out.shape[0] == 2 and r.name == "torch"
    assert "onnx backend unavailable" in caplog.text and "aten::weird" in caplog.text


def test_relative_paths_work_from_any_folder(collection, tmp_path, monkeypatch):
    """Stores keep paths as given; relative ones resolve against the folder the extraction
    ran in, and appending from elsewhere keeps them consistent."""
    monkeypatch.chdir(collection)
    out = tmp_path / "s"
    extract(_cfg(["a"], out, pooling="mac"))
    st = FeatureStore(out)
    assert st.paths[0].startswith("a/") and st.meta["root"] == str(collection)
    monkeypatch.chdir(tmp_path)
    assert Path(st.resolve_path(st.paths[0])).is_file()
    rep = extract(_cfg([str(collection / "a"), os.path.relpath(collection / "b", tmp_path)], out, pooling="mac"))
    st = FeatureStore(out)
    assert rep.processed == 12 and len(st) == 24  # "a" already known, "b" appended
    assert all(p.startswith(("a/", "b/")) for p in st.paths[:12] + [q for q in st.paths if q.startswith("b/")])
    assert all(Path(st.resolve_path(p)).is_file() for p in st.paths)


def test_aspect_preserving_batches_are_one_shape_and_capped_in_pixels():
    from deepfeat.pipeline import CPU_BATCH_PIXELS, shard_batches

    items = [(i, f"{i}.jpg") for i in range(12)]
    sizes = [(224, 224)] * 6 + [(512, 384)] * 3 + [(160, 224), "unreadable header", (224, 224)]
    policy = parse_size_policy("long:512")
    batches, bad = shard_batches(items, policy, 8, sizes)
    assert bad == {10: "unreadable header"}
    assert [[i for i, _ in b] for b in batches] == [[0, 1, 2, 3, 4, 5, 11], [6, 7, 8], [9]]
    batches, _ = shard_batches(items, policy, 8, sizes, CPU_BATCH_PIXELS)
    # 4 x 224 x 224 pixels at most: four 224 x 224 images, one 512 x 384, five 160 x 224 (capped at 8)
    assert [[i for i, _ in b] for b in batches] == [[0, 1, 2, 3], [4, 5, 11], [6], [7], [8], [9]]
    fixed, _ = shard_batches(items, parse_size_policy("model"), 5, None, CPU_BATCH_PIXELS)
    assert [len(b) for b in fixed] == [5, 5, 2]  # fixed-size policies: batch size only


def test_decoding_runs_ahead_of_inference_by_a_bounded_number_of_images():
    """The local engine gives batches to the decoders as inference takes them: never more than
    ahead_images images decoded but not inferred (beyond the first 2 x workers batches), every batch
    inferred in plan order, every shard committed. A whole shard decoded ahead of a slow inference
    held 2.4 GB at long:1024 (docs/benchmarks.md)."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from deepfeat.pipeline import local_engine as local
    from deepfeat.pipeline.config import ExtractReport
    from deepfeat.pipeline.progress import Progress
    from deepfeat.pipeline.shard import ShardJob

    state = {"submitted": 0, "inferred": 0, "most_ahead": 0, "order": [], "committed": []}

    class Decoders:
        def submit(self, fn, batch):
            assert fn is local.decode_batch
            state["submitted"] += len(batch)
            state["most_ahead"] = max(state["most_ahead"], state["submitted"] - state["inferred"])
            fut = Future()
            fut.set_result(batch)
            return fut

    class Processor:
        store = SimpleNamespace(meta={"inference": {"backend": "fake"}})
        runner = SimpleNamespace(name="fake")

        def plan(self, shard, items, executor, workers):
            return ShardJob(shard, items, [items[i: i + 3] for i in range(0, len(items), 3)], {})

        def infer(self, job, batch):
            state["inferred"] += len(batch)
            state["order"] += [i for i, _ in batch]
            job.left -= 1
            return len(batch)

        def commit(self, job):
            state["committed"].append(job.shard)
            return len(job.items), 0

    by_shard = OrderedDict((s, [(s * 100 + i, f"img{i}.jpg") for i in range(30)]) for s in range(3))
    report = ExtractReport(store="x")
    local._schedule(Processor(), Decoders(), 1, by_shard, report, Progress(90, 0, "none"), {}, None, 0.0,
                    ahead_images=7)
    assert state["order"] == [i for items in by_shard.values() for i, _ in items]
    assert state["committed"] == [0, 1, 2] and report.ok == 90
    assert state["most_ahead"] <= 7  # 2 batches of 3 at least, then only while 7 images or fewer
    assert local.decode_ahead(parse_size_policy("long:1024"), None, None) == 85
    assert local.decode_ahead(parse_size_policy("model"), SimpleNamespace(input_size=(224, 224)), None) > 1024
