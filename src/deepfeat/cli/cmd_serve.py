"""``deepfeat serve``: a feature store behind an HTTP API and a web page."""

from __future__ import annotations

import ipaddress
import os
import sys

from deepfeat.cli.cmd_search import RECIPE_FLAGS, search_options
from deepfeat.cli.recipe_args import add_recipe_arg
from deepfeat.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a store: HTTP search API and web page",
        description="Search the store by uploaded image, stored id/path or vector, over HTTP (FastAPI + uvicorn), "
                    "with a web page at /. Queries are embedded with the store's own model, layer, pooling and "
                    "post-processing, loaded once; when another process changes the store (sync, remove, extract, index) "
                    "the server reloads it, keeping the model. Listens on 127.0.0.1 unless --host says otherwise. With --api-key (or "
                    "the DEEPFEAT_API_KEY environment variable) every /api/ route needs the key; listening beyond "
                    "this machine without a key is refused unless --no-auth. Needs the [serve] extra.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, metavar="MB",
                   help="largest accepted upload in MiB (default 20; larger: 413)")
    p.add_argument("--max-pixels", type=int, default=50_000_000, metavar="N",
                   help="largest accepted upload in pixels, width x height (default 50000000; larger: 413)")
    p.add_argument("--top-k-max", type=int, default=100, metavar="K", help="largest k a request may ask (default 100)")
    p.add_argument("--worker-threads", "--workers-threads", dest="worker_threads", type=int, default=2, metavar="N",
                   help="threads that decode uploads and make thumbnails (default 2); inference has its own thread")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="largest micro-batch of concurrent uploads per forward pass (default 16; 1 = no batching)")
    p.add_argument("--batch-window-ms", type=float, default=5.0, metavar="MS",
                   help="longest wait of the inference thread for uploads being decoded, to batch them (default 5)")
    p.add_argument("--search-threads", type=int, default=1, metavar="N",
                   help="FAISS threads per search (default 1: concurrent requests use the cores)")
    p.add_argument("--torch-threads", type=int, metavar="N",
                   help="PyTorch threads inside one forward pass (default: PyTorch's, the number of cores)")
    p.add_argument("--root", metavar="DIR", help="base folder of the store's relative image paths (default: here)")
    p.add_argument("--limit-concurrency", type=int, default=64, metavar="N",
                   help="most requests in progress at once; more get a JSON 503 with Retry-After (default 64)")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="most decoded uploads waiting for the model; more get a JSON 503 (default 64)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="a request body that stalls this long between two chunks gets 408 (default 30)")
    p.add_argument("--work-timeout", type=float, default=60.0, metavar="S",
                   help="a decode, thumbnail or forward pass running longer gets its request a 503, and /api/health "
                        "reports the stuck worker (default 60)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require KEY on every /api/ route (header X-API-Key or Authorization: Bearer; the web "
                        "page asks for it); default: the DEEPFEAT_API_KEY environment variable, else no key")
    p.add_argument("--no-auth", action="store_true",
                   help="allow a --host beyond this machine without an API key (anyone who can reach the port "
                        "can search the store and download its images)")
    p.add_argument("--reload-check", type=float, default=2.0, metavar="S",
                   help="seconds between two checks whether the store changed on disk (a few stat calls before a "
                        "request; default 2, 0 = before every request); a change is loaded without a restart")
    p.add_argument("--no-reload", action="store_true",
                   help="serve the store as it was at start-up, whatever changes on disk")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda")
    p.add_argument("--rerank", metavar="SPEC", help="re-ranking of requests that do not choose one (diffusion, "
                                                    "kreciprocal[:ARGS]; the page's selector starts on it)")
    p.add_argument("--qe", type=int, default=0, metavar="N", help="query expansion of every search")
    p.add_argument("--alpha", type=float, default=0.0, metavar="A", help="alpha-QE/DBA weight power")
    p.add_argument("--dba", type=int, default=0, metavar="N", help="database-side augmentation")
    p.add_argument("--classifier", metavar="CLF", help="label uploads with your classifier (a folder made by "
                                                       "`deepfeat fit-classifier`): POST /api/classify/upload, and a "
                                                       "line under the page's query")
    p.add_argument("--map-method", default="auto", choices=["auto", "pca", "tsne", "umap"],
                   help="the layout of the Map view (/map; made on its first visit): auto = UMAP where installed, "
                        "else t-SNE (default); pca is the fastest")
    add_recipe_arg(p, RECIPE_FLAGS)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def server_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def run(args) -> int:
    search_options(args, "serve")  # --recipe, --rerank checked before the server starts
    try:
        import uvicorn

        from deepfeat.serve import create_app
        from deepfeat.serve.guards import API_KEY_ENV, JsonH11Protocol
    except ImportError as e:
        raise UsageError(f"deepfeat serve needs the [serve] extra ({e.name} is missing): "
                         "pip install 'deepfeat[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0..65535, not {args.port}")
    if args.max_upload_mb <= 0:
        raise UsageError(f"--max-upload-mb must be positive, not {args.max_upload_mb}")
    if args.limit_concurrency < 1:
        raise UsageError(f"--limit-concurrency must be at least 1, not {args.limit_concurrency}")
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    if api_key and args.no_auth:
        raise UsageError("--no-auth and an API key (--api-key or $DEEPFEAT_API_KEY) contradict each other")
    if not is_loopback(args.host) and not api_key and not args.no_auth:
        raise UsageError(f"--host {args.host} listens beyond this machine: give an API key (--api-key KEY or "
                         f"${API_KEY_ENV}), or --no-auth to serve the store to anyone who can reach the port")

    app = create_app(args.store, max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels,
                     top_k_max=args.top_k_max, worker_threads=args.worker_threads, max_batch=args.max_batch,
                     batch_window_ms=args.batch_window_ms, image_root=args.root, device=args.device,
                     search_threads=args.search_threads, torch_threads=args.torch_threads, api_key=api_key,
                     limit_concurrency=args.limit_concurrency, max_queue=args.max_queue,
                     body_timeout_s=args.body_timeout, work_timeout_s=args.work_timeout, rerank=args.rerank, qe=args.qe, alpha=args.alpha,
                     dba=args.dba, classifier=args.classifier, map_method=args.map_method,
                     reload_check_s=None if args.no_reload else args.reload_check)
    svc = app.state.service
    if not is_loopback(args.host):
        bar = "!" * 78
        who = ("Anyone who has the API key" if api_key else "Anyone who can reach this port")
        auth = ("The key and the images travel unencrypted (no TLS)" if api_key
                else "There is no authentication (--no-auth) and no TLS")
        print(f"{bar}\n"
              f"WARNING: listening on {args.host}, not on this machine only.\n"
              f"{who} can search the store and download every image in it\n"
              f"({len(svc.engine.ids)} images from {svc.engine.store.path}). {auth}:\n"
              f"put it behind a reverse proxy that adds TLS before exposing it.\n"
              f"{bar}", file=sys.stderr, flush=True)

    # the app limits requests itself (JSON 503); uvicorn's limit_concurrency would answer plain text
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, http=JsonH11Protocol,
                            limit_concurrency=None, server_header=False, proxy_headers=False)
    server = uvicorn.Server(config)
    _announce_when_started(server, args.host, svc)
    server.run()
    return 0


def _announce_when_started(server, host: str, svc) -> None:
    """Print the URL (with the real port, when --port 0) once uvicorn is listening."""
    original = server.startup

    async def startup(sockets=None):
        await original(sockets=sockets)
        if not server.started:
            return
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else server.config.port
        meta = svc.engine.store.meta
        print(f"deepfeat serve: {len(svc.engine.ids)} images, {meta['model']['spec']} {svc.engine.feature} "
              f"{meta.get('pooling')} {meta.get('post')}, {svc.dim}-d", flush=True)
        print(f"deepfeat serve: {server_url(host, port)}  (API: {server_url(host, port)}api/openapi.json)",
              flush=True)

    server.startup = startup
