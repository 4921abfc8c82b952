"""The search service: a feature store behind an HTTP API and a web page.

:func:`create_app` opens a store with :class:`~deepfeat.search.SearchEngine` (its
FAISS index, or exact search), loads the store's own model, layer, pooling and
post-processing once at start-up, follows the store when another process changes it
(:mod:`deepfeat.serve.reload`: sync, removal, extraction, a new index; no restart), and answers:

=======  ==================================  ==================================================
GET      /                                   the web page (static files, no CDN)
GET      /api/health                         liveness, inference and cache counters
GET      /api/info                           the store's meta, size, index, the server's limits
GET      /api/items/{id}                     one stored item (id, path, width, height)
GET      /api/items/{id}/thumbnail?size=     JPEG thumbnail of a stored image (LRU-cached)
GET      /api/items/{id}/image               the stored image file itself
GET      /api/search/item/{id}?k=            search by a stored image
GET      /api/search/item?path=&k=           search by a stored image, named by its stored path
POST     /api/search/upload?k=&bbox=         search by an uploaded image (multipart field ``file``)
POST     /api/search/vector                  search by a vector ``{"vector": [...], "k": 10}``
GET      /api/openapi.json                   the OpenAPI schema
=======  ==================================  ==================================================

Files are only ever read from the store's own items, looked up by id: no request
names a file. Uploads stay in memory, bounded in bytes and pixels. Decoding and
thumbnails run in a small thread pool, inference in one thread that batches
concurrent requests (:mod:`deepfeat.serve.microbatch`), searches in worker threads:
the event loop never computes. Every error is JSON ``{"error": message, "detail": ...}``,
overload included (503 with ``Retry-After``: too many requests in progress, or the model's
queue full); with an API key, ``/api/`` routes answer 401 without it (:mod:`.guards`).

The parts: :mod:`deepfeat.serve.service` (:class:`ServeConfig`, :class:`SearchService`),
:mod:`deepfeat.serve.routes` (the routes, one function per group); this module puts
them together with the middleware.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from deepfeat import __version__
from deepfeat.errors import UsageError
from deepfeat.serve.collection_routes import CLASSIFY_UPLOAD_PATH, add_collection_routes
from deepfeat.serve.duplicates_routes import add_duplicate_routes
from deepfeat.serve.guards import ApiKeyMiddleware, ConcurrencyLimitMiddleware
from deepfeat.serve.reload import ReloadMiddleware
from deepfeat.serve.routes import (
    UPLOAD_PATH,
    add_error_handlers,
    add_item_routes,
    add_page_routes,
    add_search_routes,
)
from deepfeat.serve.service import (
    DEFAULT_MAX_JSON_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_TOP_K_MAX,
    SearchService,
    ServeConfig,
)
from deepfeat.serve.uploads import MULTIPART_SLACK, BodyLimitMiddleware

CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                           "form-action 'none'")


class SecurityHeadersMiddleware:
    """Adds a strict Content-Security-Policy (no third-party anything) and friends to every response."""

    HEADERS = ((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
               (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
               (b"x-frame-options", b"DENY"))

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                names = {h[0].lower() for h in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in self.HEADERS if h[0] not in names]
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def create_app(store_path: str | os.PathLike, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, top_k_max: int = DEFAULT_TOP_K_MAX,
               classifier: str | os.PathLike | None = None, map_method: str = "auto", **options: Any):
    """A FastAPI app serving *store_path* (see the module docstring).

    *options* are the other :class:`ServeConfig` fields (``worker_threads``, ``max_batch``,
    ``batch_window_ms``, ``image_root``, ...); *classifier* (a ``deepfeat fit-classifier`` folder) and
    *map_method* configure the collection views (:mod:`.collection_routes`). The store and its vectors are opened
    here (a bad store fails now); the model is loaded when the app starts (lifespan)."""
    unknown = set(options) - set(ServeConfig.__dataclass_fields__)
    if unknown:
        raise UsageError(f"unknown server option(s): {', '.join(sorted(unknown))}; "
                         f"valid: {', '.join(ServeConfig.__dataclass_fields__)}")
    cfg = ServeConfig(max_upload_bytes=int(max_upload_bytes), max_pixels=int(max_pixels), top_k_max=int(top_k_max),
                      **options)
    cfg.validate()
    svc = SearchService(store_path, cfg)

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(svc.start)
        try:
            yield
        finally:
            svc.stop()

    app = FastAPI(title="deepfeat search", version=__version__, lifespan=lifespan,
                  description="Content-based image search over a deepfeat feature store.",
                  openapi_url="/api/openapi.json", docs_url=None, redoc_url=None)  # Swagger/ReDoc pages load from a CDN
    app.state.service = svc

    def json_limit() -> int:  # a vector of the store's dimension fits (a reload may change it)
        return max(DEFAULT_MAX_JSON_BYTES, svc.dim * 32)

    app.add_middleware(ReloadMiddleware, watcher=svc.watcher)  # innermost: after the guards admitted the request
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda path: (
        (cfg.max_upload_bytes + MULTIPART_SLACK, cfg.max_upload_bytes, "upload") if path in (UPLOAD_PATH,
                                                                                           CLASSIFY_UPLOAD_PATH)
        else (json_limit(), json_limit(), "request body")))
    if cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, key=cfg.api_key)
    app.add_middleware(ConcurrencyLimitMiddleware, limit=cfg.limit_concurrency, body_timeout=cfg.body_timeout_s)
    app.add_middleware(SecurityHeadersMiddleware)  # outermost: refusals (401, 413, 503) carry the headers too

    add_error_handlers(app)
    add_page_routes(app, svc)
    add_item_routes(app, svc)
    add_search_routes(app, svc)
    add_duplicate_routes(app, svc)
    add_collection_routes(app, svc, classifier, map_method)
    return app


__all__ = ["SearchService", "ServeConfig", "create_app"]
