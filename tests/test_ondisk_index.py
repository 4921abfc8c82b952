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
    assert main(["index", str(tmp_path / "s"), "--kind", "ivf", "--max-memory", "64M"]) == 0
    out = capsys.readouterr().out
    assert "on disk: ivf" in out and "with on-disk lists" in out
    shutil.move(str(tmp_path / "s"), str(tmp_path / "moved"))
    store = FeatureStore(tmp_path / "moved")
    index = open_saved_index(store, store.feature_name(None))
    assert index is not None and index.meta["storage"]["lists"] == "lists.ivfdata"
    xb = store.vectors()
    want = np.argsort(-(xb @ xb.T), axis=1, kind="stable")[:, :3]
    assert index.search(xb, 3)[1].tolist() == want.tolist()
    assert main(["search", str(tmp_path / "moved"), store.paths[0], "-k", "3", "--json"]) == 0
