"""The soak script at CI scale: 300 images (real photos from the shared data where present,
a few percent broken), interrupted twice (SIGKILL, then SIGINT), resumed each time; the
store must equal an uninterrupted run byte for byte and list every broken file.
The full-scale run (20,000 images) and its result: docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_soak_small_interrupted_twice_equals_uninterrupted(tmp_path):
    env = {**os.environ, "DEEPFEAT_SHARED_DATA": str(SHARED_DATA)}
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "soak_extract.py"), "--images", "300",
                          "--interrupts", "2", "--real", "20", "--shard-size", "32", "--max-delay", "0.3",
                          "--workdir", str(tmp_path / "soak")], env=env, capture_output=True, text=True, timeout=1200)
    summary = json.loads(res.stdout)
    assert res.returncode == 0 and summary["ok"], res.stdout + res.stderr[-3000:]
    assert summary["identical"] and summary["differences"] == [] and summary["arrays_compared"] == summary["shards"]
    assert summary["items"] == 300 and summary["reported_failed"] == summary["broken"] == 9
    assert summary["broken_not_reported"] == [] and summary["every_broken_file_has_a_reason"]
    assert summary["effective_interrupts"] >= 1  # a run that finished before its signal is allowed, not all
    assert [e["signal"] for e in summary["interrupts"]] == ["SIGKILL", "SIGINT"]
