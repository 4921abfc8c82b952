"""The search service: a feature store behind an HTTP API and a web page.

:func:`create_app` opens a store with :class:`~deepfeat.search.SearchEngine` (its
FAISS index, or exact search), loads the store's own model, layer, pooling and
post-processing once at start-up, and answers:

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
concurrent requests (:mod:`deepfeat.serve.batching`), searches in worker threads:
the event loop never computes. Every error is JSON ``{"error": message, "detail": ...}``,
overload included (503 with ``Retry-After``: too many requests in progress, or the model's
queue full); with an API key, ``/api/`` routes answer 401 without it (:mod:`.guards`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Body, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import DeepfeatError, ImageError, UsageError
from ..rerank import get_reranker, list_rerankers
from ..search import Hit, SearchEngine, parse_bbox
from .batching import MicroBatcher
from .guards import ApiKeyMiddleware, ConcurrencyLimitMiddleware, check_api_key
from .thumbs import THUMB_MAX, THUMB_MIN, ThumbnailCache, make_thumbnail
from .uploads import MEDIA_TYPES, MULTIPART_SLACK, ApiError, BodyLimitMiddleware, read_multipart_file, sniff_image

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")

MiB = 1 << 20
DEFAULT_MAX_UPLOAD_BYTES = 20 * MiB
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_TOP_K_MAX = 100
DEFAULT_K = 10
#: request bodies of routes other than the upload (JSON vectors) are at most this large
DEFAULT_MAX_JSON_BYTES = 1 * MiB

UPLOAD_PATH = "/api/search/upload"

CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                           "form-action 'none'")


@dataclass
class ServeConfig:
    """Limits and tuning of one server (the CLI flags map one to one)."""

    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    top_k_max: int = DEFAULT_TOP_K_MAX
    default_k: int = DEFAULT_K
    worker_threads: int = 2  # decode + thumbnails
    max_batch: int = 16  # 1 = no micro-batching
    batch_window_ms: float = 5.0  # longest wait for announced requests to join a batch
    max_queue: int = 64
    thumb_cache_bytes: int = 64 * MiB
    image_root: str | None = None  # base of relative item paths (default: the current directory)
    device: str = "cpu"
    search_threads: int = 1  # FAISS OpenMP threads per search: requests run in parallel, not one query's scan
    torch_threads: int | None = None  # PyTorch intra-op threads for the model (None: PyTorch's default, the cores)
    self_check: bool = True  # embed the first stored image at start-up and compare with its stored vector
    api_key: str | None = None  # when set, every /api/ route needs it (deepfeat.serve.guards)
    limit_concurrency: int = 64  # requests in progress at once; more get a JSON 503 with Retry-After
    body_timeout_s: float = 30.0  # longest stall between two chunks of a request body (then 408)
    rerank: str | None = None  # re-ranking of requests that do not choose one (deepfeat.rerank spec)
    qe: int = 0  # query expansion, alpha and DBA of every search (a recipe's search options)
    alpha: float = 0.0
    dba: int = 0

    def validate(self) -> None:
        checks = [
            (self.max_upload_bytes >= 1, f"max upload size must be positive, not {self.max_upload_bytes}"),
            (self.max_pixels >= 1, f"max pixels must be positive, not {self.max_pixels}"),
            (self.top_k_max >= 1, f"top-k maximum must be at least 1, not {self.top_k_max}"),
            (1 <= self.default_k, f"default k must be at least 1, not {self.default_k}"),
            (self.worker_threads >= 1, f"worker threads must be at least 1, not {self.worker_threads}"),
            (self.max_batch >= 1, f"max batch must be at least 1, not {self.max_batch}"),
            (self.batch_window_ms >= 0, f"batch window must be 0 ms or more, not {self.batch_window_ms}"),
            (self.max_queue >= 1, f"max queue must be at least 1, not {self.max_queue}"),
            (self.search_threads >= 1, f"search threads must be at least 1, not {self.search_threads}"),
            (self.torch_threads is None or self.torch_threads >= 1,
             f"torch threads must be at least 1, not {self.torch_threads}"),
            (self.limit_concurrency >= 1, f"concurrency limit must be at least 1, not {self.limit_concurrency}"),
            (self.body_timeout_s > 0, f"body timeout must be positive, not {self.body_timeout_s}"),
            (self.qe >= 0 and self.dba >= 0, f"qe and dba must be 0 or more, not {self.qe} and {self.dba}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        self.rerank = resolve_rerank(self.rerank)
        self.api_key = check_api_key(self.api_key)
        self.default_k = min(self.default_k, self.top_k_max)


class SearchService:
    """Everything a request needs: the engine, the inference batcher, the I/O pool, the thumbnail cache."""

    def __init__(self, store_path: str | os.PathLike, cfg: ServeConfig):
        self.cfg = cfg
        self.engine = SearchEngine(store_path, device=cfg.device, threads=cfg.search_threads)
        # relative item paths: --root, else the folder the extraction ran in, else here
        self.root = os.path.abspath(cfg.image_root or self.engine.store.meta.get("root") or os.getcwd())
        items = self.engine.store.ok_items()
        self.widths = items.column("width").to_pylist()
        self.heights = items.column("height").to_pylist()
        self.row_of_id = {int(i): r for r, i in enumerate(self.engine.ids)}
        self.row_of_path = {p: r for r, p in enumerate(self.engine.paths)}
        self.dim = int(self.engine.xb.shape[1])
        self.layer_index = self.engine.store.meta["layers"].index(self.engine.feature)
        self.thumbs = ThumbnailCache(cfg.thumb_cache_bytes)
        self.batcher = MicroBatcher(self.embed_batch, cfg.max_batch, cfg.batch_window_ms, cfg.max_queue)
        self.executor: ThreadPoolExecutor | None = None
        self.self_check: dict[str, Any] | None = None
        self.started = time.time()
        self._model_lock = threading.Lock()
        self._model_ready = False
        self._infer_lock = threading.Lock()  # one forward pass at a time: the model's taps are per pass
        from ..local_store import local_feature_names

        self.local_features = local_feature_names(self.engine.store)

    # -- lifecycle ----------------------------------------------------------------

    def load(self) -> None:
        """Load the model and descriptor network once (and check them against the store)."""
        with self._model_lock:
            if self._model_ready:
                return
            if self.cfg.torch_threads:
                import torch

                torch.set_num_threads(self.cfg.torch_threads)  # process-wide: the server owns its process
            _ = self.engine.feature_net  # loads the model, checks its weights hash against the store
            _ = self.engine.active_index  # builds the exact index now if there is no saved one
            if self.cfg.rerank or self.cfg.dba:  # DBA and the re-ranker's offline part (diffusion's graph) now
                self.search(self.engine.xb[0], 1, None, self.cfg.rerank)
            self._model_ready = True
        if self.cfg.self_check:
            self.self_check = self._self_check()

    def _self_check(self) -> dict[str, Any]:
        """Embed the first stored image the way queries are embedded; its vector must be the stored one."""
        row = 0
        try:
            px = self.engine.decode(self.file_of(row))
        except ImageError as e:
            return {"id": int(self.engine.ids[row]), "status": "skipped", "reason": str(e)}
        v = self.embed_batch([px])[0]
        cos = float(np.dot(v, self.engine.xb[row]) /
                    max(1e-12, float(np.linalg.norm(v) * np.linalg.norm(self.engine.xb[row]))))
        status = "ok" if cos > 0.999 else "mismatch"
        if status != "ok":
            log.warning("self-check: item %s embeds to a vector at cosine %.4f from its stored one; queries by "
                        "upload may not match the store (was it made with other settings?)", self.engine.ids[row], cos)
        return {"id": int(self.engine.ids[row]), "status": status, "cosine": round(cos, 6)}

    def start(self) -> None:
        self.load()
        self.executor = ThreadPoolExecutor(self.cfg.worker_threads, thread_name_prefix="deepfeat-io")
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    # -- work (runs in threads) -----------------------------------------------------

    def embed_batch(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Descriptors of same-shape decoded images, as one forward pass (then the store's post-processing)."""
        import torch

        x = torch.from_numpy(np.stack(pixels)).to(self.engine.model.device)
        with torch.inference_mode(), self._infer_lock:
            v = self.engine.feature_net(x)[self.layer_index]
        v = v.float().cpu().numpy().reshape(len(pixels), -1)
        return np.ascontiguousarray(self.engine.store.post.apply(v), dtype=np.float32)

    def decode_upload(self, data: bytes, bbox) -> tuple[dict[str, Any], np.ndarray]:
        info = sniff_image(data, self.cfg.max_pixels)
        try:
            px = self.engine.decode(io.BytesIO(data), bbox)
        except ImageError as e:
            raise ApiError(422, f"cannot decode the image: {e}", {"format": info.format}) from None
        return {"format": info.format, "width": info.width, "height": info.height}, px

    def search(self, xq: np.ndarray, k: int, exclude_row: int | None = None, rerank: str | None = None) -> list[Hit]:
        """Top *k* with the server's qe/alpha/dba and *rerank* (a spec; None: no re-ranking)."""
        xq = np.ascontiguousarray(xq.reshape(1, -1), dtype=np.float32)
        return self.engine.search(xq, k=k, qe=self.cfg.qe, alpha=self.cfg.alpha, dba=self.cfg.dba,
                                  exclude_rows=[exclude_row] if exclude_row is not None else None, rerank=rerank)[0]

    def verify(self, hits: list[Hit], n: int, row: int | None = None, data: bytes | None = None,
               bbox=None) -> list[Hit]:
        """*hits* with their top *n* re-ordered by spatial verification (:mod:`deepfeat.verify`):
        a stored query's cached local features, or an upload's, computed like the cached ones."""
        from ..verify import VerifyParams

        if not self.local_features:
            raise ApiError(422, "this store has no cached local features; run `deepfeat local-features STORE` "
                                "to enable verify")
        with self._infer_lock:
            qlf = self.engine.query_local_features(image=io.BytesIO(data) if data is not None else None, row=row,
                                                   bbox=bbox)
        return self.engine.verify(hits, qlf, VerifyParams(top=n))

    # -- lookups ------------------------------------------------------------------------

    def item_row(self, item_id: int) -> int:
        row = self.row_of_id.get(int(item_id))
        if row is None:
            raise ApiError(404, f"no item with id {item_id} in the store", {"id": item_id})
        return row

    def path_row(self, path: str) -> int:
        for cand in (path, os.path.normpath(path)):
            row = self.row_of_path.get(cand)
            if row is not None:
                return row
        raise ApiError(404, "no item with this path in the store (give a path exactly as stored, or use its id)",
                       {"path": path})

    def file_of(self, row: int) -> str:
        """The file of a stored item: its stored path, relative ones resolved against the image root."""
        p = self.engine.paths[row]
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def item(self, row: int) -> dict[str, Any]:
        i = int(self.engine.ids[row])
        return {"id": i, "path": self.engine.paths[row], "width": self.widths[row], "height": self.heights[row],
                "thumbnail": f"/api/items/{i}/thumbnail", "image": f"/api/items/{i}/image"}

    def hit(self, h: Hit) -> dict[str, Any]:
        d = {"rank": h.rank, "id": h.id, "path": h.path, "score": round(h.score, 6),
             "thumbnail": f"/api/items/{h.id}/thumbnail", "image": f"/api/items/{h.id}/image"}
        if h.inliers is not None:
            d["inliers"] = h.inliers
        return d

    async def in_pool(self, fn: Callable, *args):
        if self.executor is None:
            raise ApiError(503, "the server is not running (start-up not finished or shutting down)")
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def info(self) -> dict[str, Any]:
        meta = self.engine.store.meta
        summary = self.engine.store.summary()
        index = self.engine.index
        return {
            "count": len(self.engine.ids),
            "dim": self.dim,
            "feature": self.engine.feature,
            "model": meta.get("model", {}).get("spec"),
            "layers": meta.get("layers"),
            "pooling": meta.get("pooling"),
            "post": meta.get("post"),
            "size": meta.get("size"),
            "index": index.meta.get("kind") if index is not None else "exact (no saved index)",
            "local_features": {n: meta["local_features"][n].get("spec") for n in self.local_features},
            "search_options": {"rerank": self.cfg.rerank, "rerank_choices": ["none", *list_rerankers()],
                               "qe": self.cfg.qe, "alpha": self.cfg.alpha, "dba": self.cfg.dba,
                               "rerank_cost": self.engine.rerank_stats()},
            "store": {k: summary[k] for k in ("path", "items", "features", "failed", "shards")},
            "meta": meta,
            "limits": {"max_upload_bytes": self.cfg.max_upload_bytes, "max_pixels": self.cfg.max_pixels,
                       "top_k_max": self.cfg.top_k_max, "default_k": self.cfg.default_k,
                       "thumbnail_sizes": [THUMB_MIN, THUMB_MAX], "concurrency": self.cfg.limit_concurrency,
                       "queue": self.cfg.max_queue, "body_timeout_seconds": self.cfg.body_timeout_s},
            "auth": "api-key" if self.cfg.api_key else None,
            "version": __version__,
        }


