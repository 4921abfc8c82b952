"""The search service under overload, without credentials and with hostile uploads: every
answer is JSON, the server keeps serving. (The load test and the long fuzzing run are
benchmarks/load_serve.py and scripts/fuzz_serve.py; this is their quick part.)"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import io
import json
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
from fastapi.testclient import TestClient

from deepfeat.errors import UsageError
from deepfeat.serve import create_app
from deepfeat.serve.guards import ConcurrencyLimitMiddleware, key_matches, presented_key
from deepfeat.serve.uploads import ApiError

from .conftest import REPO
from .test_serve import assert_json_error, image_root, server_process, store  # noqa: F401  (module fixtures: a real store)

KEY = "test-key-0123456789"


def _jpeg(photos, name="chelsea") -> bytes:
    return Path(photos[name]).read_bytes()


# ---------------------------------------------------------------------------
# API key
# ---------------------------------------------------------------------------

def test_api_key_guards_every_api_route_but_not_the_page(store, image_root, photos):
    app = create_app(store, image_root=str(image_root), api_key=KEY, self_check=False)
    with TestClient(app) as c:
        for url in ("/api/health", "/api/info", "/api/items/0", "/api/items/0/thumbnail", "/api/search/item/0",
                    "/api/openapi.json", "/api", "/api/nope"):
            r = c.get(url)
            assert_json_error(r, 401, "API key")
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.headers["x-content-type-options"] == "nosniff"  # refusals carry the security headers too
        r = c.post("/api/search/upload", files={"file": ("q.jpg", _jpeg(photos), "image/jpeg")})
        assert_json_error(r, 401, "API key")
        for wrong in ("", "test-key-012345678", KEY + "x", KEY.upper()):
            assert_json_error(c.get("/api/health", headers={"X-API-Key": wrong}), 401)
            assert_json_error(c.get("/api/health", headers={"Authorization": f"Bearer {wrong}"}), 401)
        assert_json_error(c.get("/api/health", headers={"Authorization": f"Basic {KEY}"}), 401)
        # the three ways to present the key
        assert c.get("/api/health", headers={"X-API-Key": KEY}).json()["status"] == "ok"
        assert c.get("/api/info", headers={"Authorization": f"Bearer {KEY}"}).json()["auth"] == "api-key"
        c.cookies.set("deepfeat_key", KEY)  # what the page sets: <img> requests carry it
        r = c.get("/api/items/0/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        c.cookies.clear()
        r = c.post("/api/search/upload", headers={"X-API-Key": KEY}, params={"k": 2},
                   files={"file": ("q.jpg", _jpeg(photos), "image/jpeg")})
        assert r.status_code == 200 and r.json()["hits"][0]["path"].startswith("chelsea/")
        # the page stays usable: it asks for the key on the first 401
        assert c.get("/").status_code == 200
        js = c.get("/static/app.js")
        assert js.status_code == 200 and "r.status === 401" in js.text and "deepfeat_key" in js.text
    # without a key the server is open, as before
    with TestClient(create_app(store, image_root=str(image_root), self_check=False)) as c:
        assert c.get("/api/health").status_code == 200 and c.get("/api/info").json()["auth"] is None


def test_api_key_comparison_is_on_fixed_length_digests(monkeypatch):
    import hashlib

    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: seen.append((len(a), len(b))) or real(a, b))
    digest = hashlib.sha256(KEY.encode()).digest()
    assert key_matches(digest, KEY.encode())
    for other in (b"", b"x", KEY.encode()[:-1], KEY.encode() + b"!" * 1000, None):
        assert not key_matches(digest, other)
    # every comparison is of two 32-byte digests: its time does not depend on the presented key
    assert seen and set(seen) == {(32, 32)}
    assert presented_key([(b"cookie", b"a=1; deepfeat_key=ab%2Fc")]) == b"ab/c"
    assert presented_key([(b"cookie", b"\xff\xfe garbage;;==")]) is None
    assert presented_key([(b"authorization", b"Bearer  tok ")]) == b"tok"


def test_bad_api_keys_are_refused(store, monkeypatch, capsys):
    import uvicorn

    from deepfeat import cli

    for bad in ("short", "has space inside", " padded-key-123 ", "tab\tkey-1234"):
        with pytest.raises(UsageError, match="API key must be"):
            create_app(store, api_key=bad)
    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.append(self.config))
    monkeypatch.setenv("DEEPFEAT_API_KEY", KEY)
    assert cli.main(["serve", str(store), "--host", "0.0.0.0"]) == 0  # a key from the environment
    assert seen[-1].app.state.service.cfg.api_key == KEY
    err = capsys.readouterr().err
    assert "Anyone who has the API key" in err and "unencrypted" in err
    assert cli.main(["serve", str(store), "--host", "0.0.0.0", "--no-auth"]) == 2
    assert "contradict" in capsys.readouterr().err
    monkeypatch.delenv("DEEPFEAT_API_KEY")
    assert cli.main(["serve", str(store), "--api-key", "other-key-456"]) == 0
    assert seen[-1].app.state.service.cfg.api_key == "other-key-456"
    assert cli.main(["serve", str(store), "--api-key", "short"]) == 2


# ---------------------------------------------------------------------------
# overload: JSON 503 with Retry-After
# ---------------------------------------------------------------------------

def _gate_model(app):
    """Make the model wait for *release*; *entered* is set once a forward pass has started."""
    svc = app.state.service
    real = svc.batcher.embed
    entered, release = threading.Event(), threading.Event()

    def gated(pixels):
        entered.set()
        assert release.wait(60), "the test never released the model"
        return real(pixels)

    svc.batcher.embed = gated
    return svc, entered, release


class _Submits:
    """Counts the images the upload route has handed to the model's queue (or had refused)."""

    def __init__(self, svc):
        self.count = 0
        self._cond = threading.Condition()
        real = svc.batcher.submit

        async def submit(pixels, _ticket=None):
            task = asyncio.ensure_future(real(pixels, _ticket))
            await asyncio.sleep(0)  # one turn of the loop: *real* runs up to its wait for the model
            with self._cond:
                self.count += 1
                self._cond.notify_all()
            return await task

        svc.batcher.submit = submit

    def wait_for(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= n, 60), f"{self.count} of {n} images submitted"


