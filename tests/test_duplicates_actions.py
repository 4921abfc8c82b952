"""Acting on duplicates safely: dry run, --move-to with a manifest written first, --undo
restoring byte-identical files, a changed file skipped, and kill -9 in the middle of a
move (a deterministic fault hook, not timing) losing nothing."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from deepfeat.cli import main
from deepfeat.collection.actions import FAULT_ENV, apply, undo
from deepfeat.collection.duplicates import find_duplicates
from deepfeat.errors import UsageError
from deepfeat.pipeline import ExtractConfig, extract

SRC = Path(__file__).resolve().parents[1] / "src"
PRESPLIT = Path(__file__).resolve().parent / "data" / "presplit-store"


def snapshot(root: Path) -> dict[str, str]:
    """Every file under *root*: relative path -> sha256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def collection(tmp_path, photos):
    """Photos with an exact copy, a PNG re-save and a half-size copy, extracted into a store."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    shutil.copyfile(photos["chelsea"], images / "cat.jpg")
    shutil.copyfile(photos["chelsea"], images / "sub" / "cat.jpg")  # same name, other folder
    coffee = Image.open(photos["coffee"]).convert("RGB")
    coffee.save(images / "coffee.jpg", quality=92)
    Image.open(images / "coffee.jpg").save(images / "coffee_copy.png")
    rocket = Image.open(photos["rocket"]).convert("RGB")
    rocket.save(images / "rocket.jpg", quality=92)
    rocket.resize((rocket.width * 3 // 4, rocket.height * 3 // 4)).save(images / "rocket_small.jpg", quality=85)
    store = tmp_path / "store"
    extract(ExtractConfig(inputs=[str(images)], output=str(store), pooling="gem", workers=0, progress="none"))
    return images, store


def report(store):
    return find_duplicates(store, verify=False, threshold=0.9)


def test_dry_run_move_and_undo_byte_identical(collection, tmp_path):
    images, store = collection
    before = snapshot(images)
    rep = report(store)
    assert len(rep.groups) == 3
    keepers = {rep.files[g.keeper].file for g in rep.groups}
    manifest, outcomes = apply(rep, move_to=str(tmp_path / "moved"), dry_run=True)
    assert manifest is None and {o.state for o in outcomes} == {"would-move"} and snapshot(images) == before
    manifest, outcomes = apply(rep, move_to=str(tmp_path / "moved"))
    assert [o.state for o in outcomes] == ["moved"] * 3
    assert all(os.path.exists(k) for k in keepers)  # keepers are never moved
    moved = snapshot(tmp_path / "moved")
    assert len(snapshot(images)) == len(before) - 3
    assert {"sub/cat.jpg", "coffee.jpg", "rocket_small.jpg"} <= set(moved) or \
        {"cat.jpg", "coffee.jpg", "rocket_small.jpg"} <= set(moved)  # folders below the common one kept
    doc = json.loads(manifest.read_text())
    assert len(doc["entries"]) == 3 and not {e["file"] for e in doc["entries"]} & keepers
    restored = undo(manifest)
    assert [o.state for o in restored] == ["restored"] * 3
    assert snapshot(images) == before
    assert all(os.stat(e["file"]).st_mtime_ns == e["mtime_ns"] for e in doc["entries"])


def test_changed_file_is_skipped(collection, tmp_path):
    images, store = collection
    rep = report(store)
    victim = next(rep.files[r].file for g in rep.groups for r in g.removable)
    with open(victim, "ab") as f:
        f.write(b"edited")
    _, outcomes = apply(rep, move_to=str(tmp_path / "moved"))
    by_file = {o.file: o for o in outcomes}
    assert by_file[os.path.abspath(victim)].state == "skipped"
    assert "changed" in by_file[os.path.abspath(victim)].reason
    assert os.path.exists(victim) and sum(o.state == "moved" for o in outcomes) == 2


def test_delete_needs_explicit_flag(collection):
    _, store = collection
    with pytest.raises(UsageError, match="exactly one"):
        apply(report(store))
    assert main(["duplicates", str(store), "--no-verify", "--dry-run"]) == 2


def test_delete_needs_yes_writes_its_manifest_first_and_undo_says_it_cannot(collection, tmp_path, capsys):
    """--delete cannot be undone, so it is refused without --yes (nothing touched); with --yes the
    manifest lists every deleted file (sha256 included) and --undo says they cannot come back."""
    images, store = collection
    before = snapshot(images)
    args = ["duplicates", str(store), "--no-verify", "--threshold", "0.9", "--delete"]
    assert main(args) == 2
    assert "--yes" in capsys.readouterr().err and snapshot(images) == before
    assert main(args + ["--dry-run"]) == 0 and snapshot(images) == before
    manifest = tmp_path / "deleted.manifest.json"
    assert main(args + ["--yes", "--manifest", str(manifest)]) == 0
    after = snapshot(images)
    gone = set(before) - set(after)
    assert len(gone) == 3 and all(after[k] == before[k] for k in after)
    doc = json.loads(manifest.read_text())
    assert doc["action"] == "delete"
    assert {(Path(e["file"]).relative_to(images).as_posix(), e["sha256"]) for e in doc["entries"]} == \
        {(k, before[k]) for k in gone}
    capsys.readouterr()
    assert main(["duplicates", "--undo", str(manifest)]) == 1
    assert "deleted files cannot be restored" in capsys.readouterr().out and snapshot(images) == after


def test_kill_during_delete_finds_the_file_in_the_manifest_written_first(collection, tmp_path):
    images, store = collection
    manifest = tmp_path / "d.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), FAULT_ENV: "coffee.jpg:deleted"}
    proc = subprocess.run([sys.executable, "-m", "deepfeat", "duplicates", str(store), "--no-verify", "--threshold",
                           "0.9", "--delete", "--yes", "--manifest", str(manifest)], env=env, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == -9, proc.stderr
    assert not (images / "coffee.jpg").exists()
    journal = manifest.with_name(manifest.name + ".log").read_text()
    assert "coffee.jpg" not in journal  # killed before its journal line, yet the manifest has it
    assert any(e["file"].endswith("/coffee.jpg") for e in json.loads(manifest.read_text())["entries"])


def test_kill_during_move_then_undo_loses_nothing(collection, tmp_path):
    images, store = collection
    before = snapshot(images)
    manifest = tmp_path / "m.json"
    dest = tmp_path / "moved"
    args = [sys.executable, "-m", "deepfeat", "duplicates", str(store), "--no-verify", "--threshold", "0.9",
            "--move-to", str(dest), "--manifest", str(manifest)]
    env = {**os.environ, "PYTHONPATH": str(SRC), FAULT_ENV: "coffee.jpg:moved"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    entries = json.loads(manifest.read_text())["entries"]
    moved = [e for e in entries if not os.path.exists(e["file"])]
    assert moved and all(os.path.exists(e["dest"]) for e in moved)  # every file in place or moved
    assert len(moved) < len(entries)  # killed in the middle
    journal = manifest.with_name(manifest.name + ".log").read_text().splitlines()
    assert len(journal) == len(moved) - 1  # the killed file moved but not yet journalled
    env.pop(FAULT_ENV)
    proc = subprocess.run([sys.executable, "-m", "deepfeat", "duplicates", "--undo", str(manifest)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert snapshot(images) == before


# -- "changed since it was extracted": the store's file records (issue 30) and sync's rule -----------


def _touch(path) -> None:
    """``touch`` *path*: the same bytes, a modification time after its shard was written (a second
    ahead of the clock, so that a coarse file-system clock cannot put it before)."""
    now = time.time_ns() + 1_000_000_000
    os.utime(path, ns=(now, now))


def test_touched_file_with_the_same_bytes_is_acted_on(collection, tmp_path):
    """A file touched after its extraction (or after the duplicates were found) still has the bytes the
    store recorded, so its features are not stale: it is moved, not refused for its mtime."""
    images, store = collection
    _touch(images / "rocket_small.jpg")  # before the duplicates are found
    rep = report(store)
    removable = {Path(rep.files[r].file).name: rep.files[r] for g in rep.groups for r in g.removable}
    assert set(removable) == {"cat.jpg", "coffee.jpg", "rocket_small.jpg"}
    assert all(f.recorded is not None for f in removable.values())  # a store with file records
    assert removable["rocket_small.jpg"].mtime_ns > removable["rocket_small.jpg"].extracted_ns
    _touch(removable["coffee.jpg"].file)  # after they were found
    before = snapshot(images)
    manifest, outcomes = apply(rep, move_to=str(tmp_path / "moved"))
    assert [o.state for o in outcomes] == ["moved"] * 3, outcomes
    doc = json.loads(manifest.read_text())
    assert all(e["recorded"]["sha256"] == e["sha256"] for e in doc["entries"])
    # a manifest written before the records were planned (no "recorded") still undoes
    for e in doc["entries"]:
        del e["recorded"]
    manifest.write_text(json.dumps(doc))
    assert [o.state for o in undo(manifest)] == ["restored"] * 3 and snapshot(images) == before


def test_file_edited_after_extraction_is_refused_naming_it(collection, tmp_path, capsys):
    """A duplicate whose bytes are no longer the ones it was extracted from (edited before the
    duplicates were found, so the report's own sha256 agrees with it) is skipped with a one-line
    reason naming the file; the others are moved."""
    images, store = collection
    small = images / "rocket_small.jpg"
    Image.open(small).save(small, quality=60)  # re-saved: other bytes, other size
    args = ["duplicates", str(store), "--no-verify", "--threshold", "0.9", "--move-to", str(tmp_path / "moved"),
            "--manifest", str(tmp_path / "m.json")]
    assert main(args) == 0
    out = capsys.readouterr().out
    line, = [x for x in out.splitlines() if x.startswith("skipped")]
    assert line.split()[1] == str(small), out
    assert "changed since it was extracted" in line and "deepfeat sync" in line
    assert small.exists() and "2 moved, 1 skipped" in out


def test_same_size_and_mtime_but_other_bytes_is_refused(collection, tmp_path):
    """The rare case sync's stat shortcut lets through (an in-place edit of the same size with its
    modification time put back): before deleting or moving, the bytes are always compared."""
    images, store = collection
    small = images / "rocket_small.jpg"
    st = os.stat(small)
    data = bytearray(small.read_bytes())
    assert data[6:11] == b"JFIF\0"
    data[15] ^= 0x01  # the JFIF header's horizontal density: the pixels are the same
    small.write_bytes(bytes(data))
    os.utime(small, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (os.stat(small).st_size, os.stat(small).st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    _, outcomes = apply(report(store), move_to=str(tmp_path / "moved"))
    by_name = {Path(o.file).name: o for o in outcomes}
    assert by_name["rocket_small.jpg"].state == "skipped"
    assert "changed since it was extracted" in by_name["rocket_small.jpg"].reason
    assert small.read_bytes() == bytes(data)


def test_a_store_without_file_records_keeps_the_old_rule(tmp_path, monkeypatch):
    """tests/data/presplit-store was extracted before the file records (a copy, given a duplicate of
    chelsea.jpg by a sync): its rows are judged by their modification time against their shard's, so
    an untouched file is acted on and a touched one is refused (a touch cannot be told from an edit)."""
    shutil.copytree(PRESPLIT, tmp_path / "presplit")
    monkeypatch.chdir(tmp_path / "presplit")
    shutil.copyfile("photos/chelsea.jpg", "photos/cat.jpg")
    assert main(["extract", "photos", "-o", "store", "--sync", "--backend", "torch", "--workers", "0",
                 "--progress", "none"]) == 0
    # the checkout gave the photos and shards arbitrary mtimes: put them in an extraction's order
    old = min(p.stat().st_mtime_ns for p in Path("store/shards").iterdir()) - 10_000_000_000
    os.utime("photos/chelsea.jpg", ns=(old, old))

    def chelsea(rep):
        g, = rep.groups
        assert [Path(rep.files[r].path).name for r in g.rows if r != g.keeper] == ["chelsea.jpg"]
        assert rep.files[g.keeper].recorded is not None  # cat.jpg, extracted now
        return rep.files[g.removable[0]]

    rep = find_duplicates("store", verify=False, threshold=0.9, keep="path")
    assert chelsea(rep).recorded is None
    _, outcomes = apply(rep, move_to=str(tmp_path / "moved"), dry_run=True)
    assert [o.state for o in outcomes] == ["would-move"]
    _touch("photos/chelsea.jpg")
    rep = find_duplicates("store", verify=False, threshold=0.9, keep="path")
    assert chelsea(rep).mtime_ns > chelsea(rep).extracted_ns
    _, outcomes = apply(rep, move_to=str(tmp_path / "moved"))
    assert [o.state for o in outcomes] == ["skipped"] and "modified after it was extracted" in outcomes[0].reason
    assert os.path.exists("photos/chelsea.jpg")
