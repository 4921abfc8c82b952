"""The routes of the search service, one function per group (the endpoint table is in
:mod:`deepfeat.serve.app`): errors as JSON, the page and the server's meta, the stored
items, and the searches (by a stored item, an upload, a vector)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Body, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from deepfeat.errors import DeepfeatError, ImageError, UsageError
from deepfeat.search import parse_bbox
from deepfeat.serve.service import SearchService, resolve_rerank
from deepfeat.serve.thumbs import THUMB_MAX, THUMB_MIN, make_thumbnail
from deepfeat.serve.uploads import MEDIA_TYPES, ApiError, read_multipart_file
from deepfeat.serve.view import StoreView

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")

UPLOAD_PATH = "/api/search/upload"


def _error_response(status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None):
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"error", "detail"}``."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc, ApiError):
            return _error_response(exc.status, exc.message, exc.detail, exc.headers)
        msg = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return _error_response(exc.status_code, msg, None if isinstance(exc.detail, str) else exc.detail,
                               getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors(), custom_encoder={bytes: lambda b: b[:100].decode("latin-1")})
        where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors)
        return _error_response(422, f"invalid request: {where}", errors)

    @app.exception_handler(DeepfeatError)
    async def _deepfeat_error(request: Request, exc: DeepfeatError):
        status = 422 if isinstance(exc, (UsageError, ImageError)) else 500
        return _error_response(status, str(exc))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(500, "internal server error", {"type": type(exc).__name__})


def add_page_routes(app: FastAPI, svc: SearchService) -> None:
    """The web page, its static files, ``/api/health`` and ``/api/info``."""
    cfg = svc.cfg

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/health", summary="liveness and counters")
    async def health():
        code, state = svc.health()
        body = {**state, "items": svc.view.count,
                "uptime_seconds": round(time.time() - svc.started, 1), "self_check": svc.self_check,
                "inference": {**svc.batcher.stats.to_dict(), "max_batch": cfg.max_batch,
                              "window_ms": cfg.batch_window_ms, "queued": svc.batcher.queued,
                              "decoding": svc.batcher.incoming},
                "thumbnails": svc.thumbs.stats()}
        return body if code == 200 else JSONResponse(body, status_code=code)

    @app.get("/api/info", summary="the store: model, layer, pooling, post-processing, size, index; the limits")
    async def info():
        return svc.info()


def add_item_routes(app: FastAPI, svc: SearchService) -> None:
    """A stored item, its thumbnail and its image file."""

    @app.get("/api/items/{item_id}", summary="one stored item")
    async def item(item_id: int):
        view = svc.view
        return view.item(view.item_row(item_id))

    @app.get("/api/items/{item_id}/thumbnail", summary="JPEG thumbnail of a stored image (longer side <= size)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(item_id: int, size: int = Query(256, ge=THUMB_MIN, le=THUMB_MAX)):
        view = svc.view
        row = view.item_row(item_id)
        key = (int(item_id), int(size))
        data = svc.thumbs.get(key)
        if data is None:
            try:
                data = await svc.in_pool(make_thumbnail, view.file_of(row), size, None)
            except ImageError as e:
                raise ApiError(404, f"the image of item {item_id} cannot be read: {e}", {"id": item_id}) from None
            svc.thumbs.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=600"})

    @app.get("/api/items/{item_id}/image", summary="the stored image file of an item",
             response_class=Response, responses={200: {"content": {"image/*": {}}}})
    async def image(item_id: int):
        view = svc.view
        path = view.file_of(view.item_row(item_id))
        fmt = await svc.in_pool(_image_format, path)
        if fmt is None:
            raise ApiError(404, f"the image of item {item_id} is missing or not an image any more", {"id": item_id})
        return JsonRangeFileResponse(path, media_type=MEDIA_TYPES[fmt], filename=os.path.basename(path),
                            content_disposition_type="inline", headers={"Cache-Control": "private, max-age=600"})


async def _search(svc: SearchService, view: StoreView, xq: np.ndarray, k: int, exclude_row: int | None = None,
                  verify: int = 0, timings: dict[str, float] | None = None, rerank: str | None = None,
                  **query) -> tuple[list[dict], float]:
    """The top *k* of *view* (re-ranked, and verified if *verify*) as JSON hits, and the search time in ms."""
    t = time.perf_counter()
    rr = svc.cfg.rerank if rerank is None else resolve_rerank(rerank)
    hits = await asyncio.to_thread(svc.search, view, xq, max(k, verify), exclude_row, rr, **query)
    ms = (time.perf_counter() - t) * 1000
    if verify:
        t = time.perf_counter()
        hits = await asyncio.to_thread(svc.verify, view, hits, verify, **query)
        if timings is not None:
            timings["verify"] = (time.perf_counter() - t) * 1000
    return [view.hit(h) for h in hits[:k]], ms


def _result(svc: SearchService, query: dict, k: int, hits: list[dict], timings: dict[str, float],
            rerank: str | None = None) -> dict:
    applied = svc.cfg.rerank if rerank is None else resolve_rerank(rerank)
    return {"query": query, "k": k, "hits": hits, "rerank": applied,
            "took_ms": {n: round(v, 2) for n, v in timings.items()}}


def add_search_routes(app: FastAPI, svc: SearchService) -> None:
    """Search by a stored item (id or path), by an upload and by a vector."""
    cfg = svc.cfg
    k_query = Query(cfg.default_k, ge=1, le=cfg.top_k_max, description="number of results")

    verify_query = Query(0, ge=0, le=cfg.top_k_max,
                         description="re-rank the top N by spatial verification of cached local features (0: off)")

    rerank_query = Query(None, max_length=200,
                         description="re-ranking: none | diffusion | kreciprocal, with parameters as in "
                                     "`deepfeat search --rerank` (default: the server's)")

    _add_stored_search_routes(app, svc, k_query, verify_query, rerank_query)
    _add_upload_route(app, svc, k_query, verify_query, rerank_query)
    _add_vector_route(app, svc)


async def _search_row(svc: SearchService, view: StoreView, row: int, t0: float, k: int, include_self: bool,
                      verify: int, rerank: str | None) -> dict:
    """The answer of a search by the stored item at *row* of *view* (timed from *t0*)."""
    tm: dict[str, float] = {}
    hits, ms = await _search(svc, view, view.engine.xb[row], k, None if include_self else row, verify, tm, rerank,
                             row=row)
    return _result(svc, {"kind": "item", **view.item(row)}, k, hits,
                   {"search": ms, **tm, "total": (time.perf_counter() - t0) * 1000}, rerank)


def _add_stored_search_routes(app: FastAPI, svc: SearchService, k_query: Any, verify_query: Any,
                              rerank_query: Any) -> None:
    """Search by a stored image, named by its id or by its stored path."""

    @app.get("/api/search/item/{item_id}", summary="search by a stored image (its id)")
    async def search_item(item_id: int, k: int = k_query,
                          include_self: bool = Query(False, description="keep the query item in its results"),
                          verify: int = verify_query, rerank: str | None = rerank_query):
        t0, view = time.perf_counter(), svc.view
        return await _search_row(svc, view, view.item_row(item_id), t0, k, include_self, verify, rerank)

    @app.get("/api/search/item", summary="search by a stored image (its path, exactly as stored)")
    async def search_path(path: str = Query(..., min_length=1, max_length=4096), k: int = k_query,
                          include_self: bool = Query(False, description="keep the query item in its results"),
                          verify: int = verify_query, rerank: str | None = rerank_query):
        t0, view = time.perf_counter(), svc.view
        return await _search_row(svc, view, view.path_row(path), t0, k, include_self, verify, rerank)


def _add_upload_route(app: FastAPI, svc: SearchService, k_query: Any, verify_query: Any, rerank_query: Any) -> None:
    """Search by an uploaded image (read in memory, bounded; decoded in the pool, embedded in a micro-batch)."""
    cfg = svc.cfg
    upload_body = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "string", "format": "binary",
                                "description": f"the query image ({', '.join(sorted(set(MEDIA_TYPES)))})"}}}}}}}

    @app.post(UPLOAD_PATH, summary="search by an uploaded image (multipart field 'file')", openapi_extra=upload_body,
              responses={413: {"description": "upload too large (bytes or pixels)"},
                         415: {"description": "not an image / not multipart"},
                         422: {"description": "empty, undecodable, or bad parameters"}})
    async def search_upload(request: Request, k: int = k_query,
                            bbox: str | None = Query(None, description="query region x1,y1,x2,y2 in pixels"),
                            verify: int = verify_query, rerank: str | None = rerank_query):
        t0, view = time.perf_counter(), svc.view
        resolve_rerank(rerank)  # a bad spec is refused before the upload is read
        try:
            box = parse_bbox(bbox)
        except UsageError as e:
            raise ApiError(422, str(e).replace("--bbox", "bbox"), {"bbox": bbox}) from None
        up = await read_multipart_file(request.headers.get("content-type"), request.stream(), "file",
                                       cfg.max_upload_bytes)
        t1 = time.perf_counter()
        with svc.batcher.announce() as ticket:  # the inference thread may wait for this one to batch it
            image_info, px = await svc.in_pool(svc.decode_upload, up.data, box, upload=up.filename)
            t2 = time.perf_counter()
            vec = view.post(await ticket.submit(px))
        t3 = time.perf_counter()
        tm: dict[str, float] = {}
        hits, ms = await _search(svc, view, vec, k, None, verify, tm, rerank, data=up.data, bbox=box)
        query = {"kind": "upload", "filename": up.filename, "bytes": len(up.data), **image_info,
                 "bbox": list(box) if box else None}
        return _result(svc, query, k, hits, {"receive": (t1 - t0) * 1000, "decode": (t2 - t1) * 1000,
                                             "embed": (t3 - t2) * 1000, "search": ms, **tm,
                                             "total": (time.perf_counter() - t0) * 1000}, rerank)


def _add_vector_route(app: FastAPI, svc: SearchService) -> None:
    """Search by a vector in the store's space."""
    cfg = svc.cfg
    vector_body = Body(..., embed=True, description="the store's dimension of floats (GET /api/info: dim), "
                                                    "in the store's space")
    k_body = Body(cfg.default_k, embed=True, ge=1, le=cfg.top_k_max, description="number of results")

    @app.post("/api/search/vector", summary="search by a vector in the store's space (after post-processing)")
    async def search_vector(vector: list[float] = vector_body, k: int = k_body,
                            rerank: str | None = Body(None, embed=True, max_length=200,
                                                      description="re-ranking (default: the server's)")):
        t0, view = time.perf_counter(), svc.view
        if len(vector) != view.dim:
            raise ApiError(422, f"the vector has {len(vector)} dimensions, the store's have {view.dim}",
                           {"dim": view.dim, "got": len(vector)})
        xq = np.asarray(vector, dtype=np.float32)
        if not np.all(np.isfinite(xq)):
            raise ApiError(422, "the vector has non-finite values (NaN or infinity)")
        hits, ms = await _search(svc, view, xq, k, rerank=rerank)
        return _result(svc, {"kind": "vector", "dim": view.dim}, k, hits,
                       {"search": ms, "total": (time.perf_counter() - t0) * 1000}, rerank)


class JsonRangeFileResponse(FileResponse):
    """A FileResponse whose Range errors (400 malformed, 416 outside the file) are JSON like every other
    error of the API (Starlette answers them in plain text)."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

        try:
            return super()._parse_range_header(http_range, file_size)
        except RangeNotSatisfiable:
            raise ApiError(416, f"the range {http_range[:100]!r} starts outside the file ({file_size} bytes)",
                           {"size": file_size}, {"Content-Range": f"bytes */{file_size}"}) from None
        except MalformedRangeHeader as e:
            raise ApiError(400, f"malformed Range header {http_range[:100]!r}: {e.content}") from None


def _image_format(path: str) -> str | None:
    """The format of a stored image file if it is one we serve, else None (missing, unreadable, not an image)."""
    from PIL import Image

    from deepfeat.data.images import file_problem

    if file_problem(path):  # the check every file route makes first: a FIFO would block a worker forever
        return None
    try:
        with Image.open(path, formats=list(MEDIA_TYPES)) as img:
            return img.format if img.format in MEDIA_TYPES else None
    except (OSError, SyntaxError, ValueError, KeyError, Image.DecompressionBombError):  # unreadable, not an image
        return None
