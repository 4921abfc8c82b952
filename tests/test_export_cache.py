"""The on-disk cache of exported graphs (deepfeat.backends.export_cache): keys, atomic fills by two
writers at once, the LRU size bound, and the real embedded model taken from the cache."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepfeat.backends import export_cache
from deepfeat.backends.export_cache import ExportCache, graph_key, open_cache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch) -> Path:
    """Every test here gets its own cache folder: nothing of the user's cache is read or written."""
    root = tmp_path / "cache"
    monkeypatch.setenv(export_cache.ENV_ROOT, str(root))
    monkeypatch.delenv(export_cache.ENV_MAX_MB, raising=False)
    return root


def _writer(payload: bytes, calls: list):
    def write(path: str) -> None:
        calls.append(path)
        Path(path).write_bytes(payload)
    return write


def test_cache_folder_follows_deepfeat_cache_then_xdg_then_home(tmp_path, monkeypatch):
    assert export_cache.default_root() == tmp_path / "cache"
    monkeypatch.delenv(export_cache.ENV_ROOT)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert export_cache.default_root() == tmp_path / "xdg" / "deepfeat"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert export_cache.default_root() == tmp_path / "home" / ".cache" / "deepfeat"


def test_miss_writes_once_then_hits_and_the_entry_describes_itself(private_cache):
    cache, calls = ExportCache(), []
    key = {"network": "abc", "kind": "static", "shape": [224, 224, 3]}
    first = cache.graph(key, _writer(b"graph-1", calls))
    again = cache.graph(key, _writer(b"graph-2", calls))
    assert first == again and len(calls) == 1 and (cache.misses, cache.hits) == (1, 1)
    assert Path(first).read_bytes() == b"graph-1"
    assert Path(first).parent.parent == private_cache / "graphs"
    assert json.loads((Path(first).parent / export_cache.KEY_FILE).read_text()) == key
    other = cache.graph({**key, "shape": [256, 256, 3]}, _writer(b"graph-3", calls))
    assert other != first and len(calls) == 2
    assert not list((private_cache / "graphs").glob(export_cache.TMP_PREFIX + "*"))  # no temporary left


def test_two_writers_filling_one_key_at_once_both_succeed_and_agree(private_cache):
    """The second writer finishes (renames its entry into place) while the first is still writing:
    the first keeps the entry already there, and both get the same, complete graph."""
    key = {"network": "abc", "kind": "dynamic", "shape": [3]}
    a, b = ExportCache(), ExportCache()  # as two processes: no state shared but the folder
    inner: list[str] = []

    def slow_write(path: str) -> None:
        Path(path).write_bytes(b"from-a")
        inner.append(b.graph(key, _writer(b"from-b", [])))  # b fills the same key meanwhile

    got_a = a.graph(key, slow_write)
    assert got_a == inner[0]
    assert Path(got_a).read_bytes() == b"from-b"  # the first rename won; a dropped its own copy
    entries = [p for p in (private_cache / "graphs").iterdir()]
    assert len(entries) == 1 and not entries[0].name.startswith(export_cache.TMP_PREFIX)


def test_a_failed_export_leaves_nothing_behind(private_cache):
    cache = ExportCache()

    def broken(path: str) -> None:
        Path(path).write_bytes(b"half a graph")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError):
        cache.graph({"k": 1}, broken)
    assert list((private_cache / "graphs").iterdir()) == []


