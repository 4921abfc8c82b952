"""DBA-augmented vectors are computed once, saved beside the index, reused, and recomputed when
the store or its index changes (on a store of real photos embedded by the real model)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import deepfeat.index as dfindex
from deepfeat import cli
from deepfeat.index import database_side_augmentation, dba_index
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.search import SearchEngine, build_index
from deepfeat.store import FeatureStore


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, collection) -> Path:
    out = tmp_path_factory.mktemp("dba") / "store"
    extract(ExtractConfig(inputs=[str(collection)], output=str(out), workers=0, progress="none"))
    return out


@pytest.fixture()
def store(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "store")
    return tmp_path / "store"


def _calls(monkeypatch) -> list:
    """Count the DBA computations (deepfeat.index.dba_index) that SearchEngine makes."""
    calls = []

    def counting(*a, **kw):
        calls.append(a[2:])
        return dba_index(*a, **kw)

    monkeypatch.setattr(dfindex, "dba_index", counting)
    return calls


def _hits(engine, xq, **kw):
    return [[(h.id, round(h.score, 5)) for h in hits] for hits in engine.search(xq, k=5, **kw)]


def test_dba_vectors_are_saved_reused_and_verified(store, monkeypatch, capsys):
    calls = _calls(monkeypatch)
    e = SearchEngine(store)
    xq = e.xb[[0, 7, 13]]
    first = _hits(e, xq, dba=3, alpha=3.0)
    assert _hits(e, xq, dba=3, alpha=3.0) == first and len(calls) == 1  # in memory
    stem = store / "index" / "dba-n3-a3"
    assert all(stem.with_suffix(s).is_file() for s in (".faiss", ".json", ".npy"))
    # the saved vectors are the augmentation itself
    expected = database_side_augmentation(e.xb, 3, 3.0, e.exact_index)
    assert np.allclose(np.load(stem.with_suffix(".npy")), expected, atol=1e-6)
    # a new engine (a new process) loads them instead of recomputing
    e2 = SearchEngine(store)
    assert _hits(e2, xq, dba=3, alpha=3.0) == first and len(calls) == 1
    # exact evaluation rankings use them too, with the same result as recomputing
    ranks = e2.rank_all(xq, dba=3, alpha=3.0)
    assert len(calls) == 1
    assert (ranks[:, :5] == np.argsort(-(xq @ expected.T), axis=1, kind="stable")[:, :5]).all()
    # other parameters are other files
    _hits(e2, xq, dba=2)
    assert len(calls) == 2 and (store / "index" / "dba-n2-a0.json").is_file()
    # and `deepfeat info --verify` checks them
    assert cli.main(["info", str(store), "--verify", "--json"]) == 0
    checked = {c["file"] for c in json.loads(capsys.readouterr().out)["checks"]}
    assert {"index/dba-n3-a3.faiss", "index/dba-n3-a3.npy", "index/dba-n2-a0.npy"} <= checked


def test_saved_dba_is_recomputed_when_the_store_or_index_changes(store, collection, monkeypatch, tmp_path, caplog):
    calls = _calls(monkeypatch)
    e = SearchEngine(store)
    xq = e.xb[[1, 2]]
    _hits(e, xq, dba=3)
    assert len(calls) == 1
    # a new index: the neighbours would come from it
    build_index(FeatureStore(store), kind="hnsw")
    e = SearchEngine(store)
    assert e.index is not None and e.index.kind == "hnsw"
    _hits(e, xq, dba=3)
    assert len(calls) == 2
    assert json.loads((store / "index" / "dba-n3-a0.json").read_text())["dba"]["base"]["kind"] == "hnsw"
    assert len(SearchEngine(store).search(xq, k=3, dba=3)) == 2 and len(calls) == 2  # saved again, reused
    # the store grows: the index goes stale (exact search) and so do the DBA vectors
    extra = tmp_path / "more"
    extra.mkdir()
    for p in sorted((collection / "b").iterdir())[:2]:
        shutil.copy(p, extra / f"x_{p.name}")
    extract(ExtractConfig(inputs=[str(extra)], output=str(store), workers=0, progress="none"))
    e = SearchEngine(store)
    got = _hits(e, e.xb[[1, 2]], dba=3)
    assert len(calls) == 3 and np.load(store / "index" / "dba-n3-a0.npy").shape == (26, e.xb.shape[1])
    fresh = SearchEngine(store, use_index=False)
    fresh.dba_cache._load = lambda stem, want: None  # recompute from scratch
    fresh.dba_cache._save = lambda stem, found, want: None
    assert _hits(fresh, e.xb[[1, 2]], dba=3) == got and len(calls) == 4
    # a damaged file is not trusted: recomputed, with a warning naming it
    npy = store / "index" / "dba-n3-a0.npy"
    npy.write_bytes(npy.read_bytes()[:-64])
    with caplog.at_level(logging.WARNING, logger="deepfeat.search"):
        assert _hits(SearchEngine(store), e.xb[[1, 2]], dba=3) == got
    assert len(calls) == 5 and "dba-n3-a0.npy has" in caplog.text


def test_dba_on_a_store_that_cannot_be_written(store, monkeypatch, caplog):
    import deepfeat.store as dfstore

    def disk_full(path, arr):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dfstore, "atomic_save_npy", disk_full)
    e = SearchEngine(store)
    with caplog.at_level(logging.WARNING, logger="deepfeat.search"):
        hits = e.search(e.xb[:2], k=3, dba=2)
    assert len(hits) == 2 and len(hits[0]) == 3
    assert "keeping them in memory" in caplog.text and not (store / "index" / "dba-n2-a0.json").exists()
