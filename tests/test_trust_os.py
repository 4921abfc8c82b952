"""Issue 26, section 4, with the operating system really failing (no injected OSError): a full disk
while ``meta.json`` is written, ``deepfeat index`` on a read-only store, ``export`` into a read-only
folder or onto a full disk, ``extract`` when the disk fills in the middle of a shard.

Each runs the real command in its own process and asserts the documented outcome: one line on
stderr naming the file and the system's reason, exit 1, and nothing lost (the store still opens,
verifies and answers as before; no temporary file left behind).

How the failures are made, so that they run on any Linux machine, CI included:

* a full disk: the process runs under ``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored, so a write that
  would make a file larger than the limit fails with ``EFBIG`` ("File too large"), as a write on a
  full disk fails with ``ENOSPC``; where a tmpfs can be mounted (root with CAP_SYS_ADMIN), the meta
  case is also run on a real, full tmpfs;
* a read-only folder: a read-only bind mount, else the immutable attribute (``chattr +i``), else (not
  root) ``chmod``; root ignores permission bits, so a test whose machine allows none of these is
  skipped, saying why.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from deepfeat import cli
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.store import FeatureStore
from deepfeat.store.lock import LOCK_NAME

from .test_store_integrity import pristine, store  # noqa: F401  (24 real photos, PCA 16, a flat index)

SRC = Path(__file__).resolve().parents[1] / "src"


def _deepfeat(*args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    """``deepfeat ARGS`` in a process of its own; *fsize*: no file it writes may grow past that many bytes."""
    def limits() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing it
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "deepfeat", *args], env=env, preexec_fn=limits, check=False,
                          capture_output=True, text=True, timeout=600)


def _error_line(p: subprocess.CompletedProcess, command: str) -> str:
    """The one error line (FAISS may print its own warnings before it), exit 1, no traceback."""
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"deepfeat {command}: error: "), p.stderr
    return errors[0]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def _verifies(root: Path, capsys) -> None:
    capsys.readouterr()
    assert cli.main(["info", str(root), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counts"]["bad"] == 0, report


def _answers(root: Path) -> list[list[int]]:
    from deepfeat.search import SearchEngine

    engine = SearchEngine(root)
    return [[h.id for h in hits] for hits in engine.search(engine.xb[[0, 9, 17]], k=5)]


def _run(*argv: str) -> bool:
    return subprocess.run(list(argv), capture_output=True, check=False).returncode == 0


@contextmanager
def read_only(folder: Path):
    """Make *folder* (and what is in it) read-only for real; yields the reason a write then fails with."""
    if _run("mount", "--bind", str(folder), str(folder)):
        if _run("mount", "-o", "remount,bind,ro", str(folder)):
            try:
                yield "Read-only file system"
            finally:
                _run("umount", str(folder))
            return
        _run("umount", str(folder))
    if _run("chattr", "-R", "+i", str(folder)):
        try:
            yield "Operation not permitted"
        finally:
            _run("chattr", "-R", "-i", str(folder))
        return
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield "Permission denied"
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    pytest.skip("no way to make a folder read-only here: as root, chmod is ignored, and neither a read-only bind "
                "mount (needs CAP_SYS_ADMIN) nor chattr +i (needs CAP_LINUX_IMMUTABLE) is allowed")


@contextmanager
def full_tmpfs(tmp_path: Path):
    """A real tmpfs of 4 MiB (skipped where it cannot be mounted), unmounted afterwards."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        _run("umount", "-l", str(mnt))


def _fill(mnt: Path) -> None:
    st = os.statvfs(mnt)
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize))


@pytest.mark.parametrize("disk", ["fsize", "tmpfs"])
def test_a_full_disk_while_meta_json_is_written_changes_nothing(store, disk, tmp_path, capsys):  # noqa: F811
    """`postprocess --post l2` on a PCA store: drops post.npz and rewrites meta.json, which cannot be written."""
    before_answers = _answers(store)
    if disk == "fsize":
        root, fsize, reason = store, (store / "meta.json").stat().st_size // 2, "File too large"
        cm = None
    else:
        cm = full_tmpfs(tmp_path)
        mnt = cm.__enter__()
        root, fsize, reason = mnt / "store", None, "No space left on device"
        shutil.copytree(store, root)
        _fill(mnt)
    try:
        before = _snapshot(root)
        line = _error_line(_deepfeat("postprocess", str(root), "--post", "l2", fsize=fsize), "postprocess")
        assert line.endswith(f"{reason}") and str(root) in line, line
        if disk == "fsize":
            assert line == f"deepfeat postprocess: error: cannot use {root}/meta.json: File too large"
        assert _snapshot(root) == before  # meta.json, post.npz and the rest as they were, no temporary file
        _verifies(root, capsys)
        assert _answers(root) == before_answers
        if disk == "tmpfs":
            (mnt / "filler").unlink()  # space returns
        assert _deepfeat("postprocess", str(root), "--post", "l2").returncode == 0  # the same command now works
        assert FeatureStore(root).meta["post"] == "l2" and not (root / "post.npz").exists()
        _verifies(root, capsys)
    finally:
        if cm is not None:
            cm.__exit__(None, None, None)


