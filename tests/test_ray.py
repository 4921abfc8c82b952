"""The Ray engine: same store as the local pipeline, resumable, a killed actor retried once.

Needs the ``ray`` extra (``pip install 'deepfeat[ray]'``); those tests skip without it.
They start one local Ray instance (2 CPUs) for the module and extract a couple of
hundred real photos (Oxford Flowers 17 from ../shared/data when present, else crops
of the packaged sample photos).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from deepfeat.cli import main
from deepfeat.data.images import discover
from deepfeat.errors import StoreError, UsageError
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.pipeline.ray_engine import ShardWorker, _raise_worker_error
from deepfeat.store import FeatureStore

from .conftest import SHARED_DATA

N_IMAGES = 200
# a small fixed input keeps the test fast on 2 cores; decode, model and pooling are the real ones
SHARD = 10  # 20 shards: a run is still going when the driver hears of its first shards
KW = {"size": "warp:128x128", "pooling": "gem", "post": "l2", "shard_size": SHARD, "batch_size": 8, "progress": "none"}
ITEM_COLUMNS = ["id", "path", "status", "error", "width", "height", "shard", "offset", "notes"]


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def image_list(tmp_path_factory) -> Path:
    """A list file of N_IMAGES real photos, spread over all flower classes when available."""
    d = tmp_path_factory.mktemp("ray_images")
    flowers = SHARED_DATA / "flowers17"
    if flowers.is_dir():
        files = discover([str(flowers)])
        files = files[:: max(1, len(files) // N_IMAGES)][:N_IMAGES]
    else:
        from deepfeat.data.samples import write_sample_photos

        files = []
        srcs = [Image.open(p).convert("RGB") for p in write_sample_photos(d / "samples")]
        for k in range(N_IMAGES):  # distinct crops and sizes of the real photos
            img = srcs[k % len(srcs)]
            w, h = img.size
            j = k // len(srcs)
            box = (j % 7 * w // 40, j % 5 * h // 30, w - j % 4 * w // 35, h - j % 6 * h // 45)
            out = d / f"v{k:03d}.jpg"
            img.crop(box).resize((200 + 8 * (j % 9), 180 + 10 * (j % 7))).save(out, quality=90)
            files.append(str(out))
    assert len(files) >= 100
    lst = d / "images.txt"
    lst.write_text("\n".join(files) + "\n")
    return lst


def _cfg(image_list: Path, out: Path, **kw) -> ExtractConfig:
    return ExtractConfig(inputs=[f"@{image_list}"], output=str(out), **{**KW, **kw})


@pytest.fixture(scope="module")
def local_store(image_list, tmp_path_factory) -> FeatureStore:
    out = tmp_path_factory.mktemp("local") / "s"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor (1 CPU each): the same float arithmetic, bit for bit
    try:
        extract(_cfg(image_list, out, workers=0))
    finally:
        torch.set_num_threads(threads)
    return FeatureStore(out)


def _assert_same_store(a: FeatureStore, b: FeatureStore) -> None:
    ta, tb = a.items(refresh=True), b.items(refresh=True)
    assert ta.num_rows == tb.num_rows and ta.num_rows > 0
    assert ta.select(ITEM_COLUMNS).to_pylist() == tb.select(ITEM_COLUMNS).to_pylist()
    ids = tb.column("id").to_pylist()
    assert len(ids) == len(set(ids))  # every item written exactly once
    assert pq.read_table(b.path / "items.parquet").num_rows == tb.num_rows  # consolidated
    assert a.committed_shards() == b.committed_shards()
    xa, xb = a.raw(), b.raw()
    assert xa.shape == xb.shape and xa.shape[0] == len(a)
    assert np.abs(xa - xb).max() <= 1e-5
    assert np.abs(a.vectors() - b.vectors()).max() <= 1e-5
    # stronger: the same batches through the same code with the same thread count give the same
    # bits (with other thread counts the last bits move: ~1e-5 relative on raw GeM values)
    for s in a.committed_shards():
        assert a.shard_feature_path(s, "bn2").read_bytes() == b.shard_feature_path(s, "bn2").read_bytes()


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _shard_worker_pids() -> set[int]:
    """The live ShardWorker actors of the Ray instance this process started (Ray titles its
    workers after the actor class; they descend from us through the raylet), not another
    session's on the same machine."""
    me, pids = os.getpid(), set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if b"ShardWorker" not in (d / "cmdline").read_bytes():
                continue
            pid = int(d.name)
            while pid > 1 and pid != me:
                pid = _parent(pid)
        except (OSError, ValueError, IndexError):
            continue
        if pid == me and int(d.name) != me:
            pids.add(int(d.name))
    return pids


