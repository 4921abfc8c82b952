"""A corpus of hostile files (scripts/make_hostile_corpus.py): extract and check-images
report every one (or decode it, where that is the right answer), none crashes, none hangs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_hostile_file_is_reported_or_decoded_and_nothing_hangs(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_hostile_corpus.py"), str(tmp_path / "h")],
                   check=True, timeout=120)
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text(encoding="utf-8"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    deepfeat = [sys.executable, "-m", "deepfeat.cli"]
    # a hang would be cut by the per-image timeout (and then say "timed out"), a crash would lose the store;
    # the subprocess timeouts only stop a broken build from blocking the suite
    res = subprocess.run(deepfeat + ["extract", "files", "-o", "store", "--workers", "2", "--decode-timeout", "60",
                                     "--pool", "mac", "--post", "none", "--progress", "none"],
                         cwd=tmp_path / "h", env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    items = {os.path.relpath(r["path"], "files"): r for r in pq.read_table(tmp_path / "h" / "store" /
                                                                             "items.parquet").to_pylist()}
    assert set(items) == set(manifest), "every file is in the store's items, once"
    for name, want in manifest.items():
        got = items[name]
        if want["extract"] == "ok":
            assert got["status"] == "ok", (name, got["error"])
        else:
            assert got["status"] == "error" and want["extract"] in got["error"], (name, got["error"])
    failures = (tmp_path / "h" / "store" / "failures.csv").read_text(encoding="utf-8")
    assert all(n.split("/")[-1].split("\n")[0] in failures for n, w in manifest.items() if w["extract"] != "ok")
    assert "timed out" not in failures

    res = subprocess.run(deepfeat + ["check-images", "files", "--report", "report.json"], cwd=tmp_path / "h", env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr  # 1: some files are unusable
    rows = {os.path.relpath(r["path"], "files"): r for r in json.loads((tmp_path / "h" / "report.json").read_text())}
    assert set(rows) == set(manifest)
    for name, want in manifest.items():
        assert (rows[name]["status"] == "error") == (want["check"] == "error"), (name, rows[name])
    assert "3 frames (the first is used)" in rows["animated.gif"]["problems"]
    assert len(res.stdout.splitlines()) == sum(r["status"] != "ok" for r in rows.values())  # one line per file
