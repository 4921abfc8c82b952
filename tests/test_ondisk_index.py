"""On-disk IVF / IVF-PQ (deepfeat.index.ondisk): the same results as the in-memory index of the same
kind and training, built in shards (in worker processes too), reopened memory-mapped from a moved folder."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from deepfeat.errors import StoreError, UsageError
from deepfeat.index import Index
from deepfeat.index.ondisk import (
    ArraySource,
    build_ondisk,
    is_ondisk,
    open_ondisk,
    rows_for_memory,
    shard_bounds,
)


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, d)).astype(np.float32)
    x = centres[rng.integers(0, 32, n)] + 0.3 * rng.normal(size=(n, d)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind,params", [("ivf", {"nlist": 16, "nprobe": 4}),
                                         ("ivfpq", {"nlist": 16, "nprobe": 4, "M": 8, "nbits": 6})])
@pytest.mark.parametrize("workers", [1, 2])
def test_ondisk_gives_the_in_memory_results_of_the_same_kind(tmp_path, kind, params, workers):
    xb, xq = _clustered(3000, 32), _clustered(50, 32, seed=1)
    mem = Index.build(xb, kind=kind, seed=0, **params)
    disk = build_ondisk(ArraySource(xb), tmp_path / "idx", kind=kind, seed=0, shard_rows=700, workers=workers,
                        chunk_rows=256, **params)
    assert disk.ntotal == mem.ntotal == 3000 and disk.kind == kind
    assert disk.meta["storage"]["shards"] == 5  # 3000 rows in shards of 700
    assert not list((tmp_path / "idx").glob("shard*")) and not (tmp_path / "idx" / "trained.faiss").exists()
    D0, I0 = mem.search(xq, 10)
    D1, I1 = disk.search(xq, 10)
    np.testing.assert_array_equal(I1, I0)
    np.testing.assert_allclose(D1, D0, rtol=1e-5, atol=1e-5)
    # the lists are on disk: reopened memory-mapped from a moved folder, the same results again
    shutil.move(str(tmp_path / "idx"), str(tmp_path / "moved"))
    again = open_ondisk(tmp_path / "moved")
    assert is_ondisk(tmp_path / "moved")
    assert again.search(xq, 10)[1].tolist() == I0.tolist()
    assert sorted(again.ids().tolist()) == list(range(3000))


def test_ondisk_ivf_at_full_nprobe_is_exact(tmp_path):
    xb, xq = _clustered(2000, 16), _clustered(20, 16, seed=2)
    disk = build_ondisk(ArraySource(xb), tmp_path / "idx", kind="ivf", nlist=8, nprobe=8, shard_rows=500)
    want = np.argsort(-(xq @ xb.T), axis=1)[:, :5]
    assert disk.search(xq, 5)[1].tolist() == want.tolist()


def test_a_npy_file_is_read_memory_mapped_in_chunks(tmp_path):
    xb = _clustered(1000, 8)
    np.save(tmp_path / "xb.npy", xb)
    src = ArraySource(tmp_path / "xb.npy")
    ids, x = src.rows(100, 250)
    assert (src.n, src.d) == (1000, 8) and ids.tolist() == list(range(100, 250))
    np.testing.assert_array_equal(x, xb[100:250])


def test_memory_bound_sets_the_shard_size():
    assert shard_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    # 64 MB for 2 workers reading 1024-row chunks of d=128, IVF-Flat codes (512 bytes + 8 for the id)
    # (share - 3 chunks) / (2 x (codes + id)): lists counted twice (they grow by doubling)
    assert rows_for_memory(64 * 2**20, 128, 512, 2, chunk_rows=1024) == ((32 * 2**20 - 3 * 1024 * 512) // 1040, 1024)
    # a small budget: chunks of at most an eighth of each worker's share
    shard, chunk = rows_for_memory(4 * 2**20, 128, 512, 2, chunk_rows=65536)
    assert chunk == (2 * 2**20 // 8) // 512 and shard == (2 * 2**20 - 3 * chunk * 512) // 1040
    with pytest.raises(UsageError, match="max-memory"):
        rows_for_memory(1000, 128, 512, 4)


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(UsageError, match="ivf, ivfpq"):
        build_ondisk(ArraySource(_clustered(100, 8)), tmp_path / "x", kind="hnsw")
    with pytest.raises(StoreError, match="not an on-disk index"):
        open_ondisk(tmp_path)


def test_index_max_memory_builds_an_ondisk_index_that_search_opens(photos, tmp_path, capsys):
    """`deepfeat index STORE --max-memory`: lists on disk, found by search as the store's index (not
    stale), with exact search's results (one list, probed: exact), also after the store is moved."""
    from deepfeat.cli import main
    from deepfeat.pipeline import ExtractConfig, extract
    from deepfeat.search.store_index import open_saved_index
    from deepfeat.store import FeatureStore

    folder = str(next(iter(photos.values())).rsplit("/", 1)[0])
    extract(ExtractConfig(inputs=[folder], output=str(tmp_path / "s"), backend="torch", workers=0, progress="none"))
    # the memory model of an in-memory ivf build names the on-disk alternative; --engine needs --max-memory
    assert main(["index", str(tmp_path / "s"), "--kind", "ivf"]) == 0
    assert "or, with --max-memory SIZE: on disk: ivf" in capsys.readouterr().out
    assert main(["index", str(tmp_path / "s"), "--kind", "ivf", "--engine", "ray"]) == 2
    assert "--max-memory" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "s"), "--kind", "ivf", "--max-memory", "64M"]) == 0
    out = capsys.readouterr().out
    assert "on disk: ivf" in out and "1 at a time in this process" in out and "with on-disk lists" in out
    shutil.move(str(tmp_path / "s"), str(tmp_path / "moved"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved"]  # no staging folder left
    # search and serve (both through SearchEngine) map the lists file instead of reading it
    from deepfeat.search import SearchEngine

    engine = SearchEngine(tmp_path / "moved")
    assert engine.indexes.saved is not None and engine.indexes.saved.meta["storage"]["engine"] == "local"
    lists = str((tmp_path / "moved" / "index" / "lists.ivfdata").resolve())
    with open("/proc/self/maps") as f:
        assert any(line.rstrip().endswith(lists) for line in f)
    assert engine.search(engine.xb[:1], k=3)[0][0].path == engine.paths[0]
    del engine
    store = FeatureStore(tmp_path / "moved")
    index = open_saved_index(store, store.feature_name(None))
    assert index is not None and index.meta["storage"]["lists"] == "lists.ivfdata"
    xb = store.vectors()
    want = np.argsort(-(xb @ xb.T), axis=1, kind="stable")[:, :3]
    assert index.search(xb, 3)[1].tolist() == want.tolist()
    assert main(["search", str(tmp_path / "moved"), store.paths[0], "-k", "3", "--json"]) == 0


class FailingSource(ArraySource):
    """Rows of an array, but reading past row *fail_at* fails (a fault hook: a disk error mid-build)."""

    def __init__(self, xb: np.ndarray, fail_at: int):
        super().__init__(xb)
        self.fail_at = fail_at

    def rows(self, start: int, stop: int):
        if stop > self.fail_at:
            raise StoreError(f"rows {start}:{stop} unreadable")
        return super().rows(start, stop)


def test_an_interrupted_build_leaves_the_previous_index_whole(tmp_path):
    """A rebuild that fails while filling its shards changes nothing in the index folder (the old
    index still gives its results) and leaves no staging folder; a staging folder left by a killed
    build (its process gone) is removed by the next build, one of a live process is not."""
    import os
    import socket
    import subprocess
    import sys

    from deepfeat.index.ondisk import LISTS_FILE, STAGING

    xb, xq = _clustered(1500, 16), _clustered(10, 16, seed=3)
    params = {"nlist": 8, "nprobe": 8}
    old = build_ondisk(ArraySource(xb), tmp_path / "idx", kind="ivf", shard_rows=400, **params)
    want = old.search(xq, 5)
    before = {f.name: f.read_bytes() for f in (tmp_path / "idx").iterdir()}
    del old
    with pytest.raises(StoreError, match="unreadable"):
        build_ondisk(FailingSource(xb[::-1].copy(), fail_at=1000), tmp_path / "idx", kind="ivf", shard_rows=400,
                     **params)
    assert {f.name: f.read_bytes() for f in (tmp_path / "idx").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    again = open_ondisk(tmp_path / "idx").search(xq, 5)
    np.testing.assert_array_equal(again[1], want[1])

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True, text=True)
    host = socket.gethostname()
    killed = tmp_path / f"idx{STAGING}{host}-{int(dead.stdout)}"
    live = tmp_path / f"idx{STAGING}{host}-{os.getppid()}"
    for d in (killed, live):
        d.mkdir()
        (d / LISTS_FILE).write_bytes(b"half-written")
    new = build_ondisk(ArraySource(xb), tmp_path / "idx", kind="ivf", shard_rows=400, **params)
    assert not killed.exists() and live.is_dir()
    np.testing.assert_array_equal(new.search(xq, 5)[1], want[1])


def test_a_build_interrupted_while_moving_in_leaves_no_index_rather_than_a_wrong_one(tmp_path, monkeypatch):
    """Killed between moving the new lists in and the new meta: the old meta is gone first, so the
    folder holds no index (search falls back to exact) rather than the old table over the new lists."""
    import os

    from deepfeat.index import ondisk
    from deepfeat.index.persist import read_index

    xb = _clustered(800, 8)
    build_ondisk(ArraySource(xb), tmp_path / "idx", kind="ivf", nlist=4, nprobe=4, shard_rows=300)
    real_replace = os.replace

    def crash_before_the_meta(src, dst):
        if str(dst) == str(tmp_path / "idx" / ondisk.INDEX_FILE):
            raise KeyboardInterrupt  # as if killed here: the new lists are in, the old meta is gone
        return real_replace(src, dst)

    monkeypatch.setattr(ondisk.os, "replace", crash_before_the_meta)
    with pytest.raises(KeyboardInterrupt):
        build_ondisk(ArraySource(xb[::-1].copy()), tmp_path / "idx", kind="ivf", nlist=4, nprobe=4, shard_rows=300)
    monkeypatch.undo()
    assert (tmp_path / "idx" / ondisk.LISTS_FILE).is_file() and not is_ondisk(tmp_path / "idx")
    with pytest.raises(StoreError, match="no index meta"):
        read_index(tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_build_engine_errors_are_one_line(tmp_path, monkeypatch):
    import sys

    xb = _clustered(300, 8)
    with pytest.raises(UsageError, match="local, ray"):
        build_ondisk(ArraySource(xb), tmp_path / "x", kind="ivf", nlist=4, engine="dask")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(UsageError, match=r"deepfeat\[ray\]"):
        build_ondisk(ArraySource(xb), tmp_path / "x", kind="ivf", nlist=4, engine="ray")
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


def test_shards_filled_by_ray_tasks_merge_into_the_single_process_index(tmp_path):
    """engine="ray": every shard a Ray task (2 at a time); merged, the same ids and scores as the
    index built in one process from one shard. Skips without Ray."""
    ray = pytest.importorskip("ray")
    xb, xq = _clustered(2500, 32), _clustered(40, 32, seed=4)
    params = {"nlist": 16, "nprobe": 4, "M": 8, "nbits": 6}
    one = build_ondisk(ArraySource(xb), tmp_path / "one", kind="ivfpq", seed=0, **params)
    assert one.meta["storage"]["shards"] == 1
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        disk = build_ondisk(ArraySource(xb), tmp_path / "ray", kind="ivfpq", seed=0, shard_rows=600, workers=2,
                            engine="ray", **params)
        # a task's own error comes back as the same deepfeat error, and nothing is left behind
        with pytest.raises(StoreError, match="unreadable"):
            build_ondisk(FailingSource(xb, fail_at=1500), tmp_path / "bad", kind="ivfpq", seed=0, shard_rows=600,
                         workers=2, engine="ray", **params)
    finally:
        if started:
            ray.shutdown()
    assert disk.meta["storage"]["shards"] == 5 and disk.meta["storage"]["engine"] == "ray"
    D0, I0 = one.search(xq, 10)
    D1, I1 = disk.search(xq, 10)
    np.testing.assert_array_equal(I1, I0)
    np.testing.assert_allclose(D1, D0, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "ray"]


def test_the_merge_closes_the_shards_it_read(tmp_path):
    """After a build, no shard file stays mapped in the process (faiss.contrib.ondisk.merge_ondisk leaves
    them mapped, deleted, holding their disk space for the life of the process), and only the merged
    lists file is."""
    xb = _clustered(4000, 16)
    index = build_ondisk(ArraySource(xb), tmp_path / "idx", kind="ivf", nlist=8, nprobe=8, shard_rows=1000)
    with open("/proc/self/maps") as f:
        maps = [line for line in f if str(tmp_path) in line]
    assert not [m for m in maps if "shard" in m or "(deleted)" in m]
    assert [m.rstrip().rsplit("/", 1)[-1] for m in maps] == ["lists.ivfdata"]
    assert index.ntotal == 4000


KILLED_BUILD = """
import os, signal, sys
import numpy as np
from deepfeat.index.ondisk import ArraySource, build_ondisk

class KilledSource(ArraySource):
    def rows(self, start, stop):
        if stop - start <= 400 and start >= 800:  # a shard's rows (the training sample reads all 1,500)
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 of the build, two shards written, one being filled
        return super().rows(start, stop)

xb = np.load(sys.argv[1])
build_ondisk(KilledSource(xb[::-1].copy()), sys.argv[2], kind="ivf", nlist=8, nprobe=8, shard_rows=400)
"""


def test_kill_9_during_a_build_leaves_the_index_folder_as_it_was(tmp_path):
    """A build killed with SIGKILL (a fault hook in its row source) changes nothing in the index folder;
    its staging folder is left, and removed by the next build, whose index is the same as before."""
    import os
    import signal
    import subprocess
    import sys

    xb, xq = _clustered(1500, 16), _clustered(10, 16, seed=5)
    np.save(tmp_path / "xb.npy", xb)
    build_ondisk(ArraySource(xb), tmp_path / "idx", kind="ivf", nlist=8, nprobe=8, shard_rows=400)
    before = {f.name: f.read_bytes() for f in (tmp_path / "idx").iterdir()}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(tmp_path / "xb.npy"), str(tmp_path / "idx")],
                         check=False, env=env, capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert {f.name: f.read_bytes() for f in (tmp_path / "idx").iterdir()} == before
    left = [p for p in tmp_path.iterdir() if ".building-" in p.name]
    assert len(left) == 1 and sorted(p.name for p in left[0].glob("shard*.faiss")) == ["shard00000.faiss",
                                                                                      "shard00001.faiss"]
    want = open_ondisk(tmp_path / "idx").search(xq, 5)[1]
    again = build_ondisk(ArraySource(xb), tmp_path / "idx", kind="ivf", nlist=8, nprobe=8, shard_rows=400)
    assert not left[0].exists()
    np.testing.assert_array_equal(again.search(xq, 5)[1], want)
