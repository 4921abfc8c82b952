"""Extraction under injected faults: dead and hanging decode workers, a model that raises,
a disk that fills or turns read-only in the middle of a run, two writers on one store.

Each test ends with the store a user needs: the faulty image reported with its reason,
the committed shards kept, and a resumed run equal to an uninterrupted one.
(SIGTERM and SIGINT are in tests/test_extract.py::test_interrupt_then_resume_is_identical.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from deepfeat.cli import main
from deepfeat.errors import StoreError
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.pipeline.faults import ENV as FAULTS
from deepfeat.store import FeatureStore

FAST = dict(progress="none", batch_size=4, pooling="mac", post="none")


def _cfg(inputs, out, **kw) -> ExtractConfig:
    return ExtractConfig(inputs=[str(i) for i in inputs], output=str(out), **{**FAST, "workers": 0, **kw})


def _errors(store_dir) -> dict[str, str]:
    f = FeatureStore(store_dir).failed()
    return {Path(p).name: e for p, e in zip(f.column("path").to_pylist(), f.column("error").to_pylist())}


def _ok_rows(store_dir) -> dict[str, np.ndarray]:
    s = FeatureStore(store_dir)
    return {Path(p).name: row for p, row in zip(s.paths, s.raw())}


@pytest.fixture
def photos12(collection, tmp_path) -> Path:
    """12 real photos, three of them renamed so that an injected fault can name them."""
    d = tmp_path / "in"
    d.mkdir()
    for i, f in enumerate(sorted((collection / "a").iterdir())):
        name = {2: "killme.jpg", 5: "hangme.jpg", 9: "badmodel.jpg"}.get(i, f"p{i:02d}{f.suffix}")
        shutil.copy(f, d / name)
    return d


@pytest.fixture
def reference(photos12, tmp_path) -> dict[str, np.ndarray]:
    extract(_cfg([photos12], tmp_path / "ref", shard_size=5))
    return _ok_rows(tmp_path / "ref")


@pytest.mark.slow
def test_a_killed_or_hanging_decode_worker_costs_one_image_not_the_run(photos12, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULTS, "decode-kill=killme,decode-hang=hangme")
    rep = extract(_cfg([photos12], tmp_path / "s", shard_size=5, workers=2, decode_timeout=3))
    errors = _errors(tmp_path / "s")
    assert set(errors) == {"killme.jpg", "hangme.jpg"} and rep.failed == 2 and rep.ok == 10
    assert errors["killme.jpg"].startswith("its decode worker process died twice on it (killed by SIGKILL)")
    assert errors["hangme.jpg"] == "decode timed out after 3 s (its worker was killed and replaced)"
    got = _ok_rows(tmp_path / "s")
    assert set(got) == set(reference) - set(errors)
    for name, row in got.items():  # the rest of each batch is extracted, exactly as without faults
        assert np.array_equal(row, reference[name]), name
    assert "killme.jpg" in (tmp_path / "s" / "failures.csv").read_text()


def test_an_image_the_model_raises_on_is_reported_and_its_batch_extracted(photos12, reference, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv(FAULTS, "model-raise=badmodel")
    rep = extract(_cfg([photos12], tmp_path / "s", shard_size=5))
    errors = _errors(tmp_path / "s")
    assert errors == {"badmodel.jpg": "the network failed on this image: RuntimeError: injected fault: the model "
                                      "raises on badmodel.jpg"}
    assert rep.ok == 11
    got = _ok_rows(tmp_path / "s")
    for name, row in got.items():  # its batch mates went through one at a time: same features
        assert np.allclose(row, reference[name], rtol=1e-4, atol=1e-5), name


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.decode().strip()}")


@pytest.fixture
def small_fs(tmp_path):
    """A real, small file system of its own (tmpfs), unmounted afterwards."""
    mnt = tmp_path / "fs"
    _mount_tmpfs(mnt, "4m")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_disk_that_fills_mid_shard_keeps_committed_shards_and_resumes(photos12, reference, small_fs, tmp_path):
    out = small_fs / "s"
    filler = small_fs / "filler"

    def fill_after_two(shard: int) -> None:
        if shard == 1:  # leave 8 KB: the next shard's 5 x 1280 float32 array (25 KB) does not fit
            st = os.statvfs(small_fs)
            with open(filler, "wb") as f:
                f.write(b"\0" * (st.f_bavail * st.f_frsize - 8192))

    with pytest.raises(StoreError, match="cannot write shard 2 .*No space left on device.*Committed shards are kept"):
        extract(_cfg([photos12], out, shard_size=5), on_shard=fill_after_two)
    assert FeatureStore(out).committed_shards() == [0, 1]
    assert not [f for f in (out / "shards").iterdir() if ".tmp-" in f.name]
    filler.unlink()  # space returns
    rep = extract(_cfg([photos12], out, shard_size=5))
    assert rep.skipped_shards == 2 and rep.processed == 2
    got = _ok_rows(out)
    assert got.keys() == reference.keys() and all(np.array_equal(got[k], reference[k]) for k in got)


def test_a_store_turned_read_only_is_refused_before_work_and_resumes(photos12, reference, small_fs):
    out = small_fs / "s"

    def remount(mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(small_fs)], check=True)

    def read_only_after_first(shard: int) -> None:
        if shard == 0:
            remount("ro")

    try:
        with pytest.raises(StoreError, match="cannot write shard 1 .*Read-only file system.*Committed shards are kept"):
            extract(_cfg([photos12], out, shard_size=5), on_shard=read_only_after_first)
        assert FeatureStore(out).committed_shards() == [0]
        # the next run is refused at once, before the model is loaded or an image decoded
        with pytest.raises(StoreError, match=f"cannot write to the store {out}: Read-only file system. "
                                             "Nothing was changed"):
            extract(_cfg([photos12], out, shard_size=5))
    finally:
        remount("rw")
    rep = extract(_cfg([photos12], out, shard_size=5))
    assert rep.skipped_shards == 1
    got = _ok_rows(out)
    assert got.keys() == reference.keys() and all(np.array_equal(got[k], reference[k]) for k in got)


@pytest.mark.slow
def test_two_extracts_on_one_store_a_second_writer_is_refused_and_kill_9_leaves_no_stale_lock(photos12, tmp_path, capsys):
    out = tmp_path / "s"
    # the first run waits (holding the lock, its plan written) before it commits its first shard
    env = {**os.environ, FAULTS: "commit-hang=0", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "deepfeat.cli", "extract", str(photos12), "-o", str(out), "--shard-size", "5",
           "--batch-size", "4", "--workers", "1", "--pool", "mac", "--post", "none", "--progress", "none",
           "--decode-timeout", "0"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        said = []
        for line in first.stderr:  # until it says it waits (or ends without saying so)
            said.append(line)
            if line.startswith(b"fault: 0 shard(s) committed"):
                break
        assert first.poll() is None, b"".join(said)
        # a second writer is refused with the holder's pid, whether a library call or the CLI
        with pytest.raises(StoreError, match=f"being written by another `deepfeat extract` \\(pid {first.pid} "):
            extract(_cfg([photos12], out, shard_size=5))
        second = subprocess.run(cmd, env=os.environ, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and f"pid {first.pid}" in second.stderr
        # nor may `postprocess` rewrite the store's meta under a running extract
        assert main(["postprocess", str(out), "--post", "l2"]) == 1
        assert f"pid {first.pid}" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)  # it waits before its first shard, holding the lock
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    rep = extract(_cfg([photos12], out, shard_size=5))  # the dead holder's lock is gone with it
    assert rep.ok == 12 and len(FeatureStore(out)) == 12
