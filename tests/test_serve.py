"""The search service (`deepfeat serve`): every endpoint through FastAPI's test client, on a
store of real photos embedded by the real model; bad uploads, unknown ids, traversal
attempts; the micro-batching inference thread; the CLI, and a real server process."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
from fastapi.testclient import TestClient

from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.search import SearchEngine
from deepfeat.serve import create_app
from deepfeat.serve.microbatch import MicroBatcher, group_by_shape
from deepfeat.serve.routes import STATIC_DIR
from deepfeat.serve.uploads import ApiError

MAX_UPLOAD = 1 << 20  # small limits, so that real files can exceed them
MAX_PIXELS = 3_000_000


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, photos) -> Path:
    """Three views of each sample photo, one folder per photo (relevant = same folder), plus a
    file that is deleted after extraction (an item whose image has gone)."""
    root = tmp_path_factory.mktemp("serve_images")
    for name, p in photos.items():
        img = Image.open(p).convert("RGB")
        w, h = img.size
        d = root / name
        d.mkdir()
        img.crop((w // 10, h // 10, w - w // 8, h - h // 12)).save(d / "crop.jpg", quality=90)
        ImageOps.mirror(img).save(d / "mirror.jpg", quality=90)
        img.resize((w * 2 // 3, h * 2 // 3)).save(d / "small.png")
    (root / "zz_gone").mkdir()
    Image.open(photos["coffee"]).rotate(90, expand=True).save(root / "zz_gone" / "gone.jpg")
    return root


@pytest.fixture(scope="module")
def store(image_root, tmp_path_factory) -> Path:
    """A store with paths relative to *image_root* (extracted from inside it)."""
    out = tmp_path_factory.mktemp("serve_store") / "store"
    cwd = os.getcwd()
    os.chdir(image_root)
    try:
        extract(ExtractConfig(inputs=["."], output=str(out), workers=0, progress="none"))
    finally:
        os.chdir(cwd)
    (image_root / "zz_gone" / "gone.jpg").unlink()
    return out


@pytest.fixture(scope="module")
def app(store, image_root):
    return create_app(store, max_upload_bytes=MAX_UPLOAD, max_pixels=MAX_PIXELS, top_k_max=20,
                      image_root=str(image_root))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def engine(store) -> SearchEngine:
    return SearchEngine(store)


def upload(client, data: bytes, name: str = "q.jpg", ctype: str = "image/jpeg", **params):
    return client.post("/api/search/upload", params=params, files={"file": (name, data, ctype)})


def assert_json_error(r, status: int, pattern: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "detail"} and isinstance(body["error"], str) and body["error"]
    assert re.search(pattern, body["error"], re.IGNORECASE), body["error"]
    return body


def id_of(engine: SearchEngine, path: str) -> int:
    return int(engine.ids[engine.paths.index(path)])


# ---------------------------------------------------------------------------
# info, health, schema, page
# ---------------------------------------------------------------------------

def test_health_info_schema_and_page(client, engine, store):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["items"] == 16
    # start-up embedded a stored image the way queries are embedded: it matches its stored vector
    assert h["self_check"]["status"] == "ok" and h["self_check"]["cosine"] > 0.999

    info = client.get("/api/info").json()
    assert info["count"] == 16 and info["dim"] == engine.xb.shape[1] == 1280
    assert (info["model"], info["feature"], info["pooling"], info["post"]) == ("efficientnet_lite0", "bn2",
                                                                               "gem:p=3", "l2")
    assert info["meta"]["model"]["weights_sha256"] == json.loads((store / "meta.json").read_text())["model"][
        "weights_sha256"]
    assert info["limits"] == {"max_upload_bytes": MAX_UPLOAD, "max_pixels": MAX_PIXELS, "top_k_max": 20,
                              "default_k": 10, "thumbnail_sizes": [16, 1024], "concurrency": 64, "queue": 64,
                              "body_timeout_seconds": 30.0}

    schema = client.get("/api/openapi.json").json()
    for path in ("/api/health", "/api/info", "/api/items/{item_id}", "/api/items/{item_id}/thumbnail",
                 "/api/items/{item_id}/image", "/api/search/item/{item_id}", "/api/search/item",
                 "/api/search/upload", "/api/search/vector"):
        assert path in schema["paths"], path
    assert "multipart/form-data" in schema["paths"]["/api/search/upload"]["post"]["requestBody"]["content"]

    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset, ctype in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and ctype in r.headers["content-type"]
    # everything is served locally: no page asset refers to another host
    for f in STATIC_DIR.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", f.read_text(), re.IGNORECASE), f.name


# ---------------------------------------------------------------------------
# search
# ---------------------------------------------------------------------------

def test_search_by_upload_finds_the_views_of_the_photo(client, photos, engine):
    data = Path(photos["coffee"]).read_bytes()
    r = client.post("/api/search/upload", params={"k": 3}, files={"file": ("espresso.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["query"] == {"kind": "upload", "filename": "espresso.jpg", "bytes": len(data), "format": "JPEG",
                            "width": 600, "height": 400, "bbox": None}
    hits = res["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(h["path"].startswith("coffee/") for h in hits), hits
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.8
    assert hits[0]["thumbnail"] == f"/api/items/{hits[0]['id']}/thumbnail"
    assert set(res["took_ms"]) == {"receive", "decode", "embed", "search", "total"}
    # the query is embedded exactly as the CLI/library embeds it (same model, layer, pooling, post)
    want = engine.search(engine.embed_images([photos["coffee"]]), k=3)[0]
    assert [h["id"] for h in hits] == [h.id for h in want]
    assert np.allclose(scores, [h.score for h in want], atol=1e-4)


def test_search_by_upload_with_a_region_and_other_formats(client, photos):
    img = Image.open(photos["astronaut"])
    buf = io.BytesIO()
    img.save(buf, "PNG")
    r = upload(client, buf.getvalue(), "a.png", "image/png", k=2, bbox="0,0,300,300")
    assert r.status_code == 200, r.text
    assert r.json()["query"]["format"] == "PNG" and r.json()["query"]["bbox"] == [0, 0, 300, 300]
    assert all(h["path"].startswith("astronaut/") for h in r.json()["hits"])
    buf = io.BytesIO()
    img.convert("RGBA").save(buf, "WEBP")
    r = upload(client, buf.getvalue(), "a.webp", "application/octet-stream", k=1)  # declared type is not trusted
    assert r.status_code == 200 and r.json()["hits"][0]["path"].startswith("astronaut/")
    assert_json_error(upload(client, Path(photos["astronaut"]).read_bytes(), bbox="10,10,5,5"), 422, "bbox")
    assert_json_error(upload(client, Path(photos["astronaut"]).read_bytes(), bbox="a,b"), 422, "bbox")
    assert_json_error(upload(client, Path(photos["astronaut"]).read_bytes(), bbox="5000,5000,6000,6000"), 422,
                      "crop box")


def test_search_by_item_id_and_path(client, engine):
    qid = id_of(engine, "chelsea/mirror.jpg")
    r = client.get(f"/api/search/item/{qid}", params={"k": 2})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["query"]["kind"] == "item" and res["query"]["id"] == qid
    assert res["query"]["path"] == "chelsea/mirror.jpg"
    assert [h["path"] for h in res["hits"]] and qid not in [h["id"] for h in res["hits"]]  # itself excluded
    assert all(h["path"].startswith("chelsea/") for h in res["hits"])
    own = client.get(f"/api/search/item/{qid}", params={"k": 2, "include_self": "true"}).json()["hits"]
    assert own[0]["id"] == qid and abs(own[0]["score"] - 1.0) < 1e-4
    by_path = client.get("/api/search/item", params={"path": "chelsea/mirror.jpg", "k": 2}).json()
    assert by_path["hits"] == res["hits"]
    # a path is matched against the stored paths only (normalised), never opened
    assert client.get("/api/search/item", params={"path": "chelsea/./x/../mirror.jpg", "k": 2}).json()["hits"] \
        == res["hits"]
    assert client.get(f"/api/search/item/{qid}").json()["k"] == 10  # default k
    assert len(client.get(f"/api/search/item/{qid}", params={"k": 20}).json()["hits"]) == 15  # all but itself


def test_search_by_vector(client, engine):
    row = engine.paths.index("rocket/crop.jpg")
    v = engine.xb[row].tolist()
    res = client.post("/api/search/vector", json={"vector": v, "k": 3}).json()
    assert res["query"] == {"kind": "vector", "dim": 1280}
    assert res["hits"][0]["path"] == "rocket/crop.jpg" and abs(res["hits"][0]["score"] - 1) < 1e-4
    assert all(h["path"].startswith("rocket/") for h in res["hits"])
    assert client.post("/api/search/vector", json={"vector": v}).json()["k"] == 10
    assert_json_error(client.post("/api/search/vector", json={"vector": v[:100], "k": 3}), 422,
                      "100 dimensions.*1280")
    body = '{"vector": [' + ", ".join(["NaN"] + ["0.1"] * 1279) + "]}"
    assert_json_error(client.post("/api/search/vector", content=body,
                                  headers={"content-type": "application/json"}), 422, "")
    assert_json_error(client.post("/api/search/vector", json={"vector": v, "k": 21}), 422, "k")
    assert_json_error(client.post("/api/search/vector", json={"k": 3}), 422, "vector")
    assert_json_error(client.post("/api/search/vector", content="{not json",
                                  headers={"content-type": "application/json"}), 422, "")
    # a JSON body larger than any vector could need is refused before it is parsed
    assert_json_error(client.post("/api/search/vector", content=b"[" + b"0.1," * 400_000 + b"0]",
                                  headers={"content-type": "application/json"}), 413, "larger than")


@pytest.mark.parametrize("url", [
    "/api/search/item/1?k=0", "/api/search/item/1?k=21", "/api/search/item/1?k=ten",
    "/api/items/1/thumbnail?size=8", "/api/items/1/thumbnail?size=5000", "/api/search/item/abc",
])
def test_bad_parameters_are_422(client, url):
    assert_json_error(client.get(url), 422, "invalid request")


# ---------------------------------------------------------------------------
# items, thumbnails, images
# ---------------------------------------------------------------------------

def test_items_thumbnails_and_images(client, app, engine, image_root):
    iid = id_of(engine, "hubble/mirror.jpg")
    item = client.get(f"/api/items/{iid}").json()
    assert item["path"] == "hubble/mirror.jpg" and (item["width"], item["height"]) == (1000, 872)

    svc = app.state.service
    misses = svc.thumbs.stats()["misses"]
    r = client.get(f"/api/items/{iid}/thumbnail", params={"size": 96})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    th = Image.open(io.BytesIO(r.content))
    assert th.format == "JPEG" and max(th.size) == 96 and th.size[0] > th.size[1]  # aspect kept (1000x872)
    again = client.get(f"/api/items/{iid}/thumbnail", params={"size": 96})
    assert again.content == r.content
    st = svc.thumbs.stats()
    assert st["misses"] == misses + 1 and st["hits"] >= 1  # the second one came from the LRU

    r = client.get(f"/api/items/{iid}/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == (image_root / "hubble" / "mirror.jpg").read_bytes()
    png = client.get(f"/api/items/{id_of(engine, 'hubble/small.png')}/image")
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"


def test_unknown_ids_and_missing_files_are_404(client, engine):
    unknown = int(engine.ids.max()) + 1000
    for url in (f"/api/items/{unknown}", f"/api/items/{unknown}/thumbnail", f"/api/items/{unknown}/image",
                f"/api/search/item/{unknown}", "/api/items/-1/image"):
        assert_json_error(client.get(url), 404, "no item with id")
    assert_json_error(client.get("/api/search/item", params={"path": "nope.jpg"}), 404, "no item with this path")
    gone = id_of(engine, "zz_gone/gone.jpg")  # in the store, but its file was deleted
    assert_json_error(client.get(f"/api/items/{gone}/thumbnail"), 404, "cannot be read")
    assert_json_error(client.get(f"/api/items/{gone}/image"), 404, "missing")
    assert client.get(f"/api/search/item/{gone}", params={"k": 1}).status_code == 200  # its vector is still there
    assert_json_error(client.get("/api/nothing-here"), 404, "not found")
    assert_json_error(client.delete("/api/info"), 405, "not allowed")


def test_traversal_attempts_never_reach_files(client, image_root):
    secret = image_root.parent / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT\n")
    attempts = [
        "/static/../pyproject.toml", "/static/%2e%2e/app.py", "/static/..%2fapp.py", "/static/%2e%2e%2f__init__.py",
        "/static/..%2f..%2f..%2fpyproject.toml", "/static//etc/passwd", "/static/%2fetc%2fpasswd",
        "/api/items/..%2f..%2fetc%2fpasswd/image", "/api/items/%2e%2e/image", "/api/items/1%2f..%2f..%2fx/image",
        "/api/items/0x1/image", "/api/items/1;rm/image",
        "/api/search/item?path=/etc/passwd", "/api/search/item?path=../secret.txt",
        f"/api/search/item?path={secret}", "/api/search/item?path=chelsea/../../secret.txt",
        "/api/search/item?path=%2e%2e%2fsecret.txt",
    ]
    for url in attempts:
        r = client.get(url)
        assert r.status_code in (404, 422), (url, r.status_code)
        assert r.headers["content-type"].startswith("application/json"), url
        assert "TOP-SECRET" not in r.text and "root:" not in r.text and "import" not in r.text, url


# ---------------------------------------------------------------------------
# bad uploads
# ---------------------------------------------------------------------------

def test_bad_uploads(client, odd_images, photos):
    assert_json_error(upload(client, b""), 422, "empty")
    assert_json_error(upload(client, odd_images["not_image.jpg"].read_bytes()), 415, "not an image")
    assert_json_error(upload(client, b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), 415, "not an image")
    assert_json_error(upload(client, b"<svg xmlns='http://www.w3.org/2000/svg'/>", "x.svg", "image/svg+xml"), 415,
                      "not an image")
    # a decompression bomb: a few hundred bytes declaring 60000 x 60000 pixels
    body = assert_json_error(upload(client, odd_images["bomb.png"].read_bytes(), "bomb.png", "image/png"), 413,
                             "too many pixels")
    assert body["detail"]["max_pixels"] == MAX_PIXELS
    # a real photo, enlarged past the pixel limit (but under the byte limit)
    big = io.BytesIO()
    Image.open(photos["chelsea"]).resize((2400, 1600)).save(big, "JPEG", quality=30)
    assert len(big.getvalue()) < MAX_UPLOAD
    assert_json_error(upload(client, big.getvalue()), 413, r"2400x1600 = 3840000 .*3000000")
    # a real photo, over the byte limit
    huge = io.BytesIO()
    Image.open(photos["chelsea"]).resize((1600, 1066)).save(huge, "PNG", compress_level=1)
    assert len(huge.getvalue()) > MAX_UPLOAD
    body = assert_json_error(upload(client, huge.getvalue(), "big.png", "image/png"), 413, "larger than")
    assert body["detail"]["limit_bytes"] == MAX_UPLOAD
    # a file just over the limit, inside the multipart slack: stopped at limit + 1 bytes by the parser
    assert_json_error(upload(client, b"\xff\xd8\xff" + b"0" * MAX_UPLOAD), 413, "uploaded file is larger")
    assert_json_error(upload(client, odd_images["truncated.jpg"].read_bytes()), 422, "cannot decode.*truncated")


def test_malformed_requests(client, photos):
    data = Path(photos["coffee"]).read_bytes()
    assert_json_error(client.post("/api/search/upload", files={"image": ("q.jpg", data, "image/jpeg")}), 422,
                      "no form field named 'file'")
    assert_json_error(client.post("/api/search/upload", content=data, headers={"content-type": "image/jpeg"}),
                      415, "multipart/form-data")
    assert_json_error(client.post("/api/search/upload", json={"file": "x"}), 415, "multipart")
    assert_json_error(client.post("/api/search/upload", content=b"--xyz\r\nContent-Disposition: form-data; "
                                  b'name="file"; filename="a.jpg"\r\n\r\n' + data[:1000],
                                  headers={"content-type": "multipart/form-data; boundary=xyz"}), 400, "malformed")

    # a chunked body (no Content-Length) is cut off as soon as it passes the limit
    def chunks():
        for _ in range(100):
            yield b"x" * 65536

    r = client.post("/api/search/upload", content=chunks(),
                    headers={"content-type": "multipart/form-data; boundary=abc"})
    assert_json_error(r, 413, "larger than")


# ---------------------------------------------------------------------------
# concurrency: the inference thread, micro-batches, the event loop
# ---------------------------------------------------------------------------

def test_group_by_shape():
    a, b = np.zeros((2, 2, 3)), np.zeros((3, 2, 3))
    assert group_by_shape([a, b, a, a, b], 8) == [[0, 2, 3], [1, 4]]
    assert group_by_shape([a, a, a, b], 2) == [[0, 1], [2], [3]]


def test_micro_batcher_batches_groups_and_isolates_errors():
    calls = []
    entered, release = threading.Event(), threading.Event()

    def embed(batch):
        calls.append([int(px[0, 0, 0]) for px in batch])
        entered.set()
        assert release.wait(60), "the test never released the model"
        if any(px.shape[0] == 3 for px in batch):
            raise RuntimeError("this shape fails")
        return np.stack([px.reshape(-1)[:1].astype(np.float32) for px in batch])

    b = MicroBatcher(embed, max_batch=8, window_ms=0, max_queue=5)

    async def main():
        b.start()
        try:
            first = asyncio.ensure_future(b.submit(np.full((2, 2, 3), 9, np.uint8)))
            # the first request is in the model (blocked); queue the others behind it
            assert await asyncio.get_running_loop().run_in_executor(None, entered.wait, 60)
            futs = [asyncio.ensure_future(b.submit(np.full((2, 2, 3), i, np.uint8))) for i in range(4)]
            futs += [asyncio.ensure_future(b.submit(np.full((3, 2, 3), 7, np.uint8)))]
            await asyncio.sleep(0)  # one turn of the loop: each submit runs up to its wait for the model
            assert b.queued == 5
            with pytest.raises(ApiError) as e:  # the queue is full: 503 at once, not an unbounded wait
                await b.submit(np.zeros((2, 2, 3), np.uint8))
            assert e.value.status == 503
            release.set()
            return await first, await asyncio.gather(*futs, return_exceptions=True)
        finally:
            b.stop()

    one, rest = asyncio.run(main())
    assert float(one[0]) == 9
    assert [float(r[0]) for r in rest[:4]] == [0, 1, 2, 3]  # each request gets its own vector back
    assert isinstance(rest[4], RuntimeError)  # only the failing group fails
    assert calls == [[9], [0, 1, 2, 3], [7]]  # 1, then one batch of 4 and the other shape on its own
    st = b.stats.to_dict()
    assert st["requests"] == 6 and st["forward_passes"] == 3 and st["largest_batch"] == 4


def test_micro_batcher_waits_only_for_announced_requests():
    """A lone request runs at once, even with a long window; an announced one is waited for.
    (The window is an hour: a lone request that waited for it would not finish.)"""
    passes = []

    def embed(batch):
        passes.append(len(batch))
        return np.stack([px.reshape(-1)[:1].astype(np.float32) for px in batch])

    b = MicroBatcher(embed, max_batch=8, window_ms=3_600_000)

    async def main():
        b.start()
        try:
            alone = await b.submit(np.full((2, 2, 3), 1, np.uint8))
            with b.announce() as ticket:  # a request still decoding...
                assert b.incoming == 1
                first = asyncio.ensure_future(b.submit(np.full((2, 2, 3), 2, np.uint8)))
                await asyncio.sleep(0)
                assert not first.done()  # ...is waited for, within the window (one pass of 2 below)
                second = await ticket.submit(np.full((2, 2, 3), 3, np.uint8))
            assert b.incoming == 0
            with b.announce():  # a request that fails before it submits withdraws its announcement
                pass
            assert b.incoming == 0
            return alone, await first, second
        finally:
            b.stop()

    alone, first, second = asyncio.run(main())
    assert (float(alone[0]), float(first[0]), float(second[0])) == (1, 2, 3)
    assert passes == [1, 2]


def test_concurrent_uploads_are_batched_and_match_single_embeddings(store, image_root, photos, engine):
    app = create_app(store, image_root=str(image_root), max_batch=4, batch_window_ms=60_000, worker_threads=4,
                     self_check=False)
    svc = app.state.service
    names = ["chelsea", "coffee", "astronaut", "rocket"]
    all_decoding = threading.Barrier(4, timeout=60)
    decode = svc.decode_upload

    def decode_together(data, bbox):  # every request has announced itself before any of them submits
        all_decoding.wait()
        return decode(data, bbox)

    svc.decode_upload = decode_together
    with TestClient(app) as c:
        results = {}

        def go(name):
            results[name] = upload(c, Path(photos[name]).read_bytes(), k=3)

        threads = [threading.Thread(target=go, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        st = c.get("/api/health").json()["inference"]
    # four requests, one forward pass (the batch was full long before the window ran out)
    assert st["requests"] == 4 and st["forward_passes"] == 1 and st["batch_sizes"] == {"4": 1}
    for n in names:
        r = results[n]
        assert r.status_code == 200, r.text
        want = engine.search(engine.embed_images([photos[n]]), k=3)[0]  # one image at a time
        assert [h["id"] for h in r.json()["hits"]] == [h.id for h in want]
        assert np.allclose([h["score"] for h in r.json()["hits"]], [h.score for h in want], atol=1e-4)


def test_inference_does_not_block_the_event_loop(client, app, photos):
    """While the model is busy with an upload, other requests are answered (before the test
    releases the model: a blocked event loop would answer them only after the model gave up)."""
    batcher = app.state.service.batcher
    entered, release = threading.Event(), threading.Event()
    real = batcher.embed
    released = []

    def slow_embed(batch):
        entered.set()
        released.append(release.wait(60))
        return real(batch)

    batcher.embed = slow_embed
    try:
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", upload(client, Path(photos["rocket"]).read_bytes(),
                                                                          k=1)))
        t.start()
        assert entered.wait(30)
        assert client.get("/api/health").status_code == 200
        assert client.get("/api/search/item/1", params={"k": 2}).status_code == 200
        assert client.get("/api/items/1/thumbnail", params={"size": 64}).status_code == 200
        assert "r" not in result  # the upload is still waiting for the model
        release.set()
        t.join(60)
        assert released == [True]  # the model was held until the other requests were answered
        assert result["r"].status_code == 200 and result["r"].json()["hits"][0]["path"].startswith("rocket/")
    finally:
        release.set()
        batcher.embed = real


# ---------------------------------------------------------------------------
# options, CLI, a real server
# ---------------------------------------------------------------------------

def test_create_app_rejects_bad_options(store):
    from deepfeat.errors import StoreError, UsageError

    with pytest.raises(UsageError, match="unknown server option"):
        create_app(store, max_batchez=3)
    with pytest.raises(UsageError, match="max batch"):
        create_app(store, max_batch=0)
    with pytest.raises(StoreError, match="not a feature store"):
        create_app(store.parent)


def test_cli_serve_warns_off_loopback(monkeypatch, store, capsys):
    import uvicorn

    from deepfeat import cli
    from deepfeat.cli.cmd_serve import is_loopback, server_url

    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.append(self.config))
    assert cli.main(["serve", str(store), "--port", "8123", "--max-upload-mb", "2", "--max-pixels", "1000"]) == 0
    cfg = seen[-1]
    assert (cfg.host, cfg.port, cfg.limit_concurrency) == ("127.0.0.1", 8123, None)  # the app limits: JSON 503
    assert cfg.app.state.service.cfg.limit_concurrency == 64
    assert cfg.app.state.service.cfg.max_upload_bytes == 2 << 20 and cfg.app.state.service.cfg.max_pixels == 1000
    assert "WARNING" not in capsys.readouterr().err
    monkeypatch.delenv("DEEPFEAT_API_KEY", raising=False)
    n = len(seen)
    assert cli.main(["serve", str(store), "--host", "0.0.0.0"]) == 2  # beyond loopback without a key: refused
    assert "--no-auth" in capsys.readouterr().err and len(seen) == n
    assert cli.main(["serve", str(store), "--host", "0.0.0.0", "--no-auth", "--workers-threads", "3"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: listening on 0.0.0.0" in err and "no authentication" in err
    assert seen[-1].app.state.service.cfg.worker_threads == 3
    assert cli.main(["serve", str(store), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10") and not is_loopback("example.org")
    assert server_url("0.0.0.0", 80) == "http://127.0.0.1:80/" and server_url("::1", 8) == "http://[::1]:8/"


@contextlib.contextmanager
def server_process(store, image_root, *options: str, env: dict | None = None):
    """`python -m deepfeat.serve STORE` (the `deepfeat serve` command) on a free port: its URL, once
    it says where it listens; the process is stopped afterwards."""
    proc = subprocess.Popen([sys.executable, "-m", "deepfeat.serve", str(store), "--port", "0", "--root",
                             str(image_root), "--log-level", "warning", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = None
        lines = []
        for line in proc.stdout:  # until it says where it listens (or ends without saying so)
            lines.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+/) ", line)
            if m:
                url = m.group(1)
                break
        assert url, "".join(lines)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_a_real_server_process(store, image_root, photos):
    """`python -m deepfeat.serve` (the `deepfeat serve` command) on a free port, queried over HTTP."""
    import httpx

    with server_process(store, image_root) as url, httpx.Client(base_url=url, timeout=30) as h:
        assert h.get("api/health").json()["status"] == "ok"
        r = h.post("api/search/upload", params={"k": 2},
                   files={"file": ("c.jpg", Path(photos["chelsea"]).read_bytes(), "image/jpeg")})
        assert r.status_code == 200 and all(x["path"].startswith("chelsea/") for x in r.json()["hits"])
        assert h.get("api/items/0/thumbnail").status_code == 200
        assert "server" not in h.get("api/health").headers  # no version banner