# ---------------------------------------------------------------------------
# the ASGI app
# ---------------------------------------------------------------------------

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


def _error_response(status: int, message: str, detail: Any = None, headers: dict[str, str] | None = None):
    return JSONResponse({"error": message, "detail": detail}, status_code=status, headers=headers)


def create_app(store_path: str | os.PathLike, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               max_pixels: int = DEFAULT_MAX_PIXELS, top_k_max: int = DEFAULT_TOP_K_MAX, **options: Any):
    """A FastAPI app serving *store_path* (see the module docstring).

    *options* are the other :class:`ServeConfig` fields (``worker_threads``, ``max_batch``,
    ``batch_window_ms``, ``image_root``, ...). The store and its vectors are opened
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

    json_limit = max(DEFAULT_MAX_JSON_BYTES, svc.dim * 32)
    app.add_middleware(BodyLimitMiddleware, limit_for=lambda path: (
        (cfg.max_upload_bytes + MULTIPART_SLACK, cfg.max_upload_bytes, "upload") if path == UPLOAD_PATH
        else (json_limit, json_limit, "request body")))
    if cfg.api_key:
        app.add_middleware(ApiKeyMiddleware, key=cfg.api_key)
    app.add_middleware(ConcurrencyLimitMiddleware, limit=cfg.limit_concurrency, body_timeout=cfg.body_timeout_s)
    app.add_middleware(SecurityHeadersMiddleware)  # outermost: refusals (401, 413, 503) carry the headers too

    # -- errors: always JSON {"error", "detail"} ---------------------------------------

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

    # -- pages and meta ------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/health", summary="liveness and counters")
    async def health():
        return {"status": "ok" if svc.batcher.running else "starting", "items": len(svc.engine.ids),
                "uptime_seconds": round(time.time() - svc.started, 1), "self_check": svc.self_check,
                "inference": {**svc.batcher.stats.to_dict(), "max_batch": cfg.max_batch,
                              "window_ms": cfg.batch_window_ms, "queued": svc.batcher.queued,
                              "decoding": svc.batcher.incoming},
                "thumbnails": svc.thumbs.stats()}

    @app.get("/api/info", summary="the store: model, layer, pooling, post-processing, size, index; the limits")
    async def info():
        return svc.info()

    # -- items ------------------------------------------------------------------------------

    @app.get("/api/items/{item_id}", summary="one stored item")
    async def item(item_id: int):
        return svc.item(svc.item_row(item_id))

    @app.get("/api/items/{item_id}/thumbnail", summary="JPEG thumbnail of a stored image (longer side <= size)",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(item_id: int, size: int = Query(256, ge=THUMB_MIN, le=THUMB_MAX)):
        row = svc.item_row(item_id)
        key = (int(item_id), int(size))
        data = svc.thumbs.get(key)
        if data is None:
            try:
                data = await svc.in_pool(make_thumbnail, svc.file_of(row), size, None)
            except ImageError as e:
                raise ApiError(404, f"the image of item {item_id} cannot be read: {e}", {"id": item_id}) from None
            svc.thumbs.put(key, data)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=600"})

    @app.get("/api/items/{item_id}/image", summary="the stored image file of an item",
             response_class=Response, responses={200: {"content": {"image/*": {}}}})
    async def image(item_id: int):
        row = svc.item_row(item_id)
        path = svc.file_of(row)
        fmt = await svc.in_pool(_image_format, path)
        if fmt is None:
            raise ApiError(404, f"the image of item {item_id} is missing or not an image any more", {"id": item_id})
        return FileResponse(path, media_type=MEDIA_TYPES[fmt], filename=os.path.basename(path),
                            content_disposition_type="inline", headers={"Cache-Control": "private, max-age=600"})

    # -- search ------------------------------------------------------------------------------

    k_query = Query(cfg.default_k, ge=1, le=cfg.top_k_max, description="number of results")

    verify_query = Query(0, ge=0, le=cfg.top_k_max,
                         description="re-rank the top N by spatial verification of cached local features (0: off)")

    rerank_query = Query(None, max_length=200,
                         description="re-ranking: none | diffusion | kreciprocal, with parameters as in "
                                     "`deepfeat search --rerank` (default: the server's)")

    async def _search(xq: np.ndarray, k: int, exclude_row: int | None = None, verify: int = 0,
                      timings: dict[str, float] | None = None, rerank: str | None = None,
                      **query) -> tuple[list[dict], float]:
        t = time.perf_counter()
        rr = svc.cfg.rerank if rerank is None else resolve_rerank(rerank)
        hits = await asyncio.to_thread(svc.search, xq, max(k, verify), exclude_row, rr)
        ms = (time.perf_counter() - t) * 1000
        if verify:
            t = time.perf_counter()
            hits = await asyncio.to_thread(svc.verify, hits, verify, **query)
            if timings is not None:
                timings["verify"] = (time.perf_counter() - t) * 1000
        return [svc.hit(h) for h in hits[:k]], ms

    def _result(query: dict, k: int, hits: list[dict], timings: dict[str, float], rerank: str | None = None) -> dict:
        applied = svc.cfg.rerank if rerank is None else resolve_rerank(rerank)
        return {"query": query, "k": k, "hits": hits, "rerank": applied,
                "took_ms": {n: round(v, 2) for n, v in timings.items()}}

    @app.get("/api/search/item/{item_id}", summary="search by a stored image (its id)")
    async def search_item(item_id: int, k: int = k_query,
                          include_self: bool = Query(False, description="keep the query item in its results"),
                          verify: int = verify_query, rerank: str | None = rerank_query):
        t0 = time.perf_counter()
        row = svc.item_row(item_id)
        tm: dict[str, float] = {}
        hits, ms = await _search(svc.engine.xb[row], k, None if include_self else row, verify, tm, rerank, row=row)
        return _result({"kind": "item", **svc.item(row)}, k, hits,
                       {"search": ms, **tm, "total": (time.perf_counter() - t0) * 1000}, rerank)

    @app.get("/api/search/item", summary="search by a stored image (its path, exactly as stored)")
    async def search_path(path: str = Query(..., min_length=1, max_length=4096), k: int = k_query,
                          include_self: bool = Query(False, description="keep the query item in its results"),
                          verify: int = verify_query, rerank: str | None = rerank_query):
        t0 = time.perf_counter()
        row = svc.path_row(path)
        tm: dict[str, float] = {}
        hits, ms = await _search(svc.engine.xb[row], k, None if include_self else row, verify, tm, rerank, row=row)
        return _result({"kind": "item", **svc.item(row)}, k, hits,
                       {"search": ms, **tm, "total": (time.perf_counter() - t0) * 1000}, rerank)

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
        t0 = time.perf_counter()
        resolve_rerank(rerank)  # a bad spec is refused before the upload is read
        try:
            box = parse_bbox(bbox)
        except UsageError as e:
            raise ApiError(422, str(e).replace("--bbox", "bbox"), {"bbox": bbox}) from None
        up = await read_multipart_file(request.headers.get("content-type"), request.stream(), "file",
                                       cfg.max_upload_bytes)
        t1 = time.perf_counter()
        with svc.batcher.announce() as ticket:  # the inference thread may wait for this one to batch it
            image_info, px = await svc.in_pool(svc.decode_upload, up.data, box)
            t2 = time.perf_counter()
            vec = await ticket.submit(px)
        t3 = time.perf_counter()
        tm: dict[str, float] = {}
        hits, ms = await _search(vec, k, None, verify, tm, rerank, data=up.data, bbox=box)
        query = {"kind": "upload", "filename": up.filename, "bytes": len(up.data), **image_info,
                 "bbox": list(box) if box else None}
        return _result(query, k, hits, {"receive": (t1 - t0) * 1000, "decode": (t2 - t1) * 1000,
                                        "embed": (t3 - t2) * 1000, "search": ms, **tm,
                                        "total": (time.perf_counter() - t0) * 1000}, rerank)

    vector_body = Body(..., embed=True, description=f"{svc.dim} floats, in the store's space")
    k_body = Body(cfg.default_k, embed=True, ge=1, le=cfg.top_k_max, description="number of results")

    @app.post("/api/search/vector", summary="search by a vector in the store's space (after post-processing)")
    async def search_vector(vector: list[float] = vector_body, k: int = k_body,
                            rerank: str | None = Body(None, embed=True, max_length=200,
                                                      description="re-ranking (default: the server's)")):
        t0 = time.perf_counter()
        if len(vector) != svc.dim:
            raise ApiError(422, f"the vector has {len(vector)} dimensions, the store's have {svc.dim}",
                           {"dim": svc.dim, "got": len(vector)})
        xq = np.asarray(vector, dtype=np.float32)
        if not np.all(np.isfinite(xq)):
            raise ApiError(422, "the vector has non-finite values (NaN or infinity)")
        hits, ms = await _search(xq, k, rerank=rerank)
        return _result({"kind": "vector", "dim": svc.dim}, k, hits,
                       {"search": ms, "total": (time.perf_counter() - t0) * 1000}, rerank)

    return app


def resolve_rerank(spec: str | None) -> str | None:
    """A re-ranking spec checked (UsageError, a 422, on a bad one); ``none``/empty: no re-ranking."""
    if spec is None or not spec.strip() or spec.strip().lower() == "none":
        return None
    return get_reranker(spec).spec


def _image_format(path: str) -> str | None:
    """The format of a stored image file if it is one we serve, else None (missing, unreadable, not an image)."""
    from PIL import Image

    try:
        with Image.open(path, formats=list(MEDIA_TYPES)) as img:
            return img.format if img.format in MEDIA_TYPES else None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # missing, unreadable, not an image
        return None


__all__ = ["SearchService", "ServeConfig", "create_app"]