def _post_in_thread(c, data, results, **params):
    def go():
        results.append(c.post("/api/search/upload", params={"k": 2, **params},
                              files={"file": ("q.jpg", data, "image/jpeg")}))
    t = threading.Thread(target=go)
    t.start()
    return t


def test_too_many_requests_in_progress_get_json_503_with_retry_after(store, image_root, photos):
    app = create_app(store, image_root=str(image_root), limit_concurrency=2, max_batch=1, self_check=False)
    with TestClient(app) as c:
        svc, entered, release = _gate_model(app)
        submits = _Submits(svc)
        results: list = []
        threads = [_post_in_thread(c, _jpeg(photos), results)]
        assert entered.wait(60)  # request 1 is in the model
        threads.append(_post_in_thread(c, _jpeg(photos, "coffee"), results))
        submits.wait_for(2)
        assert svc.batcher.queued == 1  # request 2 waits for it: 2 in progress
        for url in ("/api/health", "/api/search/item/0"):
            r = c.get(url)
            body = assert_json_error(r, 503, "busy: 2 requests")
            assert r.headers["retry-after"] == "1" and body["detail"] == {"limit": 2}
        release.set()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200]
        assert c.get("/api/health").json()["inference"]["requests"] == 2  # nothing lost, nothing left over


def test_full_model_queue_gets_json_503_with_retry_after(store, image_root, photos):
    app = create_app(store, image_root=str(image_root), max_queue=1, max_batch=1, self_check=False)
    with TestClient(app) as c:
        svc, entered, release = _gate_model(app)
        submits = _Submits(svc)
        results: list = []
        threads = [_post_in_thread(c, _jpeg(photos), results)]
        assert entered.wait(60)
        threads.append(_post_in_thread(c, _jpeg(photos, "coffee"), results))
        submits.wait_for(2)
        assert svc.batcher.queued == 1
        r = c.post("/api/search/upload", files={"file": ("q.jpg", _jpeg(photos, "astronaut"), "image/jpeg")})
        body = assert_json_error(r, 503, "images are already waiting for the model")
        assert r.headers["retry-after"] == "1" and body["detail"] == {"queue": 1}
        assert c.get("/api/search/item/0").status_code == 200  # searches by id do not need the model
        release.set()
        for t in threads:
            t.join(60)
        assert sorted(r.status_code for r in results) == [200, 200]


