"""Prepared networks (issue 30, "a fast first answer"): after one run has exported a network and run
it in ONNX Runtime, the next ``extract``, ``search STORE photo.jpg`` and ``classify`` of the same
network run from the graph cache without importing PyTorch, and give the same numbers.

Each command runs in a fresh process (the only place "PyTorch was not imported" can be seen), with a
private cache folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
from deepfeat.backends.prepared import cpu_only  # noqa: E402

# the commands run with their default device (auto): prepared networks are for runs that surely use the CPU
pytestmark = pytest.mark.skipif(not cpu_only("auto"), reason="a GPU device node is present: --device auto "
                                                              "runs on the GPU, where nothing is prepared")

REPO = Path(__file__).resolve().parents[1]
#: runs the CLI, then says on stderr whether PyTorch was imported
RUN = ("import sys; from deepfeat.cli import main; rc = main(sys.argv[1:]); "
       "print('TORCH=%s' % ('torch' in sys.modules), file=sys.stderr); sys.exit(rc)")


def deepfeat(cache: Path, *args: str) -> tuple[str, bool, str]:
    """(stdout, whether torch was imported, stderr) of one ``deepfeat`` command in a fresh process."""
    env = {**os.environ, "DEEPFEAT_CACHE": str(cache), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", RUN, *args], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TORCH=" in proc.stderr, proc.stderr[-3000:]
    return proc.stdout, "TORCH=True" in proc.stderr, proc.stderr


@pytest.fixture
def folder(photos, tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for name in ("chelsea", "coffee"):
        shutil.copy(photos[name], d / f"{name}.jpg")
    return d


def _same_store(a: Path, b: Path) -> None:
    from deepfeat.store import FeatureStore

    sa, sb = FeatureStore(a), FeatureStore(b)
    for k in ("model", "layers", "pooling", "pooling_params", "features", "size", "inference"):
        assert sa.meta[k] == sb.meta[k], k
    assert sa.items().column("path").to_pylist() == sb.items().column("path").to_pylist()
    np.testing.assert_array_equal(sa.raw(), sb.raw())  # the same graph: bit for bit


@pytest.mark.parametrize("extra", [(), ("--backend", "onnx", "--size", "long:200")], ids=["static", "dynamic"])
def test_warm_extract_runs_without_pytorch_and_gives_the_same_store(folder, tmp_path, extra):
    cache = tmp_path / "cache"
    _, torch_cold, _ = deepfeat(cache, "extract", str(folder), "-o", str(tmp_path / "cold"), "--progress", "none",
                                *extra)
    assert torch_cold
    assert len(list((cache / "prepared").glob("*.json"))) == 3  # as given, as a sync gives them, for search
    _, torch_warm, err = deepfeat(cache, "-v", "extract", str(folder), "-o", str(tmp_path / "warm"), "--progress",
                                  "none", *extra)
    assert not torch_warm, err[-2000:]
    assert "prepared from the graph cache" in err
    _same_store(tmp_path / "cold", tmp_path / "warm")


def test_a_sync_of_the_store_runs_without_pytorch(folder, photos, tmp_path):
    cache = tmp_path / "cache"
    store = tmp_path / "store"
    deepfeat(cache, "extract", str(folder), "-o", str(store), "--progress", "none")
    shutil.copy(photos["rocket"], folder / "rocket.jpg")
    _, torch_used, err = deepfeat(cache, "sync", str(store), "--progress", "none")
    assert not torch_used, err[-2000:]
    deepfeat(cache, "extract", str(folder), "-o", str(tmp_path / "fresh"), "--progress", "none")
    _same_store(store, tmp_path / "fresh")  # the synced store is a fresh extraction of the folder


def test_a_changed_weights_file_or_a_damaged_graph_sends_the_run_back_to_pytorch(folder, tmp_path, lite0):
    import torch

    weights = tmp_path / "lite0.pth"
    torch.save(lite0.net.state_dict(), weights)
    spec = f"timm:tf_efficientnet_lite0@{weights}"
    cache = tmp_path / "cache"
    args = ("extract", str(folder), "--model", spec, "--progress", "none")
    deepfeat(cache, *args, "-o", str(tmp_path / "cold"))
    assert not deepfeat(cache, *args, "-o", str(tmp_path / "warm"))[1]

    st = weights.stat()  # the same bytes, a new modification time: the entry is not trusted
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, torch_used, err = deepfeat(cache, "-v", *args, "-o", str(tmp_path / "touched"))
    assert torch_used and "changed since the graph was prepared" in err
    assert not deepfeat(cache, *args, "-o", str(tmp_path / "again"))[1]  # prepared afresh by that run

    for graph in (cache / "graphs").glob("*/graph.onnx"):
        graph.write_bytes(b"not an onnx graph")
    _, torch_used, err = deepfeat(cache, *args, "-o", str(tmp_path / "damaged"))
    assert torch_used and "does not load" in err
    for name in ("warm", "touched", "again", "damaged"):
        _same_store(tmp_path / "cold", tmp_path / name)


def test_the_same_relative_weights_path_in_another_folder_is_another_network(folder, tmp_path, lite0):
    import torch

    from deepfeat.store import FeatureStore

    state = lite0.net.state_dict()
    other = {k: (v * 0.5 if k == "conv_stem.weight" else v) for k, v in state.items()}
    for name, sd in (("a", state), ("b", other)):
        (tmp_path / name).mkdir()
        torch.save(sd, tmp_path / name / "w.pth")
    env = {**os.environ, "DEEPFEAT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO / "src")}

    def extract_in(name: str, store: str) -> bool:
        """Extract with the spec "...@w.pth" from folder *name*; whether PyTorch was imported."""
        proc = subprocess.run([sys.executable, "-c", RUN, "extract", str(folder), "-o", store, "--model",
                               "timm:tf_efficientnet_lite0@w.pth", "--progress", "none"], cwd=tmp_path / name,
                              env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return "TORCH=True" in proc.stderr

    assert extract_in("a", "cold") and not extract_in("a", "warm")
    assert extract_in("b", "cold")  # "w.pth" is another file here: a's prepared network is not used
    assert not extract_in("b", "warm")
    a, b = (FeatureStore(tmp_path / n / "cold") for n in ("a", "b"))
    assert not np.allclose(a.raw(), b.raw(), atol=1e-3)
    _same_store(tmp_path / "a" / "cold", tmp_path / "a" / "warm")
    _same_store(tmp_path / "b" / "cold", tmp_path / "b" / "warm")


def test_no_cache_neither_reads_nor_writes_prepared_entries(folder, tmp_path):
    cache = tmp_path / "cache"
    _, torch_used, _ = deepfeat(cache, "extract", str(folder), "-o", str(tmp_path / "a"), "--progress", "none",
                                "--no-cache")
    assert torch_used and not (cache / "prepared").exists()
    deepfeat(cache, "extract", str(folder), "-o", str(tmp_path / "b"), "--progress", "none")
    _, torch_used, _ = deepfeat(cache, "extract", str(folder), "-o", str(tmp_path / "c"), "--progress", "none",
                                "--no-cache")
    assert torch_used
    _same_store(tmp_path / "b", tmp_path / "c")


def test_two_processes_preparing_at_once_both_succeed_and_agree(folder, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "DEEPFEAT_CACHE": str(cache), "PYTHONPATH": str(REPO / "src")}
    procs = [subprocess.Popen([sys.executable, "-m", "deepfeat", "extract", str(folder), "-o", str(tmp_path / f"s{i}"),
                               "--progress", "none"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    _same_store(tmp_path / "s0", tmp_path / "s1")
    for entry in (cache / "prepared").glob("*.json"):
        json.loads(entry.read_text())  # whole files only (written by rename)
    assert not deepfeat(cache, "extract", str(folder), "-o", str(tmp_path / "warm"), "--progress", "none")[1]
    _same_store(tmp_path / "s0", tmp_path / "warm")


def test_search_embeds_an_image_query_with_the_prepared_graph(folder, photos, tmp_path):
    cache = tmp_path / "cache"
    store = tmp_path / "store"
    deepfeat(cache, "extract", str(folder), "-o", str(store), "--progress", "none")
    query = ["search", str(store), photos["astronaut"], "--json"]
    out, torch_used, _ = deepfeat(cache, *query)
    assert not torch_used
    eager, torch_used, _ = deepfeat(cache, *query, "--no-cache")
    assert torch_used
    got, want = json.loads(out)[0]["hits"], json.loads(eager)[0]["hits"]
    assert [h["path"] for h in got] == [h["path"] for h in want]
    np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in want], atol=1e-5)


def test_duplicates_query_embeds_new_images_with_the_prepared_graph(folder, photos, tmp_path):
    cache = tmp_path / "cache"
    store = tmp_path / "store"
    deepfeat(cache, "extract", str(folder), "-o", str(store), "--progress", "none")
    shutil.copy(photos["chelsea"], tmp_path / "again.jpg")  # a copy of a stored photo, at another path
    query = ["duplicates", str(store), "--query", str(tmp_path / "again.jpg"), photos["rocket"], "--json"]
    out, torch_used, err = deepfeat(cache, *query)
    assert not torch_used, err[-2000:]
    eager, torch_used, _ = deepfeat(cache, *query, "--no-cache")
    assert torch_used
    got, want = json.loads(out), json.loads(eager)
    assert [r["duplicate"] for r in got] == [True, False] == [r["duplicate"] for r in want]
    assert got[0]["matches"][0]["path"].endswith("chelsea.jpg")


def test_your_own_classifier_classifies_without_pytorch_after_fitting(collection, photos, tmp_path):
    cache = tmp_path / "cache"  # collection: 24 real photos in two folders, a and b: two classes
    deepfeat(cache, "fit-classifier", str(collection), "-o", str(tmp_path / "clf"), "--folds", "2")
    args = ("classify", photos["astronaut"], photos["chelsea"], "--classifier", str(tmp_path / "clf"), "--json")
    out, torch_used, err = deepfeat(cache, *args)
    assert not torch_used, err[-2000:]
    eager, torch_used, _ = deepfeat(cache, *args, "--no-cache")
    assert torch_used
    got, want = json.loads(out)["results"], json.loads(eager)["results"]
    assert [r["label"] for r in got] == [r["label"] for r in want]
    for g, w in zip(got, want):
        np.testing.assert_allclose([p["prob"] for p in g["predictions"]], [p["prob"] for p in w["predictions"]],
                                   atol=1e-4)


def test_classify_cold_and_warm_print_the_same_and_warm_needs_no_pytorch(photos, tmp_path):
    cache = tmp_path / "cache"
    args = ("classify", photos["chelsea"], photos["coffee"], "--json")
    cold, torch_cold, _ = deepfeat(cache, *args)
    warm, torch_warm, _ = deepfeat(cache, *args)
    eager, _, _ = deepfeat(cache, *args, "--no-cache")
    assert torch_cold and not torch_warm
    cold, warm, eager = (json.loads(x)["results"] for x in (cold, warm, eager))
    assert cold == warm
    assert "tabby" in cold[0]["predictions"][0]["label"] or "cat" in cold[0]["predictions"][0]["label"]
    for c, e in zip(cold, eager):  # the graph agrees with eager PyTorch
        assert [p["index"] for p in c["predictions"]] == [p["index"] for p in e["predictions"]]
        np.testing.assert_allclose([p["prob"] for p in c["predictions"]], [p["prob"] for p in e["predictions"]],
                                   atol=1e-5)
