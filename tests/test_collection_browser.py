"""The map page and the cluster and outlier gallery pages in a real browser (Debian's headless
Chromium, driven by Playwright, as tests/test_serve_browser.py): opened from file://, they must
show their embedded thumbnails, fetch nothing, and raise no script error. Skipped without
/usr/bin/chromium or the playwright package.

Pointed at another store, the map test writes the screenshot of docs/explore.md::

    DEEPFEAT_MAP_STORE=/tmp/flowers-store DEEPFEAT_MAP_SCREENSHOT=docs/img/map.png \\
    pytest tests/test_collection_browser.py -m browser -k given_store
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from .test_serve_browser import CHROMIUM, Browser

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]
pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
pytest.importorskip("sklearn")
pytest.importorskip("faiss")

from deepfeat.cli import main

from .test_collection_explore import store  # noqa: F401  (views of four photos + a foreign one)

THUMBS_DONE = "() => document.getElementById('map').dataset.thumbsLoaded !== undefined"


def test_map_page_shows_thumbnails_and_picks_a_point(store, tmp_path):  # noqa: F811
    page_file = tmp_path / "map.html"
    assert main(["map", str(store), "-o", str(page_file), "--method", "pca", "--colour-by", "folder,outlier"]) == 0
    with Browser("file:", viewport=(1100, 760)) as b:
        page = b.page
        page.goto(page_file.as_uri())
        page.wait_for_function(THUMBS_DONE)
        assert page.eval_on_selector("#map", "c => [c.dataset.thumbsLoaded, c.dataset.thumbsFailed]") == ["21", "0"]
        # 21 points: thumbnails are drawn (the canvas holds photo pixels, not only the flat dots)
        colours = page.evaluate("""() => {
          const c = document.getElementById('map'), x = c.getContext('2d');
          const d = x.getImageData(0, 0, c.width, c.height).data, seen = new Set();
          for (let i = 0; i < d.length; i += 4 * 7) seen.add((d[i] >> 3) + ',' + (d[i + 1] >> 3) + ',' + (d[i + 2] >> 3));
          return seen.size;
        }""")
        assert colours > 500, colours
        assert page.eval_on_selector_all("#colour-by option", "os => os.map((o) => o.textContent)") == ["folder", "outlier"]
        assert page.eval_on_selector_all("#legend div", "ds => ds.length") == 5
        page.select_option("#colour-by", "outlier")
        assert page.eval_on_selector_all("#legend .ramp", "rs => rs.length") == 1
        # click a point: its details and thumbnail appear
        x, y = page.evaluate("() => window.deepfeatMap.toScreen(3)")
        box = page.eval_on_selector("#map", "c => { const r = c.getBoundingClientRect(); return [r.left, r.top]; }")
        page.mouse.click(box[0] + x, box[1] + y)
        page.wait_for_selector("#picked:not([hidden])")
        path = page.evaluate("() => window.deepfeatMap.data.paths[Number(document.getElementById('map').dataset.picked)]")
        assert path in page.text_content("#picked")
        assert page.eval_on_selector("#picked img", "i => i.complete && i.naturalWidth > 0")
        # zoom in and out with the buttons, no errors, nothing fetched
        page.click("#zoom-in")
        page.click("#zoom-reset")
        assert b.errors == [] and b.foreign == []


@pytest.mark.parametrize("command", [["clusters", "--k", "5"], ["outliers", "--k", "3", "--top", "6"]])
def test_gallery_pages_show_thumbnails(store, tmp_path, command):  # noqa: F811
    page_file = tmp_path / "gallery.html"
    assert main([command[0], str(store), *command[1:], "--html", str(page_file)]) == 0
    want = 21 if command[0] == "clusters" else 6
    with Browser("file:", viewport=(1100, 760)) as b:
        b.page.goto(page_file.as_uri())
        b.page.wait_for_function("n => { const is = [...document.images]; return is.length === n && "
                                 "is.every((i) => i.complete); }", arg=want)
        loaded = b.page.eval_on_selector_all("img", "is => is.map((i) => i.naturalWidth > 0)")
        assert loaded == [True] * want
        if command[0] == "clusters":
            assert b.page.eval_on_selector_all("section", "ss => ss.length") == 5
        else:
            assert b.page.eval_on_selector("figcaption", "f => f.textContent").endswith("hubble.jpg")
        assert b.errors == [] and b.foreign == []


@pytest.mark.skipif(not os.environ.get("DEEPFEAT_MAP_STORE"), reason="set DEEPFEAT_MAP_STORE to a store")
def test_map_on_a_given_store(tmp_path):
    """The map of a real store (e.g. Flowers 17), zoomed in three steps; writes a screenshot if asked."""
    from PIL import Image

    page_file = tmp_path / "map.html"
    assert main(["map", os.environ["DEEPFEAT_MAP_STORE"], "-o", str(page_file), "--method", "tsne"]) == 0
    with Browser("file:", viewport=(1100, 760)) as b:
        b.page.goto(page_file.as_uri())
        b.page.wait_for_function(THUMBS_DONE, timeout=300_000)
        assert b.page.eval_on_selector("#map", "c => c.dataset.thumbsFailed") == "0"
        for _ in range(3):
            b.page.click("#zoom-in")
        assert b.errors == [] and b.foreign == []
        out = os.environ.get("DEEPFEAT_MAP_SCREENSHOT")
        if out:
            img = Image.open(io.BytesIO(b.page.screenshot())).convert("RGB")
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            img.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
