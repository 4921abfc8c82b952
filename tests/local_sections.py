"""A store's local-feature section under kill -9 and resume: the test body that keypoint features
(test_verify) and regional descriptors (test_regional) share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from deepfeat.pipeline import ExtractConfig, extract


def section_bytes(store: Path, section: str) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((store / "local" / section).iterdir())}


def kill_and_resume(collection: Path, tmp_path: Path, extractor: str, section: str):
    """Two equal stores of *collection* (8 shards of 3 images); `deepfeat local-features --extractor
    EXTRACTOR` runs whole on the first, and on the second is killed (SIGKILL) once two of its eight
    shards are written (the fault hook ``commit-hang=2`` holds it there), then run again. Returns (shards written before the kill, the second run's
    CompletedProcess, the section's files after it, the uninterrupted run's files)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stores = []
    for name in ("ref", "run"):
        out = tmp_path / name
        extract(ExtractConfig(inputs=[str(collection)], output=str(out), pooling="gem", shard_size=3, workers=0,
                              progress="none"))
        stores.append(out)
    ref, out = stores
    cmd = [sys.executable, "-m", "deepfeat.cli", "local-features", "--extractor", extractor]
    subprocess.run([*cmd, str(ref)], check=True, env=env, capture_output=True)
    proc = subprocess.Popen([*cmd, str(out)], env={**env, "DEEPFEAT_FAULTS": "commit-hang=2"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = out / "local" / section
    for line in proc.stderr:  # the hook says when two shards are written, then waits
        if line.startswith("fault: 2 shard(s) committed"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be killed"
    n_before = len(list(folder.glob("*.npz")))
    res = subprocess.run([*cmd, str(out)], check=False, env=env, capture_output=True, text=True)
    return n_before, res, section_bytes(out, section), section_bytes(ref, section)
