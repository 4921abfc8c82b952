"""The search page in a real browser: Debian's headless Chromium, driven by Playwright.

A real uvicorn server on a free 127.0.0.1 port serves a store of real photos; the
browser loads the page, uploads a photo through the file input, and must see result
images that actually loaded, then search again by clicking a result. Skipped when
/usr/bin/chromium (Debian ``chromium``) or the ``playwright`` package is absent;
no browser is ever downloaded.

Pointed at another store, the same flow makes the README's screenshot::

    DEEPFEAT_SERVE_STORE=/tmp/flowers17-store DEEPFEAT_SERVE_QUERY=query.jpg \\
    DEEPFEAT_SERVE_SCREENSHOT=docs/img/serve.png pytest tests/test_serve_browser.py -m browser
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("DEEPFEAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]
pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
pytest.importorskip("fastapi")

from .test_serve import image_root, store  # noqa: F401  (the same store of real photos)

# n result images, each either loaded or marked broken by the page (its file is gone)
ALL_DONE = """(n) => {
  const imgs = [...document.querySelectorAll('#results img')];
  return imgs.length === n && imgs.every((i) => i.complete && (i.naturalWidth > 0 || i.closest('.broken')));
}"""
RESULTS = """cs => [...cs].map((c) => ({id: c.dataset.id, path: c.title.split('\\n')[0],
  loaded: c.querySelector('img').naturalWidth > 0, broken: c.classList.contains('broken')}))"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving an app in a background thread on 127.0.0.1."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.url = f"http://127.0.0.1:{self.port}/"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


class Browser:
    """A Chromium page that records console errors (message, url) and every request whose URL does not
    start with *allowed* (the server's URL; pages opened from a file: ``("file:", "data:")``)."""

    def __init__(self, *allowed: str, viewport=(1280, 860)):
        self.allowed = (*allowed, "data:", "blob:")
        self.viewport = viewport
        self.errors: list[tuple[str, str]] = []  # (message, url)
        self.foreign: list[str] = []

    def __enter__(self):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.page = self.browser.new_page(viewport={"width": self.viewport[0], "height": self.viewport[1]})
        self.page.set_default_timeout(60_000)
        self.page.on("console", lambda m: self.errors.append((m.text, m.location.get("url", "")))
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append((str(e), "")))
        self.page.on("request", lambda r: None if r.url.startswith(self.allowed) else self.foreign.append(r.url))
        return self

    def __exit__(self, *exc):
        self.browser.close()
        self._pw.stop()


def search_by_upload(page, query: str, n: int) -> list[dict]:
    page.set_input_files("#file-input", query)
    page.wait_for_function(ALL_DONE, arg=n)
    return page.eval_on_selector_all("#results .card", RESULTS)


def test_page_uploads_a_photo_and_shows_result_images(store, image_root, photos, tmp_path):  # noqa: F811
    from deepfeat.serve import create_app

    app = create_app(store, image_root=str(image_root), max_upload_bytes=1 << 20)
    with LiveServer(app) as srv, Browser(srv.url) as b:
        page = b.page
        page.goto(srv.url)
        # the store's description is on the page
        page.wait_for_function("document.querySelector('[data-field=count]').textContent === '16'")
        for field, want in (("model", "efficientnet_lite0"), ("feature", "bn2"), ("pooling", "gem:p=3"),
                            ("dim", "1280")):
            assert page.text_content(f"[data-field={field}]") == want

        # upload a real photo: 16 result images, loaded; the closest are views of the same photo
        page.fill("#k-input", "16")
        cards = search_by_upload(page, photos["coffee"], 16)
        assert all(c["path"].startswith("coffee/") for c in cards[:3]), cards
        # every image loaded, except the one item whose file was deleted after extraction: marked, not hidden
        assert [c["path"] for c in cards if not c["loaded"]] == ["zz_gone/gone.jpg"]
        assert [c["path"] for c in cards if c["broken"]] == ["zz_gone/gone.jpg"]
        scores = [float(s) for s in page.eval_on_selector_all("#results .score", "ss => ss.map((s) => s.textContent)")]
        assert scores == sorted(scores, reverse=True) and scores[0] > 0.8
        assert page.eval_on_selector("#query-image", "i => i.complete && i.naturalWidth > 0")
        assert "JPEG" in page.text_content("#query-caption")

        # click a result: search by that stored image (and it is excluded from its own results)
        second = cards[1]["id"]
        page.click("#results .card >> nth=1")
        page.wait_for_url(f"**#item={second}")
        page.wait_for_function(f"() => document.querySelector('#query-caption').textContent.startsWith("
                               f"{cards[1]['path']!r})")
        page.wait_for_function(ALL_DONE, arg=15)
        cards2 = page.eval_on_selector_all("#results .card", RESULTS)
        assert second not in [c["id"] for c in cards2]
        assert all(c["loaded"] for c in cards2 if c["path"] != "zz_gone/gone.jpg")
        assert page.eval_on_selector("#query-image", "i => i.complete && i.naturalWidth > 0")
        # no script errors; the only failed resource is the deleted file's thumbnail
        gone_id = next(c["id"] for c in cards if c["broken"])
        assert [e for e in b.errors if f"/api/items/{gone_id}/thumbnail" not in e[1]] == [], b.errors
        assert b.foreign == []

        # a file that is not an image: the server's message is shown, the results stay
        bad = tmp_path / "notes.jpg"
        bad.write_text("not a photo")
        page.set_input_files("#file-input", str(bad))
        page.wait_for_selector("#error:not([hidden])")
        assert "not an image" in page.text_content("#error")
        assert page.eval_on_selector_all("#results img", "is => is.length") == 15
        assert b.foreign == []  # nothing, ever, from anywhere but the server


@pytest.mark.skipif(not os.environ.get("DEEPFEAT_SERVE_STORE"), reason="set DEEPFEAT_SERVE_STORE to a store")
def test_page_on_a_given_store(photos):
    """The same flow on a real store (e.g. flowers17); writes a screenshot if asked."""
    from PIL import Image

    from deepfeat.serve import create_app

    store_dir = os.environ["DEEPFEAT_SERVE_STORE"]
    query = os.environ.get("DEEPFEAT_SERVE_QUERY", photos["coffee"])
    k = int(os.environ.get("DEEPFEAT_SERVE_K", "15"))
    app = create_app(store_dir, image_root=os.environ.get("DEEPFEAT_SERVE_ROOT") or None)
    with LiveServer(app) as srv, Browser(srv.url, viewport=(1180, 720)) as b:
        b.page.goto(srv.url)
        b.page.wait_for_function("document.querySelector('[data-field=count]').textContent !== '…'")
        b.page.fill("#k-input", str(k))
        cards = search_by_upload(b.page, query, k)
        assert all(c["loaded"] for c in cards) and b.errors == [] and b.foreign == []
        out = os.environ.get("DEEPFEAT_SERVE_SCREENSHOT")
        if out:
            png = b.page.screenshot(full_page=False)
            # a 256-colour palette keeps the README's image small
            img = Image.open(io.BytesIO(png)).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            img.save(out, optimize=True)