def test_size_bound_evicts_least_recently_used_first(private_cache):
    cache = ExportCache(max_bytes=2500)
    paths = [cache.graph({"k": i}, _writer(bytes(1000), [])) for i in range(2)]
    for i, p in enumerate(paths):  # explicit use times: entry 0 used last, entry 1 before it
        os.utime(Path(p).parent, (1_000_000 + 10 * (1 - i), 1_000_000 + 10 * (1 - i)))
    third = cache.graph({"k": 2}, _writer(bytes(1000), []))  # over 2500 bytes: the LRU entry (1) goes
    assert Path(paths[0]).is_file() and Path(third).is_file() and not Path(paths[1]).exists()
    assert cache.evictions == 1 and cache.size_bytes() <= 2500
    # a hit counts as a use: entry 0 touched now, so the next eviction takes the third
    cache.graph({"k": 0}, _writer(b"unused", []))
    os.utime(Path(third).parent, (1_000_000, 1_000_000))
    cache.graph({"k": 3}, _writer(bytes(1000), []))
    assert Path(paths[0]).is_file() and not Path(third).exists()


def test_size_bound_from_the_environment(monkeypatch):
    monkeypatch.setenv(export_cache.ENV_MAX_MB, "1.5")
    assert ExportCache().max_bytes == int(1.5 * 1024 ** 2)
    monkeypatch.setenv(export_cache.ENV_MAX_MB, "lots")
    from deepfeat.errors import UsageError

    with pytest.raises(UsageError, match="DEEPFEAT_CACHE_MAX_MB"):
        ExportCache()


def test_an_unwritable_cache_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(export_cache.ENV_ROOT, str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="deepfeat.backends.export_cache"):
        assert open_cache() is None
    assert "not writable" in caplog.text
    assert open_cache(enabled=False) is None


# --- the real embedded model --------------------------------------------------------------------

def _fnet(lite0, pool="gem"):
    from deepfeat.backends.featurenet import FeatureNet
    from deepfeat.pooling import get_pooling

    return FeatureNet(lite0, ["bn2"], get_pooling(pool))


def _batch(photos, n=2):
    from deepfeat.data.images import decode_image
    from deepfeat.data.preprocess import parse_size_policy

    policy = parse_size_policy("model")
    import deepfeat

    cfg = deepfeat.load_model("efficientnet_lite0").data_config
    return np.stack([decode_image(p, policy, cfg).pixels for p in list(photos.values())[:n]])


def test_a_second_runner_takes_the_graph_from_the_cache_with_the_same_descriptors(lite0, photos):
    from deepfeat.backends.featurenet import OnnxRunner

    pytest.importorskip("onnxruntime")
    pixels = _batch(photos)
    first = OnnxRunner(_fnet(lite0), batch_size=2, disk_cache=ExportCache())
    want = first(pixels)
    assert (first.graphs.exports, first.graphs.cache_hits) == (1, 0)
    second = OnnxRunner(_fnet(lite0), batch_size=2, disk_cache=ExportCache())  # a new network object
    got = second(pixels)
    assert (second.graphs.exports, second.graphs.cache_hits) == (0, 1)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    # another pooling, another batch size: other graphs, not the cached one
    other = OnnxRunner(_fnet(lite0, "mac"), batch_size=2, disk_cache=ExportCache())
    other(pixels)
    third = OnnxRunner(_fnet(lite0), batch_size=1, disk_cache=ExportCache())
    third(pixels)
    assert other.graphs.exports == 1 and third.graphs.exports == 1


def test_keys_differ_for_weights_taps_pooling_and_shape(lite0):
    import torch

    base = _fnet(lite0)
    k = graph_key(base, "static", (224, 224, 3), 8, 17)
    assert k == graph_key(_fnet(lite0), "static", (224, 224, 3), 8, 17)
    assert k != graph_key(_fnet(lite0, "mac"), "static", (224, 224, 3), 8, 17)
    assert k != graph_key(base, "static", (256, 224, 3), 8, 17)
    assert graph_key(base, "dynamic", (224, 224, 3), None, 17) == graph_key(base, "dynamic", (512, 384, 3), None, 17)
    import copy

    changed = copy.deepcopy(base)
    with torch.no_grad():
        next(changed.net.parameters()).add_(1e-3)
    changed.__dict__.pop("_export_digest", None)
    assert graph_key(changed, "static", (224, 224, 3), 8, 17)["network"] != k["network"]


