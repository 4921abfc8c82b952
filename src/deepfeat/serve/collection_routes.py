"""The collection views of the search service (:mod:`deepfeat.collection`): your own classifier on
uploads (``deepfeat serve --classifier CLF``) and the Map view of the store.

=======  ==================================  ==================================================
GET      /api/classifier                     ``{"classifier": ...}``: classes, method, threshold (or null)
POST     /api/classify/upload?top=           label an upload (multipart field ``file``), as
                                             ``deepfeat classify --classifier --json``
GET      /map                                the Map view: the store's 2-D layout; a click searches
GET      /map/map.js, /map/map.css           its script and style (the page has no inline ones)
=======  ==================================  ==================================================

An upload is described once: when the classifier was fitted on descriptors made as the store's are
(same recipe and the same fitted post-processing files) it labels the vector the server's batched
model makes for searching anyway; otherwise it uses its own model (:class:`~deepfeat.collection.Classifier`'s
embedder, loaded on first use). The map is laid out on the first visit of ``/map`` (then kept): the
store's vectors by ``map_method`` (:func:`deepfeat.collection.layout.layout`), coloured by folder,
outlier score and, where the classifier shares the store's descriptors, by its labels; thumbnails
are this server's ``/api/items/{id}/thumbnail`` URLs."""

from __future__ import annotations

import asyncio
import html
import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response

from deepfeat.errors import ImageError, UsageError
from deepfeat.serve.service import SearchService
from deepfeat.serve.uploads import ApiError, read_multipart_file, sniff_image
from deepfeat.serve.view import StoreView

log = logging.getLogger(__name__)

CLASSIFY_UPLOAD_PATH = "/api/classify/upload"
#: the Map view's thumbnails (pixels, longer side) and how many at most (a seeded choice beyond)
MAP_THUMB = 96
MAP_THUMBS = 2000
#: labels per upload by default, and at most
DEFAULT_TOP, MAX_TOP = 5, 100


def same_descriptors(store_dir: str | os.PathLike, store_meta: dict[str, Any], feature: str,
                     clf_folder: str | os.PathLike, clf_recipe: dict[str, Any]) -> bool:
    """Whether a classifier's descriptors are made exactly as the store's *feature* ones: the same
    recipe, and the same fitted post-processing/pooling files (both absent, or byte-equal)."""
    from deepfeat.backends.embedder import RECIPE_FILES, descriptor_recipe

    if descriptor_recipe(store_meta, feature) != clf_recipe:
        return False
    for name in RECIPE_FILES:
        a, b = Path(store_dir) / name, Path(clf_folder) / name
        if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
            return False
    return True


