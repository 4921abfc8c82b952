"""A store's local-feature section under kill -9 and resume: the test body that keypoint features
(test_verify) and regional descriptors (test_regional) share."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deepfeat.pipeline import ExtractConfig, extract


def section_bytes(store: Path, section: str) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((store / "local" / section).iterdir())}


def kill_and_resume(collection: Path, tmp_path: Path, extractor: str, section: str):
    """Two equal stores of *collection* (8 shards of 3 images); `deepfeat local-features --extractor
    EXTRACTOR` runs whole on the first, and on the second is killed (SIGKILL) once some but not all of
    its shards are written, then run again. Returns (shards written before the kill, the second run's
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
    proc = subprocess.Popen([*cmd, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # generous: a loaded machine takes long to load the model
    folder = out / "local" / section
    while time.time() < deadline:  # wait until some, but not all, shards are written
        if (folder.is_dir() and len(list(folder.glob("*.npz"))) >= 2) or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0, "the run finished before it could be killed"
    n_before = len(list(folder.glob("*.npz")))
    res = subprocess.run([*cmd, str(out)], check=False, env=env, capture_output=True, text=True)
    return n_before, res, section_bytes(out, section), section_bytes(ref, section)
