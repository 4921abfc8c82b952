"""The file-hash cache of a sync (deepfeat.pipeline.hashcache): a touched file is read once, not by
every later sync; an edit that puts the modification time back is still read; a damaged cache is
set aside; ``--no-cache`` reads the files. Real photos, the real embedded model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from deepfeat.cli import main
from deepfeat.pipeline import hashcache

FLAGS = ["--workers", "0", "--progress", "none"]


@pytest.fixture()
def store(tmp_path, photos, monkeypatch) -> Path:
    """Three photos extracted into ``store`` from *tmp_path*, with a private cache folder."""
    monkeypatch.setenv("DEEPFEAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    for name in ("astronaut", "chelsea", "rocket"):
        shutil.copy(photos[name], tmp_path / "photos" / f"{name}.jpg")
    assert main(["extract", "photos", "-o", "store", *FLAGS]) == 0
    return tmp_path / "store"


def _dry_run(capsys, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["sync", "store", "--dry-run", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _touch(path: Path, seconds: int = 5) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_a_touched_file_is_read_once_then_its_hash_comes_from_the_cache(store, capsys, caplog):
    _touch(Path("photos/astronaut.jpg"))
    first = _dry_run(capsys)
    assert (first["hashed"], first["hash_cached"], first["counts"]["unchanged"]) == (1, 0, 3)
    again = _dry_run(capsys)
    assert (again["hashed"], again["hash_cached"], again["counts"]["unchanged"]) == (0, 1, 3)
    assert _dry_run(capsys, "--no-cache")["hashed"] == 1  # --no-cache: read again
    # a plain re-run no longer warns about the touched file: its bytes are known to be the same
    caplog.clear()
    assert main(["extract", "photos", "-o", "store", *FLAGS]) == 0
    assert "changed since" not in caplog.text
    _touch(Path("photos/rocket.jpg"))  # not read by any sync yet: warned about
    caplog.clear()
    assert main(["extract", "photos", "-o", "store", *FLAGS]) == 0
    assert "1 file changed since it was extracted" in caplog.text


def test_an_edit_that_puts_the_mtime_back_is_read_and_found_changed(store, capsys):
    photo = Path("photos/chelsea.jpg")
    _touch(photo)
    assert _dry_run(capsys)["hashed"] == 1  # now cached at this stat
    st = photo.stat()
    data = bytearray(photo.read_bytes())
    data[-3] ^= 0xFF  # same size, other bytes, near the end of the JPEG
    photo.write_bytes(bytes(data))
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))  # the cached modification time put back
    plan = _dry_run(capsys)
    assert plan["hashed"] == 1 and plan["paths"]["changed"] == ["photos/chelsea.jpg"]


def test_a_damaged_cache_is_set_aside_and_started_afresh(store, tmp_path, capsys, caplog):
    _touch(Path("photos/astronaut.jpg"))
    _dry_run(capsys)
    db = tmp_path / "cache" / hashcache.FILE
    for extra in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        extra.unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    plan = _dry_run(capsys)
    assert plan["hashed"] == 1 and plan["counts"]["unchanged"] == 3
    assert "unreadable" in caplog.text and db.with_name(db.name + ".damaged").is_file()
    assert _dry_run(capsys)["hash_cached"] == 1  # the new cache works


def test_a_sync_counts_what_the_cache_decided(store, capsys):
    _touch(Path("photos/astronaut.jpg"))
    _dry_run(capsys)
    capsys.readouterr()
    assert main(["sync", "store", "--json", *FLAGS]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sync"]["hash_cached"] == 1 and report["sync"]["hashed"] == 0
    assert report["sync"]["counts"]["unchanged"] == 3 and report["processed"] == 0
