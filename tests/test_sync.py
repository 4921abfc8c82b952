"""Keeping a store in sync with its folder (issue 30): ``extract --sync``, ``deepfeat sync``, the
file records they rely on, the warning of a plain re-run, and a sync killed at any point then
continued. Real photos, the real embedded model, real processes for the kills."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from deepfeat.cli import main
from deepfeat.data.sources import file_sha256, read_recorded, readable_sha256
from deepfeat.pipeline.faults import ENV as FAULTS
from deepfeat.search import SearchEngine, build_index
from deepfeat.store import FeatureStore

PRESPLIT = Path(__file__).resolve().parent / "data" / "presplit-store"
#: one image at a time, eager torch, decoded in this process: a file's vector does not depend on
#: which other files were extracted with it, so a sync and a fresh extraction agree bit for bit
FLAGS = ["--backend", "torch", "--workers", "0", "--batch-size", "1", "--shard-size", "1", "--progress", "none"]


def _run(*argv: str) -> int:
    return main([*argv])


@pytest.fixture()
def folder(tmp_path, photos) -> Path:
    """Four photos, extracted into ``store`` (and indexed) from *tmp_path* as the working directory."""
    d = tmp_path / "photos"
    d.mkdir()
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        shutil.copy(photos[name], d / f"{name}.jpg")
    return d


def _change_folder(folder: Path, photos) -> None:
    """The issue's scenario: chelsea.jpg replaced by another photo, coffee.jpg deleted, new.jpg added
    (the coffee cup, mirrored), and astronaut.jpg touched (same bytes, a new modification time)."""
    shutil.copy(photos["hubble"], folder / "chelsea.jpg")
    (folder / "coffee.jpg").unlink()
    ImageOps.mirror(Image.open(photos["coffee"])).save(folder / "new.jpg", quality=90)
    st = os.stat(folder / "astronaut.jpg")
    os.utime(folder / "astronaut.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def _by_path(store: FeatureStore) -> dict[str, np.ndarray]:
    return dict(zip(store.paths, store.raw()))


def test_items_record_their_files(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _run("extract", "photos", "-o", "store", *FLAGS) == 0
    store = FeatureStore("store")
    items = store.items()
    for p, size, mtime, sha in zip(*(items.column(c).to_pylist() for c in ("path", "size", "mtime_ns", "sha256"))):
        st = os.stat(p)
        assert (size, mtime, sha) == (st.st_size, st.st_mtime_ns, file_sha256(p))
    assert store.meta["inputs"] == ["photos"]


def test_the_one_rule_of_a_changed_file(folder):
    """SourceRecord.unchanged, the rule of sync and of the duplicates actions: a touched file is
    unchanged (decided by its bytes), an edited one is changed, and an edit of the same size with its
    mtime put back passes only when the stat is trusted (sync), not when the bytes are always read."""
    path = folder / "astronaut.jpg"
    _, record = read_recorded(str(path))  # what the decode worker records
    reads = []

    def digest():
        reads.append(1)
        return readable_sha256(path)

    assert record.unchanged(os.stat(path), digest) and not reads  # same stat: not read
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched
    assert record.unchanged(os.stat(path), digest) and len(reads) == 1
    assert record.unchanged(os.stat(path), digest, trust_stat=False)
    data = bytearray(path.read_bytes())
    data[15] ^= 0x01  # an in-place edit of the same size (the JFIF density)...
    path.write_bytes(bytes(data))
    os.utime(path, ns=(record.mtime_ns, record.mtime_ns))  # ...with its modification time put back
    assert record.unchanged(os.stat(path), digest)  # sync's stat shortcut lets it through
    assert not record.unchanged(os.stat(path), digest, trust_stat=False)
    path.write_bytes(bytes(data) + b"edited")
    assert not record.unchanged(os.stat(path), digest)
    path.unlink()
    assert not record.unchanged(st, digest, trust_stat=False)  # unreadable: changed


def test_sync_ends_equal_to_a_fresh_extraction(folder, tmp_path, monkeypatch, photos, capsys):
    monkeypatch.chdir(tmp_path)
    assert _run("extract", "photos", "-o", "store", *FLAGS) == 0
    build_index(FeatureStore("store"), kind="flat")
    before = _by_path(FeatureStore("store"))
    _change_folder(folder, photos)
    capsys.readouterr()

    assert _run("-v", "extract", "photos", "-o", "store", "--sync", *FLAGS) == 0
    out = capsys.readouterr().out
    assert "sync: 1 added, 1 changed, 1 deleted, 2 unchanged, 0 failed" in out
    assert "changed: photos/chelsea.jpg" in out and "deleted: photos/coffee.jpg" in out
    assert "added: photos/new.jpg" in out and "index: " in out

    assert _run("extract", "photos", "-o", "fresh", *FLAGS) == 0
    synced, fresh = FeatureStore("store"), FeatureStore("fresh")
    assert sorted(synced.paths) == sorted(fresh.paths) == [f"photos/{n}.jpg" for n in
                                                           ("astronaut", "chelsea", "new", "rocket")]
    now, ref = _by_path(synced), _by_path(fresh)
    for p in ("photos/astronaut.jpg", "photos/rocket.jpg"):  # not extracted again: the very same rows
        np.testing.assert_array_equal(now[p], before[p])
        np.testing.assert_array_equal(now[p], ref[p])
    for p in ("photos/chelsea.jpg", "photos/new.jpg"):
        np.testing.assert_array_equal(now[p], ref[p])
    assert not np.array_equal(now["photos/chelsea.jpg"], before["photos/chelsea.jpg"])
    # the changed file is a new item (a new id); the old ones are tombstoned with their reason
    removed = set(synced.removed_ids().tolist())
    assert len(removed) == 2 and not removed & set(synced.ids.tolist())

    engine = SearchEngine("store")
    assert engine.index is not None  # refreshed by the sync, not stale
    hubble, = engine.search(engine.embed_images([photos["hubble"]]), k=len(engine.xb))
    assert hubble[0].path == "photos/chelsea.jpg"
    cup, = engine.search(engine.embed_images([photos["coffee"]]), k=len(engine.xb))
    assert cup[0].path == "photos/new.jpg"
    assert "photos/coffee.jpg" not in {h.path for hits in (hubble, cup) for h in hits}

    # a second sync finds nothing to do (the touched file was hashed once, and is still unchanged)
    capsys.readouterr()
    assert _run("sync", "store", "--json") == 0
    again = json.loads(capsys.readouterr().out)
    assert again["sync"]["counts"] == {"added": 0, "changed": 0, "deleted": 0, "unchanged": 4, "failed": 0,
                                       "retried": 0, "pending": 0}
    assert again["processed"] == 0


def test_dry_run_changes_nothing(folder, tmp_path, monkeypatch, photos, capsys):
    monkeypatch.chdir(tmp_path)
    assert _run("extract", "photos", "-o", "store", *FLAGS) == 0
    _change_folder(folder, photos)
    files = {f: f.read_bytes() for f in sorted(Path("store").rglob("*")) if f.is_file()}
    capsys.readouterr()
    assert _run("sync", "store", "--dry-run", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["paths"]["added"] == ["photos/new.jpg"] and plan["paths"]["changed"] == ["photos/chelsea.jpg"]
    assert plan["paths"]["deleted"] == ["photos/coffee.jpg"] and plan["hashed"] == 2  # chelsea and the touched one
    assert sorted(plan["paths"]["unchanged"]) == ["photos/astronaut.jpg", "photos/rocket.jpg"]
    assert {f: f.read_bytes() for f in sorted(Path("store").rglob("*")) if f.is_file()} == files


def test_a_plain_rerun_warns(folder, tmp_path, monkeypatch, photos, caplog):
    monkeypatch.chdir(tmp_path)
    assert _run("extract", "photos", "-o", "store", *FLAGS) == 0
    assert "since" not in caplog.text  # a first run has nothing to say
    _change_folder(folder, photos)
    caplog.clear()
    assert _run("extract", "photos", "-o", "store", *FLAGS) == 0
    # chelsea replaced and astronaut touched (a stat cannot tell them apart), coffee gone
    assert ("2 files changed and 1 is missing since they were extracted; run with --sync to update the store "
            "(or `deepfeat sync store`)") in caplog.text
    store = FeatureStore("store")
    assert "photos/coffee.jpg" in store.paths and "photos/new.jpg" in store.paths  # nothing else done


def _store_state(path: Path) -> dict:
    """What a store holds, as readers see it: its items (with their records), vectors, tombstones."""
    store = FeatureStore(path)
    items = store.items().sort_by("id")
    cols = [c for c in items.column_names if c != "shard"]
    return {"items": items.select(cols).to_pylist(), "removed": sorted(store.removed_ids().tolist()),
            "vectors": {i: v.tobytes() for i, v in zip(store.ids.tolist(), store.raw())},
            "plan": store.read_plan().to_pylist(), "inputs": store.meta.get("inputs")}


def _killed_sync(cwd: Path, fault: str, says: bytes) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", FAULTS: fault,
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1] / "src"),
                                                     os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "deepfeat.cli", "extract", "photos", "-o", "store", "--sync",
                             *FLAGS], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = []
    for line in proc.stderr:  # until the run says it waits (or ends without saying so)
        seen.append(line)
        if line.startswith(says):
            break
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert any(line.startswith(says) for line in seen), b"".join(seen).decode()


@pytest.mark.slow
@pytest.mark.parametrize("fault, says, resume", [
    # killed with the changed and deleted items tombstoned, nothing planned: extract --sync again
    ("sync-hang=removed-deleted", b"fault: sync-hang after removed-deleted", ["extract", "photos", "-o", "store",
                                                                             "--sync", *FLAGS]),
    # killed with the new paths planned, nothing extracted: deepfeat sync
    ("sync-hang=planned", b"fault: sync-hang after planned", ["sync", "store", *FLAGS[:6]]),
    # killed with one of the two new shards committed: extract --resume
    ("commit-hang=1", b"fault: 1 shard(s) committed", ["extract", "--resume", "-o", "store", *FLAGS]),
])
def test_kill_during_sync_then_resume(folder, tmp_path, monkeypatch, photos, fault, says, resume):
    monkeypatch.chdir(tmp_path)
    assert _run("extract", "photos", "-o", "store", *FLAGS) == 0
    _change_folder(folder, photos)
    shutil.copytree("store", "reference")
    assert _run("extract", "photos", "-o", "reference", "--sync", *FLAGS) == 0  # uninterrupted

    _killed_sync(tmp_path, fault, says)
    assert _run(*resume, "--progress", "none") == 0
    assert _store_state(tmp_path / "store") == _store_state(tmp_path / "reference")


def test_an_old_store_can_be_synced(tmp_path, monkeypatch, capsys):
    """A store written before the file records (tests/data/presplit-store): its items are taken as
    unchanged while their files exist, said once; deleted and new files are handled."""
    shutil.copytree(PRESPLIT, tmp_path / "presplit")
    monkeypatch.chdir(tmp_path / "presplit")
    assert _run("sync", "store") == 2  # it does not record its folders: said, nothing done
    assert "does not record the folders" in capsys.readouterr().err
    Path("photos/chelsea.jpg").unlink()
    ImageOps.mirror(Image.open("photos/coffee.jpg")).save("photos/new.jpg", quality=90)
    flags = ["--backend", "torch", "--workers", "0", "--progress", "none"]
    assert _run("extract", "photos", "-o", "store", "--sync", *flags) == 0
    out = capsys.readouterr().out
    assert "sync: 1 added, 0 changed, 1 deleted, 2 unchanged, 0 failed" in out
    assert "2 could not be checked" in out
    store = FeatureStore("store")
    assert [Path(store.resolve_path(p)).name for p in store.paths] == ["astronaut.jpg", "coffee.jpg", "new.jpg"]
    engine = SearchEngine("store")
    assert engine.index is not None  # the old saved index, refreshed
    hits, = engine.search(engine.embed_images(["photos/coffee.jpg"]), k=3)
    assert Path(hits[1].path).name == "new.jpg"
    # now that it records its folders, `deepfeat sync` alone works
    assert _run("sync", "store") == 0
    assert "sync: 0 added, 0 changed, 0 deleted, 3 unchanged, 0 failed" in capsys.readouterr().out


def test_sync_of_files_named_one_by_one(folder, tmp_path, monkeypatch, capsys):
    """A store extracted from files named on the command line: a named file that is gone is deleted
    (not "input not found"), and a sync with nothing to extract says so without loading a model."""
    monkeypatch.chdir(tmp_path)
    assert _run("extract", "photos/chelsea.jpg", "photos/coffee.jpg", "-o", "store", *FLAGS) == 0
    assert FeatureStore("store").meta["inputs"] == ["photos/chelsea.jpg", "photos/coffee.jpg"]
    (folder / "coffee.jpg").unlink()
    capsys.readouterr()
    assert _run("sync", "store", "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["sync"]["paths"]["deleted"] == ["photos/coffee.jpg"] and rep["processed"] == 0
    assert rep["backend"] is None  # no model was loaded
    store = FeatureStore("store")
    assert store.paths == ["photos/chelsea.jpg"] and len(store.removed_ids()) == 1
