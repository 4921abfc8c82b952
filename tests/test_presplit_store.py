"""A store written before the module split (issue 18) is read after it: the store in
tests/data/presplit-store/ was written by deepfeat at commit 3d8c61f (see its README.md).
The current code verifies its checksums, reads its vectors, paths and meta, searches it with
its saved index, appends to it, and extracts the same photos into the same vectors. A recipe and a
fine-tuning run written before the structure by stage (issue 25; tests/data/pre-issue25, commit
7d7abd5) give the same vectors with the current code."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from deepfeat import cli
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.search import SearchEngine, build_index
from deepfeat.store import FeatureStore

DATA = Path(__file__).resolve().parent / "data" / "presplit-store"
PATHS = ["photos/astronaut.jpg", "photos/chelsea.jpg", "photos/coffee.jpg"]
#: what the code of 3d8c61f answered for each stored image as the query (its own row left out):
#: (id, path, score rounded to 6 places)
OLD_HITS = [
    [(2, "photos/coffee.jpg", 0.365263), (1, "photos/chelsea.jpg", 0.285787)],
    [(0, "photos/astronaut.jpg", 0.285787), (2, "photos/coffee.jpg", 0.184542)],
    [(0, "photos/astronaut.jpg", 0.365263), (1, "photos/chelsea.jpg", 0.184542)],
]
#: current extraction vs the stored vectors: the same code path (eager torch on the CPU), so the
#: same numbers up to the float32 rounding of another thread count
ATOL = 1e-5


def _settings(**kw) -> ExtractConfig:
    """The flags the store was made with (--backend torch --workers 0 --shard-size 2)."""
    return ExtractConfig(backend="torch", workers=0, shard_size=2, progress="none", **kw)


@pytest.fixture()
def here(tmp_path, monkeypatch) -> Path:
    """A copy of the store and its photos, as the working directory (the store's relative
    paths resolve against it: the folder it was made in is gone)."""
    shutil.copytree(DATA, tmp_path / "presplit")
    monkeypatch.chdir(tmp_path / "presplit")
    return tmp_path / "presplit"


def test_the_store_verifies_and_reads(here, capsys):
    store = FeatureStore(here / "store")
    report = store.verify()
    # meta.json and plan.parquet were written before they had records (issue 26): unchecked, not bad
    assert report.ok and report.counts() == {"ok": 6, "bad": 0, "unchecked": 2}, report.to_dict()
    assert cli.main(["info", "--verify", str(here / "store")]) == 0
    assert "0 bad" in capsys.readouterr().out
    assert len(store) == 3 and store.ids.tolist() == [0, 1, 2] and store.paths == PATHS
    assert store.committed_shards() == [0, 1] and store.feature_names == ["bn2"] and store.dim == 1280
    meta = store.meta
    assert meta["model"]["spec"] == "efficientnet_lite0" and meta["pooling"] == "gem:p=3" and meta["post"] == "l2"
    assert meta["format"] == "deepfeat-store" and meta["format_version"] == 1
    x = store.vectors()
    assert x.shape == (3, 1280) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-6)
    raw = store.raw()
    np.testing.assert_allclose(x, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-6)
    # the folder it was made in is gone: its relative paths resolve against the working directory
    assert all(Path(store.resolve_path(p)).read_bytes() == (here / p).read_bytes() for p in store.paths)


def test_search_with_the_saved_index(here):
    engine = SearchEngine(here / "store")
    assert engine.index is not None and engine.index.kind == "flat"  # the old index is not stale
    for row, want in enumerate(OLD_HITS):
        hits = engine.search(engine.xb[row: row + 1], k=3, exclude_rows=[row])[0]
        assert [(h.id, h.path, round(h.score, 6)) for h in hits] == want
    # an image query embedded as the store was made: the stored photo itself comes first
    top = engine.search(engine.embed_images(["photos/chelsea.jpg"]), k=3)[0]
    assert top[0].id == 1 and top[0].score == pytest.approx(1.0, abs=ATOL)
    assert [h.id for h in top[1:]] == [0, 2]


def test_current_extraction_gives_the_stored_vectors(here):
    old = FeatureStore(here / "store")
    report = extract(_settings(inputs=list(PATHS), output=str(here / "now")))
    assert report.ok == 3 and report.failed == 0
    now = FeatureStore(here / "now")
    assert now.paths == old.paths and now.ids.tolist() == old.ids.tolist()
    for col in ("shard", "offset", "width", "height", "status"):
        assert now.items().column(col).to_pylist() == old.items().column(col).to_pylist(), col
    np.testing.assert_allclose(now.raw(), old.raw(), rtol=0, atol=ATOL * np.abs(old.raw()).max())
    np.testing.assert_allclose(now.vectors(), old.vectors(), rtol=0, atol=ATOL)
    for key in ("model", "layers", "pooling", "pooling_params", "post", "size", "scales", "features"):
        assert now.meta[key] == old.meta[key], key


def test_appending_to_the_old_store(here):
    before = FeatureStore(here / "store").vectors().copy()
    img = Image.open("photos/chelsea.jpg")
    ImageOps.mirror(img).save(here / "photos" / "chelsea_mirror.jpg", quality=90)
    report = extract(_settings(inputs=["photos/chelsea_mirror.jpg"], output=str(here / "store")))
    assert report.ok == 1 and report.failed == 0 and report.skipped_shards == 2 and report.planned == 4
    store = FeatureStore(here / "store")
    # the stale index too; meta.json and plan.parquet, rewritten by the append, now have records
    assert store.verify().counts() == {"ok": 10, "bad": 0, "unchecked": 0}
    assert len(store) == 4 and store.paths[:3] == PATHS
    # appended from another folder than the store's root: stored relative to that root, resolved back
    assert Path(store.resolve_path(store.paths[3])).samefile(here / "photos" / "chelsea_mirror.jpg")
    assert store.committed_shards() == [0, 1, 2]
    np.testing.assert_array_equal(store.vectors()[:3], before)  # the old rows are untouched
    engine = SearchEngine(store)
    assert engine.index is None  # the saved index no longer covers the store: exact search
    build_index(store)
    engine = SearchEngine(store)
    assert engine.index is not None
    hits = engine.search(engine.xb[3:4], k=1, exclude_rows=[3])[0]
    assert hits[0].id == 1  # the mirrored cat finds the cat


# --------------------------------------------------------------------------- before issue 25
# tests/data/pre-issue25: a recipe and a fine-tuning run written at commit 7d7abd5 (see its README.md)

PRE25 = Path(__file__).resolve().parent / "data" / "pre-issue25"


@pytest.fixture()
def pre25(tmp_path, monkeypatch) -> Path:
    shutil.copytree(PRE25, tmp_path / "pre25")
    monkeypatch.chdir(tmp_path / "pre25")
    return tmp_path / "pre25"


def test_an_old_recipe_extracts_the_same_vectors(pre25, capsys):
    assert cli.main(["extract", "data", "-o", "st", "--recipe", "recipe.json", "--backend", "torch",
                     "--workers", "0", "--progress", "none"]) == 0
    store = FeatureStore(pre25 / "st")
    assert store.meta["pooling"] == "gem:p=3" and store.meta["layers"] == ["bn2"] and store.meta["post"] == "l2"
    np.testing.assert_allclose(store.vectors(), np.load(pre25 / "recipe_vectors.npy"), rtol=0, atol=ATOL)
    assert cli.main(["eval", "st", "--gt", "folders", "--recipe", "recipe.json"]) == 0
    assert "mAP 100.00" in capsys.readouterr().out


def test_an_old_finetuning_run_is_a_model_with_the_same_descriptors(pre25, capsys):
    assert cli.main(["extract", "data", "-o", "st", "--model", "finetuned:run", "--backend", "torch",
                     "--workers", "0", "--progress", "none"]) == 0
    store = FeatureStore(pre25 / "st")
    assert store.meta["layers"] == ["layer4"] and store.meta["pooling"] == "avg"
    np.testing.assert_allclose(store.vectors(), np.load(pre25 / "finetuned_vectors.npy"), rtol=0, atol=ATOL)
    assert cli.main(["classify", "data/chelsea/a.jpg", "--model", "finetuned:run", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("astronaut", "chelsea", "coffee"))  # the run's own three classes