def test_a_damaged_cached_graph_is_exported_again(lite0, photos, caplog):
    from deepfeat.backends.featurenet import OnnxRunner

    pytest.importorskip("onnxruntime")
    pixels = _batch(photos)
    want = OnnxRunner(_fnet(lite0), batch_size=2, disk_cache=ExportCache())(pixels)
    [entry] = [p for p in ExportCache().folder.iterdir()]
    (entry / export_cache.GRAPH_FILE).write_bytes(b"\x00 not onnx")
    runner = OnnxRunner(_fnet(lite0), batch_size=2, disk_cache=ExportCache())
    with caplog.at_level(logging.WARNING):
        got = runner(pixels)
    assert "exporting it again" in caplog.text and runner.graphs.exports == 1
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


FILL = """
import sys, numpy as np, deepfeat
from deepfeat.backends.export_cache import ExportCache
from deepfeat.backends.featurenet import FeatureNet, OnnxRunner
from deepfeat.data.images import decode_image
from deepfeat.data.preprocess import parse_size_policy
from deepfeat.pooling import get_pooling
m = deepfeat.load_model("efficientnet_lite0", device="cpu")
px = np.stack([decode_image(p, parse_size_policy("model"), m.data_config).pixels for p in sys.argv[2:]])
r = OnnxRunner(FeatureNet(m, ["bn2"], get_pooling("gem")), threads=1, batch_size=2, disk_cache=ExportCache())
np.save(sys.argv[1], r(px)[0])
"""


@pytest.mark.slow
def test_two_processes_filling_the_cache_at_once_both_succeed_and_agree(private_cache, photos, tmp_path):
    pytest.importorskip("onnxruntime")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    imgs = [str(p) for p in list(photos.values())[:2]]
    procs = [subprocess.Popen([sys.executable, "-c", FILL, str(tmp_path / f"out{i}.npy"), *imgs], env=env,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    a, b = np.load(tmp_path / "out0.npy"), np.load(tmp_path / "out1.npy")
    np.testing.assert_array_equal(a, b)
    entries = list((private_cache / "graphs").iterdir())
    assert len(entries) == 1 and (entries[0] / export_cache.GRAPH_FILE).is_file()


def test_extract_fills_the_cache_and_no_cache_bypasses_it(photos, tmp_path, private_cache, monkeypatch):
    pytest.importorskip("onnxruntime")
    from deepfeat.cli import main
    from deepfeat.store import FeatureStore

    folder = Path(next(iter(photos.values()))).parent
    assert main(["extract", str(folder), "-o", str(tmp_path / "s1"), "--backend", "onnx", "--workers", "0",
                 "--progress", "none"]) == 0
    entries = list((private_cache / "graphs").iterdir())
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime
    os.utime(entries[0], (stamp - 100, stamp - 100))
    assert main(["extract", str(folder), "-o", str(tmp_path / "s2"), "--backend", "onnx", "--workers", "0",
                 "--progress", "none"]) == 0
    assert entries[0].stat().st_mtime > stamp - 100  # used (a hit), not exported again
    monkeypatch.setenv(export_cache.ENV_ROOT, str(tmp_path / "other-cache"))
    assert main(["extract", str(folder), "-o", str(tmp_path / "s3"), "--backend", "onnx", "--workers", "0",
                 "--progress", "none", "--no-cache"]) == 0
    assert not (tmp_path / "other-cache" / "graphs").exists() or not list((tmp_path / "other-cache" /
                                                                           "graphs").iterdir())
    s1, s2, s3 = (FeatureStore(tmp_path / s) for s in ("s1", "s2", "s3"))
    assert s1.paths == s2.paths == s3.paths and len(s1) == len(photos)
    np.testing.assert_array_equal(s1.raw(), s2.raw())  # the cached graph: the same descriptors, bit for bit
    np.testing.assert_array_equal(s1.raw(), s3.raw())
