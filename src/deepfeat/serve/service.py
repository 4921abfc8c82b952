"""The state of one server: its limits (:class:`ServeConfig`) and everything a request
needs (:class:`SearchService`: the store's current view, reloaded when the store changes,
the inference batcher, the I/O pool, the thumbnail cache). The routes that use it are in
:mod:`deepfeat.serve.routes`."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepfeat import __version__
from deepfeat.errors import ImageError, UsageError
from deepfeat.rerank import get_reranker, list_rerankers
from deepfeat.search import Hit
from deepfeat.serve.guards import check_api_key
from deepfeat.serve.microbatch import MicroBatcher
from deepfeat.serve.reload import StoreWatcher
from deepfeat.serve.thumbs import THUMB_MAX, THUMB_MIN, ThumbnailCache
from deepfeat.serve.uploads import ApiError, sniff_image
from deepfeat.serve.view import StoreView
from deepfeat.serve.workbound import WorkTracker

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_MAX_UPLOAD_BYTES = 20 * MiB
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_TOP_K_MAX = 100
DEFAULT_K = 10
#: request bodies of routes other than the upload (JSON vectors) are at most this large
DEFAULT_MAX_JSON_BYTES = 1 * MiB


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
    work_timeout_s: float = 60.0  # longest one piece of pool work (decode, thumbnail, inference) may take (then 503)
    rerank: str | None = None  # re-ranking of requests that do not choose one (deepfeat.rerank spec)
    qe: int = 0  # query expansion, alpha and DBA of every search (a recipe's search options)
    alpha: float = 0.0
    dba: int = 0
    reload_check_s: float | None = 2.0  # seconds between checks whether the store changed (0: every request; None: never)

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
            (self.work_timeout_s > 0, f"work timeout must be positive, not {self.work_timeout_s}"),
            (self.qe >= 0 and self.dba >= 0, f"qe and dba must be 0 or more, not {self.qe} and {self.dba}"),
            (self.reload_check_s is None or self.reload_check_s >= 0,
             f"reload check interval must be 0 seconds or more, not {self.reload_check_s}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UsageError(msg)
        self.rerank = resolve_rerank(self.rerank)
        self.api_key = check_api_key(self.api_key)
        self.default_k = min(self.default_k, self.top_k_max)


class SearchService:
    """Everything a request needs: the store's current view (:class:`~deepfeat.serve.view.StoreView`,
    reloaded when the store changes: :mod:`deepfeat.serve.reload`), the inference batcher, the I/O pool,
    the thumbnail cache. A request takes :attr:`view` once and passes it on."""

    def __init__(self, store_path: str | os.PathLike, cfg: ServeConfig):
        self.cfg = cfg
        self.store_path = store_path
        self.watcher = StoreWatcher(store_path, self._open_view, self._prepare_view, cfg.reload_check_s)
        self.thumbs = ThumbnailCache(cfg.thumb_cache_bytes)
        self.work = WorkTracker(cfg.work_timeout_s)
        self.batcher = MicroBatcher(self.embed_batch, cfg.max_batch, cfg.batch_window_ms, cfg.max_queue,
                                    work=self.work)
        self.executor: ThreadPoolExecutor | None = None
        self.self_check: dict[str, Any] | None = None
        self.started = time.time()
        self._model_lock = threading.Lock()
        self._model_ready = False
        self._infer_lock = threading.Lock()  # one forward pass at a time: the model's taps are per pass

    @property
    def view(self) -> StoreView:
        """The store as it is now for a request starting now (take it once per request)."""
        return self.watcher.view

    @property
    def engine(self):
        """The current view's search engine."""
        return self.watcher.view.engine

    @property
    def dim(self) -> int:
        return self.watcher.view.dim

    # -- lifecycle ----------------------------------------------------------------

    def _open_view(self, generation: int) -> StoreView:
        return StoreView(self.store_path, generation, self.cfg.image_root, self.cfg.device, self.cfg.search_threads)

    def _prepare_view(self, view: StoreView, before: StoreView) -> None:
        """Ready a reloaded view before it answers: the loaded model, its index, DBA and the re-ranker's graph."""
        view.adopt_model(before)
        self._warm(view)

    def _warm(self, view: StoreView) -> None:
        _ = view.engine.active_index  # builds the exact index now if there is no saved one
        if self.cfg.rerank or self.cfg.dba:  # DBA and the re-ranker's offline part (diffusion's graph) now
            self.search(view, view.engine.xb[0], 1, None, self.cfg.rerank, row=0)

    def load(self) -> None:
        """Load the model and descriptor network once (and check them against the store)."""
        with self._model_lock:
            if self._model_ready:
                return
            if self.cfg.torch_threads:
                import torch

                torch.set_num_threads(self.cfg.torch_threads)  # process-wide: the server owns its process
            view = self.view
            _ = view.engine.feature_net  # loads the model, checks its weights hash against the store
            self._warm(view)
            self._model_ready = True
        if self.cfg.self_check:
            self.self_check = self._self_check()

    def _self_check(self) -> dict[str, Any]:
        """Embed the first stored image the way queries are embedded; its vector must be the stored one."""
        row, view = 0, self.view
        xb, item_id = view.engine.xb, int(view.engine.ids[0])
        try:
            px = view.engine.decode(view.file_of(row))
        except ImageError as e:
            return {"id": item_id, "status": "skipped", "reason": str(e)}
        v = view.post(self.embed_batch([px]))[0]
        cos = float(np.dot(v, xb[row]) / max(1e-12, float(np.linalg.norm(v) * np.linalg.norm(xb[row]))))
        status = "ok" if cos > 0.999 else "mismatch"
        if status != "ok":
            log.warning("self-check: item %s embeds to a vector at cosine %.4f from its stored one; queries by "
                        "upload may not match the store (was it made with other settings?)", item_id, cos)
        return {"id": item_id, "status": status, "cosine": round(cos, 6)}

    def start(self) -> None:
        self.load()
        self.executor = ThreadPoolExecutor(self.cfg.worker_threads, thread_name_prefix="deepfeat-io")
        self.batcher.start()

    def stop(self) -> None:
        from deepfeat.pipeline import faults

        faults.release_hangs()  # test-only hangs (serve-hang) end with the server
        self.batcher.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    # -- work (runs in threads) -----------------------------------------------------

    def embed_batch(self, pixels: list[np.ndarray]) -> np.ndarray:
        """Network descriptors (before post-processing: :meth:`StoreView.post`) of same-shape decoded
        images, as one forward pass. The model is the same in every view."""
        import torch

        view = self.view
        x = torch.from_numpy(np.stack(pixels)).to(view.engine.model.device)
        with torch.inference_mode(), self._infer_lock:
            v = view.engine.feature_net(x)[view.layer_index]
        return v.float().cpu().numpy().reshape(len(pixels), -1)

    def decode_upload(self, data: bytes, bbox) -> tuple[dict[str, Any], np.ndarray]:
        info = sniff_image(data, self.cfg.max_pixels)
        try:
            px = self.engine.embedder.decode(io.BytesIO(data), bbox, max_pixels=self.cfg.max_pixels)
        except ImageError as e:
            raise ApiError(422, f"cannot decode the image: {e}", {"format": info.format}) from None
        return {"format": info.format, "width": info.width, "height": info.height}, px

    def search(self, view: StoreView, xq: np.ndarray, k: int, exclude_row: int | None = None,
               rerank: str | None = None, row: int | None = None, data: bytes | None = None, bbox=None) -> list[Hit]:
        """Top *k* of *view* with the server's qe/alpha/dba and *rerank* (a spec; None: no re-ranking). A
        regional re-ranking takes the query's regions from the stored item *row* or the uploaded *data*."""
        xq = np.ascontiguousarray(xq.reshape(1, -1), dtype=np.float32)
        regions, engine = None, view.engine
        rr = engine.reranker(rerank, self.cfg.dba, self.cfg.alpha) if rerank else None
        if getattr(rr, "needs_regions", False) and (row is not None or data is not None):
            with self._infer_lock:
                regions = [engine.query_regions(image=io.BytesIO(data) if data is not None else None, row=row,
                                                bbox=bbox, name=rr.section)]
        return engine.search(xq, k=k, qe=self.cfg.qe, alpha=self.cfg.alpha, dba=self.cfg.dba,
                                  exclude_rows=[exclude_row] if exclude_row is not None else None, rerank=rerank,
                                  query_regions=regions)[0]

    def verify(self, view: StoreView, hits: list[Hit], n: int, row: int | None = None, data: bytes | None = None,
               bbox=None) -> list[Hit]:
        """*hits* with their top *n* re-ordered by spatial verification (:mod:`deepfeat.localfeat.verify`):
        a stored query's cached local features, or an upload's, computed like the cached ones."""
        from deepfeat.localfeat.verify import VerifyParams

        if not view.local_features:
            raise ApiError(422, "this store has no cached local features; run `deepfeat local-features STORE` "
                                "to enable verify")
        with self._infer_lock:
            qlf = view.engine.query_local_features(image=io.BytesIO(data) if data is not None else None, row=row,
                                                   bbox=bbox)
        return view.engine.verify(hits, qlf, VerifyParams(top=n))

    def rerank_choices(self, view: StoreView) -> list[str]:
        """The page's re-ranking selector: regional diffusion only where the store has regions."""
        return ["none", *[r for r in list_rerankers() if r != "regional-diffusion" or view.regions]]

    async def in_pool(self, fn: Callable, *args, upload: str | None = None):
        """``fn(*args)`` in the I/O pool, at most ``work_timeout_s`` (then a 503; the thread is
        reported by /api/health until it ends); a 503 at once when every worker thread is stuck.
        *upload*: the name of the uploaded file it works on (for the test-only ``serve-hang`` fault)."""
        from deepfeat.pipeline import faults

        if self.executor is None:
            raise ApiError(503, "the server is not running (start-up not finished or shutting down)")
        bound, what = self.cfg.work_timeout_s, getattr(fn, "__name__", "work").strip("_").replace("_", " ")
        stuck = self.work.stuck("io")
        if len(stuck) >= self.cfg.worker_threads:
            raise ApiError(503, f"all {self.cfg.worker_threads} worker threads are stuck on work that ran over "
                                f"{bound:g} s (see /api/health); restart the server if they do not recover",
                           {"stuck": stuck}, headers={"Retry-After": "10"})

        asked = time.monotonic()  # the bound counts from here, so work whose request got the 503 is stuck

        def job():
            with self.work.running(what, "io", since=asked):
                faults.serve_fault(upload or "")
                return fn(*args)

        try:
            return await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self.executor, job), bound)
        except asyncio.TimeoutError:
            log.error("%s ran over the work timeout of %g s; its thread is still busy", what, bound)
            raise ApiError(503, f"{what} took longer than the server's work timeout of {bound:g} s",
                           {"work_timeout_seconds": bound}, headers={"Retry-After": "10"}) from None

    def health(self) -> tuple[int, dict[str, Any]]:
        """The status code and body of /api/health: 503 with the stuck work named when any ran over the bound."""
        stuck = self.work.stuck()
        status = "stuck" if stuck else "ok" if self.batcher.running else "starting"
        return (503 if stuck else 200), {"status": status, "stuck": stuck, "work_timeout_seconds":
                                         self.cfg.work_timeout_s, "store": self.watcher.describe()}

    def info(self) -> dict[str, Any]:
        view = self.view
        engine = view.engine
        meta = engine.store.meta
        summary = engine.store.summary()
        index = engine.index
        return {
            "count": view.count,
            "dim": view.dim,
            "feature": engine.feature,
            "model": meta.get("model", {}).get("spec"),
            "layers": meta.get("layers"),
            "pooling": meta.get("pooling"),
            "post": meta.get("post"),
            "size": meta.get("size"),
            "index": index.meta.get("kind") if index is not None else "exact (no saved index)",
            "local_features": {n: meta["local_features"][n].get("spec") for n in view.local_features},
            "search_options": {"rerank": self.cfg.rerank, "rerank_choices": self.rerank_choices(view),
                               "qe": self.cfg.qe, "alpha": self.cfg.alpha, "dba": self.cfg.dba,
                               "rerank_cost": engine.rerank_stats()},
            "store": {k: summary[k] for k in ("path", "items", "features", "failed", "shards")},
            "reload": self.watcher.describe(),
            "meta": meta,
            "limits": {"max_upload_bytes": self.cfg.max_upload_bytes, "max_pixels": self.cfg.max_pixels,
                       "top_k_max": self.cfg.top_k_max, "default_k": self.cfg.default_k,
                       "thumbnail_sizes": [THUMB_MIN, THUMB_MAX], "concurrency": self.cfg.limit_concurrency,
                       "queue": self.cfg.max_queue, "body_timeout_seconds": self.cfg.body_timeout_s},
            "auth": "api-key" if self.cfg.api_key else None,
            "version": __version__,
        }


def resolve_rerank(spec: str | None) -> str | None:
    """A re-ranking spec checked (UsageError, a 422, on a bad one); ``none``/empty: no re-ranking."""
    if spec is None or not spec.strip() or spec.strip().lower() == "none":
        return None
    return get_reranker(spec).spec