@pytest.mark.slow
def test_ray_equals_local_after_interrupt_and_resume(ray_local, image_list, local_store, tmp_path):
    out = tmp_path / "ray"
    seen: list[int] = []

    def stop_after_two(shard: int) -> None:
        seen.append(shard)
        if len(seen) == 2:
            raise KeyboardInterrupt  # as Ctrl-C on the driver

    with pytest.raises(KeyboardInterrupt):
        extract(_cfg(image_list, out, engine="ray", num_actors=2), on_shard=stop_after_two)
    store = FeatureStore(out)
    n_before = len(store.committed_shards())
    n_total = len(local_store.committed_shards())
    assert 2 <= n_before < n_total, (n_before, n_total)
    assert set(seen) <= set(store.committed_shards())
    # resume from the CLI, settings from the store, same batches; joins the running Ray instance
    rc = main(["extract", "--resume", "-o", str(out), "--engine", "ray", "--num-actors", "2",
               "--batch-size", "8", "--progress", "none"])
    assert rc == 0
    last = FeatureStore(out).meta["last_run"]
    assert last["skipped_shards"] >= n_before and 0 < last["processed"] <= N_IMAGES - SHARD * n_before
    _assert_same_store(local_store, FeatureStore(out))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds actor processes in /proc")
@pytest.mark.slow
def test_killed_actor_is_restarted_and_its_shard_written_once(ray_local, image_list, local_store, tmp_path):
    out = tmp_path / "ray"
    deadline = time.monotonic() + 60  # Ray stops the actors of a finished run a few seconds after it
    while _shard_worker_pids() and time.monotonic() < deadline:
        time.sleep(0.2)
    killed: list[int] = []

    def kill_an_actor(shard: int) -> None:
        if not killed:
            pids = _shard_worker_pids()
            assert len(pids) == 2, pids
            victim = min(pids)
            # mid-shard: when the driver hears of a shard, both actors are busy with the next ones
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    rep = extract(_cfg(image_list, out, engine="ray", num_actors=2), on_shard=kill_an_actor)
    assert killed and killed[0] not in _shard_worker_pids()
    # Ray restarted the actor and retried its shard; every shard is reported and written once
    assert rep.processed == N_IMAGES and rep.ok + rep.failed == N_IMAGES
    _assert_same_store(local_store, FeatureStore(out))


def _shard_rows(store: FeatureStore, shard: int):
    import pyarrow as pa

    plan = store.read_plan().to_pylist()
    items = [r for r in plan if r["shard"] == shard]
    return pa.table({"shard": [shard], "ids": [[r["id"] for r in items]], "paths": [[r["path"] for r in items]]})


def test_shard_worker_in_process_commits_once_and_reports_errors_as_data(collection, tmp_path):
    """The actor's logic without a cluster: a committed shard is not recomputed, a lost one is
    recomputed byte for byte, and a deepfeat error comes back as a row the driver re-raises."""
    out = tmp_path / "s"
    cfg = ExtractConfig(inputs=[str(collection)], output=str(out), pooling="gem", shard_size=10, batch_size=4,
                        workers=0, progress="none")
    extract(cfg)
    store = FeatureStore(out)
    npy = store.shard_feature_path(1, "bn2")
    items_file = out / "shards" / "000001.items.parquet"
    before = (npy.read_bytes(), pq.read_table(items_file).to_pylist(), items_file.stat().st_mtime_ns)

    threads = torch.get_num_threads()  # the same as the local run: byte-identical results
    worker = ShardWorker(ExtractConfig(**{**cfg.__dict__, "layers": ["bn2"], "device": "cpu"}), 2, threads)
    row = worker(_shard_rows(store, 1))
    assert row["skipped"].tolist() == [True] and row["ok"].tolist() == [10] and row["error"].tolist() == [""]
    assert items_file.stat().st_mtime_ns == before[2]  # not rewritten

    items_file.unlink()  # as if the worker died between the arrays and the commit marker
    row = worker(_shard_rows(store, 1))
    assert row["skipped"].tolist() == [False] and row["ok"].tolist() == [10] and row["infer"][0] > 0
    assert npy.read_bytes() == before[0] and pq.read_table(items_file).to_pylist() == before[1]

    # a node whose network differs from the store's (here: another pooling) must not write into it
    other = ShardWorker(ExtractConfig(**{**cfg.__dict__, "layers": ["bn2"], "pooling": "mac"}), 1, threads)
    items_file.unlink()
    row = other(_shard_rows(store, 1))
    assert row["error_type"].tolist() == ["StoreError"] and "pooling" in row["error"][0]
    assert not items_file.exists()
    with pytest.raises(StoreError, match=r"(?s)pooling.*Ray worker on .*shard 1"):
        _raise_worker_error({k: v[0] for k, v in row.items()})


def test_engine_ray_without_ray_says_how_to_install(monkeypatch, tmp_path, collection, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    with pytest.raises(UsageError, match=r"pip install 'deepfeat\[ray\]'"):
        extract(ExtractConfig(inputs=[str(collection)], output=str(tmp_path / "s"), engine="ray"))
    assert not (tmp_path / "s").exists()  # refused before any work
    assert main(["extract", str(collection), "-o", str(tmp_path / "s"), "--engine", "ray"]) == 2
    assert "deepfeat[ray]" in capsys.readouterr().err


def test_engine_options_are_checked(tmp_path, collection):
    with pytest.raises(UsageError, match="--engine"):
        extract(ExtractConfig(inputs=[str(collection)], output=str(tmp_path / "s"), engine="spark"))
    with pytest.raises(UsageError, match="--num-actors"):
        extract(ExtractConfig(inputs=[str(collection)], output=str(tmp_path / "s"), engine="ray", num_actors=0))