class CollectionViews:
    """The state of the collection routes: the classifier (or None) and the map, made once."""

    def __init__(self, svc: SearchService, classifier: str | os.PathLike | None = None, map_method: str = "auto"):
        from deepfeat.collection.layout import METHODS

        if map_method not in METHODS:
            raise UsageError(f"unknown map method {map_method!r}; choose from {', '.join(METHODS)}")
        self.svc = svc
        self.map_method = map_method
        self.clf = None
        self._shared: tuple[int, bool] = (0, False)  # (view generation, shared)
        if classifier is not None:
            from deepfeat.collection import Classifier

            self.clf = Classifier.load(classifier)
            if int(self.clf.meta["dim"]) != svc.dim:
                log.info("classifier %s: %d-d descriptors, the store's are %d-d: it embeds uploads itself",
                         classifier, self.clf.meta["dim"], svc.dim)
        self._own_lock = threading.Lock()  # the classifier's own model: one forward pass at a time
        self._map_lock = threading.Lock()
        self._map_page: tuple[int, str] | None = None  # (view generation, page)

    def shared_with(self, view: StoreView) -> bool:
        """Whether the classifier's descriptors are made exactly as *view*'s (judged once per view: a
        reloaded store may have another post-processing)."""
        if self.clf is None:
            return False
        if self._shared[0] != view.generation:
            store = view.engine.store
            self._shared = (view.generation, same_descriptors(store.path, store.meta, view.engine.feature,
                                                              self.clf.folder, self.clf.meta["descriptor"]))
        return self._shared[1]

    @property
    def shared(self) -> bool:
        return self.shared_with(self.svc.view)

    def info(self) -> dict[str, Any] | None:
        clf = self.clf
        if clf is None:
            return None
        return {"classes": clf.classes, "method": clf.method, "params": clf.meta["params"],
                "threshold": clf.threshold, "threshold_rule": clf.meta.get("threshold_rule"),
                "cv_accuracy": clf.meta.get("cv", {}).get("accuracy"), "folder": str(clf.folder),
                "model": clf.meta["descriptor"]["model"]["spec"],
                "descriptors": "the store's (shared with search)" if self.shared else "its own model's"}

    def _need_classifier(self):
        if self.clf is None:
            raise ApiError(404, "this server has no classifier; start it with `deepfeat serve STORE --classifier CLF`")
        return self.clf

    def embed_own(self, data: bytes) -> np.ndarray:
        """The upload described by the classifier's own recipe (its model, layer, pooling, post)."""
        emb = self.clf.embedder
        try:
            with self._own_lock:
                return emb.embed_pixels([emb.decode(io.BytesIO(data))])
        except ImageError as e:
            raise ApiError(422, f"cannot decode the image: {e}") from None

    # -- the map ---------------------------------------------------------------------

    def map_page(self) -> str:
        """The Map view's HTML, laid out on first use (then kept until the store is reloaded)."""
        view = self.svc.view
        with self._map_lock:
            if self._map_page is None or self._map_page[0] != view.generation:
                t = time.perf_counter()
                self._map_page = (view.generation, self._make_map_page(view))
                log.info("map of %d items laid out in %.1fs", view.count, time.perf_counter() - t)
            return self._map_page[1]

    def _make_map_page(self, view: StoreView) -> str:
        from deepfeat.collection.maps import build_map, json_for_script, map_data

        eng = view.engine
        shared = self.shared_with(view)
        colour_by = ["folder", "outlier"] + (["label"] if shared else [])
        n = len(eng.ids)
        m = build_map(eng.xb, eng.paths, method=self.map_method, colour_by=colour_by,
                      classifier=self.clf.folder if shared else None,
                      outlier_k=max(1, min(10, n - 1)), title=os.path.basename(str(eng.store.path).rstrip("/")))
        rows = np.arange(n)
        if n > MAP_THUMBS:
            rows = np.sort(np.random.default_rng(0).choice(n, MAP_THUMBS, replace=False))
        thumbs: list[str | None] = [None] * n
        for r in rows:
            thumbs[int(r)] = f"/api/items/{int(eng.ids[int(r)])}/thumbnail?size={MAP_THUMB}"
        data = map_data(m, thumbs)
        data["ids"] = [int(i) for i in eng.ids]
        sub = (f"{n} images; {m.layout.how}; {len(rows)} thumbnails. Wheel: zoom; drag: pan; "
               f"click a point: search from it.")
        title = html.escape(m.title)
        return "".join([
            f"<!doctype html><html lang=en><head><meta charset=utf-8><title>map · {title}</title>",
            "<meta name=viewport content='width=device-width, initial-scale=1'><link rel=icon href='data:,'>",
            "<link rel=stylesheet href=/map/map.css>",
            "<script src=/static/mapview.js defer></script><script src=/map/map.js defer></script></head><body>",
            f"<header class=top><h1>deepfeat <span>map</span> {title}</h1><p>{html.escape(sub)} ",
            "<a href=/>search page</a></p></header>",
            "<div id=mapwrap><canvas id=map></canvas>",
            "<div class=mapbar><label>colour by <select id=colour-by></select></label>",
            "<button id=zoom-in title='zoom in'>+</button><button id=zoom-out title='zoom out'>&minus;</button>",
            "<button id=zoom-reset title='whole map'>reset</button></div>",
            "<div id=legend></div><div id=tip hidden></div><div id=picked hidden></div>",
            "<aside id=map-results hidden><h2 id=map-query></h2><p id=map-status></p><ol id=map-hits></ol></aside>",
            "</div>",
            f"<script type=application/json id=map-data>{json_for_script(data)}</script></body></html>\n"])


