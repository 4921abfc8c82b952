"""Issue 26, section 3 (part): every piece of work in the service's pools has a time bound, and
/api/health sees stuck workers.

A real server process (``python -m deepfeat.serve``) with one worker thread and a work timeout of
2 s; the test-only fault hook ``serve-hang`` (deepfeat.pipeline.faults) makes the decode of one
upload block until the server stops. That request gets a JSON 503 once the bound has passed,
/api/health then answers 503 naming the stuck work, and later requests get a 503 at once instead
of queueing behind the stuck thread. Nothing here sleeps: each step waits for the server's answer.
The inference thread's bound is tested on :class:`MicroBatcher` itself, with a forward pass that
blocks on an event the test sets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepfeat.serve.uploads import ApiError

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def store(sample_store) -> Path:
    return sample_store  # read only


@contextlib.contextmanager
def server(store: Path, *options: str, faults: str = ""):
    env = {**os.environ, "PYTHONPATH": SRC, "DEEPFEAT_FAULTS": faults}
    proc = subprocess.Popen([sys.executable, "-m", "deepfeat.serve", str(store), "--port", "0", "--log-level",
                             "warning", *options], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"(http://127\.0\.0\.1:\d+/) ", line):
                break
        assert m, "".join(lines)
        yield m.group(1)
    finally:
        proc.terminate()
        assert proc.wait(30) is not None  # the hung decode is released when the server stops


def _png(name: str, tmp_path: Path) -> tuple[str, bytes, str]:
    Image.new("RGB", (64, 48), "green").save(tmp_path / name)
    return name, (tmp_path / name).read_bytes(), "image/png"


@pytest.mark.slow
def test_a_hung_decode_gets_a_503_health_sees_it_and_later_requests_are_refused_at_once(store, tmp_path):
    with server(store, "--worker-threads", "1", "--work-timeout", "2", faults="serve-hang=hangme") as url, \
            httpx.Client(base_url=url, timeout=60) as h:
        ok = h.get("api/health")
        assert ok.status_code == 200 and ok.json()["status"] == "ok" and ok.json()["stuck"] == []
        assert h.post("api/search/upload", params={"k": 2}, files={"file": _png("fine.png", tmp_path)}).status_code == 200

        r = h.post("api/search/upload", params={"k": 2}, files={"file": _png("hangme.png", tmp_path)})
        assert r.status_code == 503, r.text
        assert "took longer than the server's work timeout of 2 s" in r.json()["error"]
        assert r.headers["retry-after"]

        health = h.get("api/health")
        assert health.status_code == 503 and health.json()["status"] == "stuck", health.text
        [stuck] = health.json()["stuck"]
        assert stuck["work"] == "decode upload" and stuck["pool"] == "io" and stuck["seconds"] >= 2

        for later in (lambda: h.post("api/search/upload", params={"k": 2}, files={"file": _png("fine.png", tmp_path)}),
                      lambda: h.get("api/items/0/thumbnail", params={"size": 100})):
            r = later()
            assert r.status_code == 503, r.text
            assert "all 1 worker threads are stuck" in r.json()["error"] and r.json()["detail"]["stuck"]
        assert h.get("api/items/0").status_code == 200  # what needs no worker still answers


def test_the_inference_thread_has_the_same_bound():
    from deepfeat.serve.microbatch import MicroBatcher
    from deepfeat.serve.workbound import WorkTracker

    release = threading.Event()

    def embed(pixels):
        release.wait()
        return np.zeros((len(pixels), 4), np.float32)

    batcher = MicroBatcher(embed, max_batch=1, window_ms=0, work=WorkTracker(0.5))
    batcher.start()
    px = np.zeros((8, 8, 3), np.uint8)

    async def two_requests():
        with pytest.raises(ApiError) as first:
            await batcher.submit(px)
        assert first.value.status == 503 and "inference took longer" in first.value.message
        assert [s["pool"] for s in batcher.work.stuck()] == ["inference"]
        with pytest.raises(ApiError) as second:
            await batcher.submit(px)
        assert second.value.status == 503 and "the inference thread is stuck" in second.value.message

    try:
        asyncio.run(two_requests())
    finally:
        release.set()
        batcher.stop()
    assert batcher.work.stuck() == []