def test_a_stalled_body_gets_408():
    async def app(scope, receive, send):  # an app that reads its body (as the upload route does)
        try:
            await receive()
        except ApiError as e:
            sent.append(e.status)
            raise

    async def never():
        await asyncio.sleep(3600)

    sent: list = []
    mw = ConcurrencyLimitMiddleware(app, limit=4, body_timeout=0.05)

    async def send(message):
        pass

    with pytest.raises(ApiError) as e:
        asyncio.run(mw({"type": "http", "path": "/api/search/upload", "headers": []}, never, send))
    assert "stalled for more than 0.05 s" in e.value.message and e.value.headers == {"Connection": "close"}
    assert sent == [408] and mw.active == 0  # the slot is given back


# ---------------------------------------------------------------------------
# upload fuzzing (the quick part; scripts/fuzz_serve.py runs thousands)
# ---------------------------------------------------------------------------

def _fuzz_script():
    spec = importlib.util.spec_from_file_location("fuzz_serve", REPO / "scripts" / "fuzz_serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_hostile_uploads_all_get_json_4xx_and_the_server_keeps_serving(store, image_root, photos):
    app = create_app(store, image_root=str(image_root), max_upload_bytes=1 << 20, max_pixels=3_000_000,
                     self_check=False)
    fuzz = _fuzz_script()
    rng = np.random.default_rng(16)
    png = io.BytesIO()
    Image.open(photos["coffee"]).save(png, "PNG")
    cases = fuzz.hostile_uploads(rng, _jpeg(photos), png.getvalue())
    cases += [fuzz.mutated_upload(rng, _jpeg(photos, "coffee")) for _ in range(12)]
    with TestClient(app) as c:
        statuses = {}
        for label, kwargs in cases:
            r = c.post("/api/search/upload", **kwargs)
            assert r.headers["content-type"] == "application/json", label
            if label.startswith("mutated") and r.status_code == 200:  # a damaged image that still decodes
                assert r.json()["hits"], label
                continue
            assert 400 <= r.status_code < 500, (label, r.status_code, r.text[:200])
            body = r.json()
            assert set(body) == {"error", "detail"} and body["error"], label
            statuses[label] = r.status_code
        assert statuses["random bytes 0"] == 415 and statuses["png bomb header"] == 413
        assert statuses["json body"] == 415 and statuses["200 KB part header"] in (400, 413)
        r = c.post("/api/search/upload", params={"k": 2}, files={"file": ("q.jpg", _jpeg(photos), "image/jpeg")})
        assert r.status_code == 200 and r.json()["hits"][0]["path"].startswith("chelsea/")
        assert c.get("/api/health").json()["status"] == "ok"


# ---------------------------------------------------------------------------
# a real server: uvicorn's own refusals are JSON too
# ---------------------------------------------------------------------------

def _raw(port: int, data: bytes) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, body


@pytest.mark.slow
def test_a_real_server_with_a_key_answers_json_to_broken_http(store, image_root):
    with server_process(store, image_root, "--api-key", KEY,
                        env={**os.environ, "DEEPFEAT_API_KEY": ""}) as url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        for label, req in [("garbage", b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n"),
                           ("bad request line", b"GET\r\n\r\n"),
                           # headers past h11's 16 KiB limit (sent unfinished: all of it is read before the
                           # server closes, so the answer is not lost to a TCP reset)
                           ("20 KB of headers", b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000),
                           ("bad content-length", b"POST /api/search/upload HTTP/1.1\r\nHost: x\r\n"
                                                  b"Content-Length: -5\r\n\r\n")]:
            status, headers, body = _raw(port, req)
            assert status == 400 and headers["content-type"] == "application/json", (label, status, body)
            assert json.loads(body)["error"].startswith("malformed HTTP request"), label
        status, headers, body = _raw(port, b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 401 and json.loads(body)["error"].startswith("this server needs an API key")
        status, _, body = _raw(port, f"GET /api/health HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\n"
                                     f"Connection: close\r\n\r\n".encode())
        assert status == 200 and json.loads(body)["status"] == "ok"