def add_collection_routes(app: FastAPI, svc: SearchService, classifier: str | os.PathLike | None = None,
                          map_method: str = "auto") -> CollectionViews:
    """The classifier and Map routes (the table in the module docstring)."""
    views = CollectionViews(svc, classifier, map_method)
    app.state.collection = views
    _add_classifier_routes(app, svc, views)
    _add_map_routes(app, views)
    return views


def _add_classifier_routes(app: FastAPI, svc: SearchService, views: CollectionViews) -> None:
    cfg = svc.cfg
    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary", "description": "the image to label"}}}}}}}

    @app.get("/api/classifier", summary="your classifier (deepfeat serve --classifier): classes, threshold")
    async def classifier_info():
        return {"classifier": views.info()}

    @app.post(CLASSIFY_UPLOAD_PATH, summary="label an upload with your classifier (multipart field 'file')",
              openapi_extra=upload_body,
              responses={404: {"description": "no classifier"}, 413: {"description": "upload too large"},
                         415: {"description": "not an image"}, 422: {"description": "undecodable"}})
    async def classify_upload(request: Request, top: int = Query(DEFAULT_TOP, ge=1, le=MAX_TOP,
                                                                 description="labels per image")):
        t0, view = time.perf_counter(), svc.view
        clf = views._need_classifier()
        shared = views.shared_with(view)
        up = await read_multipart_file(request.headers.get("content-type"), request.stream(), "file",
                                       cfg.max_upload_bytes)
        t1 = time.perf_counter()
        if shared:
            with svc.batcher.announce() as ticket:
                image_info, px = await svc.in_pool(svc.decode_upload, up.data, None)
                vec = view.post(await ticket.submit(px))
        else:
            info = await svc.in_pool(sniff_image, up.data, cfg.max_pixels)
            image_info = {"format": info.format, "width": info.width, "height": info.height}
            vec = await asyncio.to_thread(views.embed_own, up.data)
        t2 = time.perf_counter()
        result = clf.results([up.filename or "upload"], vec, [None], top)[0]
        return {"results": [result.to_dict()],
                "query": {"kind": "upload", "filename": up.filename, "bytes": len(up.data), **image_info},
                "classifier": {"method": clf.method, "classes": len(clf.classes), "threshold": clf.threshold,
                               "descriptors": "store" if shared else "own"},
                "took_ms": {"receive": round((t1 - t0) * 1000, 2), "embed": round((t2 - t1) * 1000, 2),
                            "total": round((time.perf_counter() - t0) * 1000, 2)}}


def _add_map_routes(app: FastAPI, views: CollectionViews) -> None:
    from deepfeat.collection.mapscript import MAP_CSS, MAP_JS
    from deepfeat.collection.pages import STYLE

    css = STYLE + MAP_CSS + MAPVIEW_CSS

    @app.get("/map", include_in_schema=False)
    async def map_page():
        page = await asyncio.to_thread(views.map_page)
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/map/map.js", include_in_schema=False)
    async def map_js():
        return Response(MAP_JS, media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    @app.get("/map/map.css", include_in_schema=False)
    async def map_css():
        return Response(css, media_type="text/css", headers={"Cache-Control": "no-cache"})


MAPVIEW_CSS = """
#map-results { position: absolute; top: 0.6rem; right: 0.6rem; bottom: 0.6rem; width: 290px; overflow: auto;
  background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius); padding: 0.5rem;
  font-size: 0.78rem; }
#map-results h2 { font-size: 0.85rem; overflow-wrap: anywhere; } #map-results ol { list-style: none; padding: 0;
  margin: 0; display: grid; grid-template-columns: 1fr 1fr; gap: 0.4rem; }
#map-results li button { border: 1px solid var(--line); background: var(--bg); border-radius: 6px; padding: 0.2rem;
  width: 100%; cursor: pointer; font: inherit; text-align: left; overflow-wrap: anywhere; }
#map-results img { width: 100%; height: 90px; object-fit: cover; display: block; border-radius: 4px; }
.top a { margin-left: 0.6rem; }
"""
