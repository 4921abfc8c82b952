"""The duplicates gallery page in Chromium (like the search page): every thumbnail decodes
with the network off, and one keeper is marked per group. Skips without Chromium/playwright."""

from __future__ import annotations

import os

import pytest

from .test_duplicates import dup_store  # noqa: F401  (the same store of copies of real photos)

CHROMIUM = os.environ.get("DEEPFEAT_CHROMIUM", "/usr/bin/chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
]
pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")


def test_gallery_page_in_chromium(dup_store, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    from deepfeat.collection.duplicates import find_duplicates
    from deepfeat.collection.gallery import gallery_html

    store, _ = dup_store
    rep = find_duplicates(store)
    page_path = gallery_html(rep, tmp_path / "dups.html")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless=new", "--no-sandbox", "--disable-gpu"])
        try:
            ctx = browser.new_context(offline=True)
            page = ctx.new_page()
            page.goto(f"file://{page_path}")
            page.wait_for_function("() => [...document.images].every((i) => i.complete)")
            sizes = page.eval_on_selector_all("img", "imgs => imgs.map((i) => i.naturalWidth)")
            assert len(sizes) == sum(len(g.rows) for g in rep.groups) and all(w > 0 for w in sizes)
            assert page.locator("section.group").count() == len(rep.groups)
            assert page.locator("figure.keep").count() == len(rep.groups)
        finally:
            browser.close()