@pytest.mark.parametrize("kind", [["--kind", "flat"], ["--kind", "ivf", "--max-memory", "64M"]],
                         ids=["in-memory", "on-disk"])
def test_index_on_a_read_only_store_is_one_line_and_the_store_still_answers(store, kind, capsys):  # noqa: F811
    before, answers = _snapshot(store), _answers(store)
    with read_only(store) as reason:
        line = _error_line(_deepfeat("index", str(store), *kind), "index")
        # the in-memory index's file, or the on-disk build's staging folder beside the index folder
        assert line.startswith(f"deepfeat index: error: cannot use {store}/index") and line.endswith(reason), line
        assert ".tmp" not in line  # the real file's name
        assert _answers(store) == answers  # reading a read-only store is fine
    assert _snapshot(store) == before
    _verifies(store, capsys)


def test_export_into_a_read_only_folder_or_onto_a_full_disk_is_one_line_and_leaves_nothing(store, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out) as reason:
        line = _error_line(_deepfeat("export", str(store), "-o", str(out / "x.npz")), "export")
        assert line == f"deepfeat export: error: cannot use {out / 'x.npz'}: {reason}"
    assert list(out.iterdir()) == []
    line = _error_line(_deepfeat("export", str(store), "-o", str(out / "x.npz"), fsize=4096), "export")
    assert line == f"deepfeat export: error: cannot use {out / 'x.npz'}: File too large"
    assert list(out.iterdir()) == []  # the temporary file removed
    assert _deepfeat("export", str(store), "-o", str(out / "x.npz")).returncode == 0
    assert np.load(out / "x.npz")["features"].shape == (24, 16)


def test_extract_when_the_disk_fills_mid_shard_keeps_the_committed_shard(collection, tmp_path, capsys):
    """Shard 0 holds two empty files (10 KiB of vectors), shard 1 four photos (20 KiB): under a 16 KiB
    limit on file size, the write of shard 1's array fails part-way, as on a disk that fills."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "00-empty.jpg").write_bytes(b"")
    (inputs / "01-empty.jpg").write_bytes(b"")
    for i, f in enumerate(sorted((collection / "a").iterdir())[:6]):
        shutil.copy(f, inputs / f"p{i:02d}{f.suffix}")
    out = tmp_path / "store"
    argv = ["extract", str(inputs), "-o", str(out), "--shard-size", "4", "--workers", "0", "--backend", "torch",
            "--progress", "none"]
    line = _error_line(_deepfeat(*argv, fsize=16 * 1024), "extract")
    assert line == (f"deepfeat extract: error: cannot write shard 1 to {out}: File too large. Committed shards are "
                    "kept; free space and run the same command again to continue.")
    assert FeatureStore(out).committed_shards() == [0]
    assert not [f for f in out.rglob("*") if ".tmp" in f.name]
    shard0 = {k: v for k, v in _snapshot(out).items() if k.startswith("shards/000000.")}
    assert len(shard0) == 2
    _verifies(out, capsys)
    assert _deepfeat(*argv).returncode == 0  # space returns: the same command does the rest
    assert {k: v for k, v in _snapshot(out).items() if k in shard0} == shard0  # kept as it was, not redone
    _verifies(out, capsys)
    ref = tmp_path / "ref"
    extract(ExtractConfig(inputs=[str(inputs)], output=str(ref), shard_size=4, workers=0, backend="torch",
                          progress="none"))
    got, want = FeatureStore(out), FeatureStore(ref)
    assert got.paths == want.paths and len(got) == 6
    assert np.allclose(got.raw(), want.raw(), atol=1e-6)
