"""Extraction pipeline: reader -> decoder -> batcher -> runner -> writer.

The work is planned before it is done: every input gets a stable id and a shard
(``plan.parquet``), and a shard's batches are formed deterministically from the
shard's items (consecutive for fixed-size policies; grouped by exact output shape,
from image headers, for aspect-preserving ones). Decoding runs in worker processes
(or threads) ahead of inference; inference runs in the main process on the chosen
backend; a shard is written and committed as soon as its last batch is done.

Because the plan and the batches do not depend on timing, an interrupted run
(Ctrl-C, ``kill -9``, power loss) continued later produces exactly the same store,
byte for byte, as an uninterrupted one: committed shards are skipped, the shard in
progress is redone.

How one shard is computed (batches -> decode -> FeatureNet -> items + arrays -> commit)
lives in :class:`ShardProcessor`, shared by the two engines: the local one below
(``engine="local"``: decode processes feeding inference in this process, several
shards in flight) and the Ray one in :mod:`deepfeat.distributed` (``engine="ray"``:
one shard per actor call, on many machines). Both write the same store.
"""

from __future__ import annotations

import io
import logging
import math
import os
import sys
import time
from collections import OrderedDict, deque
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import faults
from .errors import DeepfeatError, StoreError, UsageError
from .images import DEFAULT_MAX_PIXELS, check_resize, decode_image, discover, file_problem, open_image, printable_path
from .preprocess import DataConfig, SizePolicy, parse_size_policy, target_size
from .store import FeatureStore, ShardItems, check_store_dir
from .storelock import StoreLock
from .workerpool import PerItem, SupervisedPool

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")
DTYPES = ("float32", "float16")
ENGINES = ("local", "ray")


@dataclass
class ExtractConfig:
    """Everything that defines an extraction (CLI flags map one to one)."""

    inputs: list[str] = field(default_factory=list)
    output: str = ""
    model: str = "efficientnet_lite0"
    layers: list[str] = field(default_factory=lambda: ["default"])
    pooling: str = "default"  # default: the model's own (a fine-tuned run's recorded descriptor), else gem
    post: str = "l2"
    size: str = "model"
    scales: tuple[float, ...] = (1.0,)
    scale_combine: str = "sum"
    backend: str = "auto"  # auto: ONNX Runtime on the CPU, torch on CUDA
    device: str = "auto"
    batch_size: int | None = None  # None: 8 on CPU (measured best for CNNs on few cores), 64 on CUDA
    #: pixels per batch at most, for aspect-preserving policies; None: set by ``extract``
    #: (CPU_BATCH_PIXELS with eager torch on the CPU when --batch-size is not given, else no limit)
    batch_pixels: int | None = None
    workers: int | None = None  # None: onnx_runtime.default_threads() for the core count
    threads: int | None = None  # inference intra-op threads; None: onnx_runtime.default_threads()
    channels_last: bool = True  # torch on CUDA: channels-last memory format (no effect on the CPU)
    compile: bool = False  # torch: torch.compile the feature network (--compile)
    #: aspect-preserving policies, torch: pad images to shapes rounded up to this multiple and batch
    #: them together, pooling with a mask (deepfeat.batching); None: batch by exact shape only
    pad_to: int | None = None
    decode_in: str = "processes"  # or "threads"
    #: seconds one image may take to decode in a worker process before the worker is killed
    #: and replaced and the image reported (None or 0: no limit; threads cannot be stopped)
    decode_timeout: float | None = 120.0
    resume: bool = False
    limit: int | None = None
    dtype: str = "float32"
    shard_size: int = 1024
    draft: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    fit_on: str | None = None
    fit_max: int = 100_000
    pool_fit: str | None = None  # a fitted codebook file for poolings that need one (mop)
    pool_fit_samples: int = 500  # else: fit on this many of the inputs (seeded sample)
    progress: str = "auto"  # auto | bar | lines | none
    labels: str | None = None
    # where the shards are computed: "local" (this process + decode workers) or "ray"
    # (an actor pool on a Ray cluster, see deepfeat.distributed); the store is the same
    engine: str = "local"
    ray_address: str | None = None  # None: $RAY_ADDRESS or a new local instance; "auto"; "HOST:PORT"
    num_actors: int | None = None  # None: as many as the cluster's CPUs (GPUs) allow
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend!r} unknown; choose {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} unknown; choose {', '.join(DTYPES)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.shard_size < 1:
            raise UsageError(f"--shard-size must be at least 1, not {self.shard_size}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be 0 or more, not {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, not {self.threads}")
        if self.pad_to is not None:
            if self.pad_to < 1:
                raise UsageError(f"--pad-to must be at least 1, not {self.pad_to}")
            if self.backend == "onnx":
                raise UsageError("--pad-to batches padded images with eager torch; use --backend torch (or auto)")
            from .batching import check_maskable
            from .pooling import get_pooling

            check_maskable(get_pooling(self.pooling))
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be at least 1, not {self.limit}")
        if self.decode_timeout is not None and self.decode_timeout < 0:
            raise UsageError(f"--decode-timeout must be 0 (none) or more seconds, not {self.decode_timeout}")
        if self.decode_in not in ("processes", "threads"):
            raise UsageError(f"decode_in must be 'processes' or 'threads', not {self.decode_in!r}")
        if not self.output:
            raise UsageError("an output store directory is required (-o STORE)")
        if self.engine not in ENGINES:
            raise UsageError(f"--engine {self.engine!r} unknown; choose {', '.join(ENGINES)}")
        if self.num_actors is not None and self.num_actors < 1:
            raise UsageError(f"--num-actors must be at least 1, not {self.num_actors}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise UsageError(f"--gpus-per-actor must be 0 or more and --cpus-per-actor more than 0, not "
                             f"{self.gpus_per_actor} and {self.cpus_per_actor}")
        parse_size_policy(self.size)
        self.post_chain()  # a bad chain (or a missing chain file) fails now, not after the extraction

    def post_chain(self):
        """The ``post`` setting as a :class:`~deepfeat.postprocess.PostChain` (a spec, or a saved chain file)."""
        from .postprocess import PostChain

        return PostChain.from_arg(self.post or "none")


@dataclass
class ExtractReport:
    """What a run did, for the summary line and for tests."""

    store: str
    planned: int = 0
    skipped_shards: int = 0
    processed: int = 0
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    failures_report: str | None = None
    interrupted: bool = False
    backend: str | None = None  # the runner that did the work (torch or onnx)
    #: time until the first batch was done (model load, worker start, ONNX export, first batch)
    warmup_seconds: float | None = None
    warmup_items: int = 0

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Throughput after the first batch: what a long run achieves."""
        if self.warmup_seconds is None or self.seconds <= self.warmup_seconds:
            return self.images_per_s
        return (self.processed - self.warmup_items) / (self.seconds - self.warmup_seconds)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["images_per_s"] = round(self.images_per_s, 2)
        d["steady_images_per_s"] = round(self.steady_images_per_s, 2)
        return d


# ---------------------------------------------------------------------------
# Worker side (module level so that it pickles into worker processes)
# ---------------------------------------------------------------------------

_W: dict[str, Any] = {}


def _worker_init(policy: SizePolicy, cfg: DataConfig, draft: bool, max_pixels: int | None,
                 in_process: bool = False) -> None:
    _W.update(policy=policy, cfg=cfg, draft=draft, max_pixels=max_pixels, in_process=in_process)
    if in_process:
        _die_with_parent()


def _die_with_parent() -> None:
    """Linux: a decode worker gets SIGKILL when its parent dies (``kill -9`` of a run),
    instead of lingering as an orphan; Ctrl-C is handled by the main process alone."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent is already gone
            os._exit(1)
    except Exception:  # best effort only
        pass


def _probe_one(path: str) -> tuple[int, int] | str:
    """Output (H, W) for *path* under the worker's policy, from the header only; or an error."""
    policy: SizePolicy = _W["policy"]
    cfg: DataConfig = _W["cfg"]
    try:
        img = open_image(path, _W["max_pixels"])
        try:
            w, h = img.size
            try:
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    w, h = h, w
            except Exception:
                pass
        finally:
            img.close()
    except DeepfeatError as e:
        return str(e)
    except Exception as e:  # anything else the header parser throws
        return f"{type(e).__name__}: {e}"
    try:
        check_resize(w, h, policy, cfg, _W["max_pixels"])
    except DeepfeatError as e:
        return str(e)
    if policy.kind == "model":
        return tuple(cfg.input_size)  # type: ignore[return-value]
    tw, th = target_size(w, h, policy, cfg)
    return th, tw


def _probe_failed(path: str, reason: str) -> str:
    return reason


def probe_sizes(paths: Sequence[str]) -> list[tuple[int, int] | str]:
    return [_probe_one(p) for p in paths]


def decode_one(item: tuple[int, str]) -> tuple[tuple, float, float]:
    """Decode one image in a worker: ((id, pixels|None, error|None, w, h, notes), read s, decode s)."""
    item_id, path = item
    t0 = time.perf_counter()
    if _W.get("in_process"):
        faults.decode_faults(path)
    problem = file_problem(path)  # before open(): a FIFO would block it, /dev/zero never end
    if problem:
        return (item_id, None, problem, None, None, ()), time.perf_counter() - t0, 0.0
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return (item_id, None, f"cannot read file: {e.strerror or e}", None, None, ()), time.perf_counter() - t0, 0.0
    t1 = time.perf_counter()
    try:
        if not data:
            raise_empty()
        d = decode_image(io.BytesIO(data), _W["policy"], _W["cfg"], draft=_W["draft"], max_pixels=_W["max_pixels"])
        out = (item_id, d.pixels, None, d.width, d.height, d.notes)
    except DeepfeatError as e:
        out = (item_id, None, str(e), None, None, ())
    except Exception as e:  # a decoder bug must not kill the run
        out = (item_id, None, f"{type(e).__name__}: {e}", None, None, ())
    return out, t1 - t0, time.perf_counter() - t1


def _decode_failed(item: tuple[int, str], reason: str) -> tuple[tuple, float, float]:
    return (item[0], None, reason, None, None, ()), 0.0, 0.0


def _merge_decoded(results: list[tuple[tuple, float, float]]) -> tuple[list[tuple], float, float]:
    return [r[0] for r in results], sum(r[1] for r in results), sum(r[2] for r in results)


def decode_batch(items: Sequence[tuple[int, str]]) -> tuple[list[tuple], float, float]:
    """Decode a batch in a worker: [(id, pixels|None, error|None, w, h, notes)], read s, decode s."""
    return _merge_decoded([decode_one(it) for it in items])


# a SupervisedPool runs these image by image, so a hang or a crash costs one image, not the run
decode_batch.per_item = PerItem(decode_one, _decode_failed, _merge_decoded)  # type: ignore[attr-defined]
probe_sizes.per_item = PerItem(_probe_one, _probe_failed, list)  # type: ignore[attr-defined]


def raise_empty() -> None:
    from .errors import ImageError

    raise ImageError("empty file (0 bytes)")


class _InlineExecutor(Executor):
    """Runs tasks in the calling thread (``--workers 0``)."""

    def __init__(self, initializer: Callable, initargs: tuple):
        initializer(*initargs)

    def submit(self, fn, *args, **kwargs):
        from concurrent.futures import Future

        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            f.set_exception(e)
        return f


def make_executor(kind: str, workers: int, initargs: tuple, timeout: float | None = None) -> Executor:
    """Decode workers: inline (0), threads, or supervised processes, where one image may take
    *timeout* seconds before its worker is killed and replaced (:mod:`deepfeat.workerpool`)."""
    if workers == 0:
        return _InlineExecutor(_worker_init, initargs)
    if kind == "threads":
        _worker_init(*initargs)
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deepfeat-decode")
    # spawn: workers are direct children of this process (so they can die with it on
    # Linux) and start clean, without the parent's torch threads or CUDA state
    return SupervisedPool(workers, _worker_init, (*initargs, True), timeout=timeout)


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------


class Progress:
    """A tqdm bar on a terminal, plain periodic lines otherwise, or nothing."""

    def __init__(self, total: int, done: int, mode: str = "auto", every: float = 10.0):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.done, self.every = mode, total, done, every
        self.start = time.perf_counter()
        self.start_done = done
        self.last = self.start
        self.bar = None
        if mode == "bar":
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, unit="img", dynamic_ncols=True, smoothing=0.1)
            except ImportError:
                self.mode = "lines"

    def update(self, n: int, stages: dict[str, float]) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(_stage_str(stages), refresh=False)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self.last >= self.every:
                self.last = now
                print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        dt = time.perf_counter() - self.start
        rate = (self.done - self.start_done) / dt if dt > 0 else 0.0
        left = self.total - self.done
        eta = left / rate if rate > 0 else float("nan")
        return (f"{self.done}/{self.total} images, {rate:.1f} img/s, "
                f"ETA {_fmt_seconds(eta) if math.isfinite(eta) else '?'}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _stage_str(stages: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.1f}s" for k, v in stages.items())


# ---------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------


def plan_inputs(store: FeatureStore, paths: list[str], shard_size: int) -> tuple[list[int], list[str], list[int]]:
    """Merge *paths* into the store's plan: known paths keep their id and shard, new
    ones are appended after them in new shards. Returns the full plan columns."""
    plan = store.read_plan()
    if plan is not None:
        ids = plan.column("id").to_pylist()
        ppaths = plan.column("path").to_pylist()
        shards = plan.column("shard").to_pylist()
    else:
        ids, ppaths, shards = [], [], []
    # one file, one item: relative and absolute spellings of the same file are the same input
    root = store.meta.get("root") or os.getcwd()

    def key(p: str) -> str:
        return os.path.normpath(os.path.join(root, p))

    known = {key(p) for p in ppaths}
    new = []
    for p in paths:
        k = key(p)
        if k not in known:
            known.add(k)
            new.append(p)
    if new:
        next_id = (max(ids) + 1) if ids else 0
        next_shard = (max(shards) + 1) if shards else 0
        for i, p in enumerate(new):
            ids.append(next_id + i)
            ppaths.append(p)
            shards.append(next_shard + i // shard_size)
        store.write_plan(ids, ppaths, shards)
    return ids, ppaths, shards


#: eager PyTorch on the CPU slows down when a batch outgrows the caches: at 384 x 512 one
#: image at a time runs about 1.5x faster than 8 (benchmarks/bench_batch.py), while at
#: 224 x 224 batches of 4-8 are best. Aspect-preserving batches are therefore capped at the
#: pixels of four 224 x 224 images (one image per batch from about 320 x 320 up).
CPU_BATCH_PIXELS = 4 * 224 * 224


def shard_batches(items: list[tuple[int, str]], policy: SizePolicy, batch_size: int,
                  sizes: list[tuple[int, int] | str] | None, batch_pixels: int | None = None,
                  pad_to: int | None = None) -> tuple[list[list[tuple[int, str]]], dict[int, str]]:
    """Deterministic batches of a shard, and the items whose header could not be read.

    Fixed-size policies: consecutive items, *batch_size* at a time. Aspect-preserving ones:
    items of exactly the same output size together (with *pad_to*: of the same size rounded up
    to multiples of it, :func:`deepfeat.batching.bucket_shape`), at most *batch_size* per batch
    and, with *batch_pixels*, at most that many pixels (but at least one image)."""
    from .batching import bucket_shape

    if policy.fixed or sizes is None:
        return [items[i: i + batch_size] for i in range(0, len(items), batch_size)], {}
    groups: OrderedDict[tuple[int, int], list[tuple[int, str]]] = OrderedDict()
    bad: dict[int, str] = {}
    for item, size in zip(items, sizes):
        if isinstance(size, str):
            bad[item[0]] = size
        else:
            groups.setdefault(bucket_shape(*size, pad_to) if pad_to else tuple(size), []).append(item)
    batches = []
    for size, group in groups.items():
        n = batch_size if not batch_pixels else max(1, min(batch_size, batch_pixels // (size[0] * size[1])))
        batches.extend(group[i: i + n] for i in range(0, len(group), n))
    return batches, bad


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


def _resolve_layers(model, layers: Sequence[str]) -> list[str]:
    out = []
    for name in layers:
        if name in ("default", ""):
            out.append(default_layer(model))
        else:
            out.append(name)
    return out


def default_layer(model) -> str:
    """The last spatial feature map before global pooling (timm: ``forward_features`` output)."""
    if model.extra_meta.get("default_layer"):
        return model.extra_meta["default_layer"]
    names = [n for n, _ in model.net.named_modules()]
    for cand in ("conv_head", "bn2", "layer4", "features", "stages", "norm"):
        if cand in names and cand != "":
            if cand == "conv_head" and "bn2" in names:
                return "bn2"  # timm EfficientNet: conv_head -> bn2 (+act) is the final feature map
            return cand
    from .errors import LayerError

    raise LayerError(f"no default layer known for {model.spec}; pass --layer (see `deepfeat layers`)")


def default_pooling(model) -> str:
    """The pooling ``--pool default`` means: the model's recorded one (``finetuned:RUN``:
    the descriptor the run chose and measured, in its ``meta.json``), else GeM (p = 3)."""
    return model.extra_meta.get("default_pooling") or "gem"


def build_meta(cfg: ExtractConfig, model, layers: list[str], pooling, dims: list[int]) -> dict[str, Any]:
    return {
        "model": model.meta(),
        "layers": layers,
        "pooling": pooling.spec,
        "pooling_params": pooling.to_dict(),
        "post": cfg.post or "none",
        "size": str(parse_size_policy(cfg.size)),
        "scales": list(cfg.scales),
        "scale_combine": cfg.scale_combine,
        "dtype": cfg.dtype,
        "draft_decode": cfg.draft,
        "features": {name: {"dim": d, "dtype": cfg.dtype} for name, d in zip(layers, dims)},
        # relative item paths are relative to this folder (where the extraction ran)
        "root": os.getcwd(),
    }


# ---------------------------------------------------------------------------
# One shard: the single definition shared by the local and the Ray engine
# ---------------------------------------------------------------------------


@dataclass
class ShardJob:
    """A shard being computed: its items, deterministic batches, and the results so far."""

    shard: int
    items: list[tuple[int, str]]
    batches: list[list[tuple[int, str]]]
    bad: dict[int, str]  # items whose image header could not be read (variable-size policies)
    results: dict[int, tuple] = field(default_factory=dict)  # id -> (vecs, w, h, notes) | (None, error)
    left: int = 0  # batches not inferred yet

    def __post_init__(self) -> None:
        self.left = len(self.batches)


class ShardProcessor:
    """How one shard is computed, from its (id, path) items to a committed shard.

    ``plan`` forms the deterministic batches (probing image headers on *executor* for
    aspect-preserving size policies), ``infer`` runs the network on one decoded batch
    (:func:`decode_batch` output), ``commit`` assembles the items table and the feature
    arrays and commits them atomically. The local engine interleaves these across shards
    to keep its decode workers busy; a Ray actor calls :meth:`run` for a whole shard.
    Either way the same batches go through the same code, so the stores are equal.
    """

    def __init__(self, store: FeatureStore, runner: Callable[[np.ndarray], list[np.ndarray]], layers: list[str],
                 dims: list[int], policy: SizePolicy, batch_size: int, dtype: str, batch_pixels: int | None = None,
                 pad_to: int | None = None):
        self.store, self.runner, self.layers, self.dims = store, runner, layers, dims
        self.policy, self.batch_size, self.batch_pixels, self.pad_to = policy, batch_size, batch_pixels, pad_to
        self.out_dtype = np.float16 if dtype == "float16" else np.float32
        self.stages = {"read": 0.0, "decode": 0.0, "infer": 0.0, "write": 0.0}

    def plan(self, shard: int, items: list[tuple[int, str]], executor: Executor, workers: int) -> ShardJob:
        # decode from the files (relative paths resolved against the store's root); the
        # items table keeps the paths as they were given
        files = [(i, self.store.resolve_path(p)) for i, p in items]
        sizes = None
        if not self.policy.fixed:
            chunk = max(1, math.ceil(len(files) / max(workers, 1)))
            futs = [executor.submit(probe_sizes, [p for _, p in files[i: i + chunk]])
                    for i in range(0, len(files), chunk)]
            sizes = [s for f in futs for s in f.result()]
        batches, bad = shard_batches(files, self.policy, self.batch_size, sizes, self.batch_pixels, self.pad_to)
        return ShardJob(shard, items, batches, bad)

    def infer(self, job: ShardJob, decoded: tuple[list[tuple], float, float]) -> int:
        """Run the network on one decoded batch of *job*; returns the number of items in it."""
        results, t_read, t_dec = decoded
        self.stages["read"] += t_read
        self.stages["decode"] += t_dec
        good = [r for r in results if r[1] is not None]
        # one forward pass per shape: a batch is planned as one shape, but a header that
        # lies about the image (rare) must cost a smaller batch, never the run
        by_shape: dict[tuple[int, ...], list[tuple]] = {}
        run_list = getattr(self.runner, "run_list", None)  # a padding runner takes several shapes at once
        for r in good:
            by_shape.setdefault(() if run_list else r[1].shape, []).append(r)
        for group in by_shape.values():
            t0 = time.perf_counter()
            for sub, outs in self._forward(job, group):
                for k, r in enumerate(sub):
                    job.results[r[0]] = ([o[k].reshape(-1) for o in outs], r[3], r[4], r[5])
            self.stages["infer"] += time.perf_counter() - t0
        for r in results:
            if r[1] is None:
                job.results[r[0]] = (None, r[2])
        job.left -= 1
        return len(results)

    #: images in a row that the network failed on, alone, before the run stops (a broken
    #: runner or device, not a bad image)
    MAX_MODEL_FAILURES = 8

    def _forward(self, job: ShardJob, group: list[tuple]) -> list[tuple[list[tuple], list[np.ndarray]]]:
        """The network on a group of same-shape decoded images, as [(images, outputs)].

        If the batch raises, each image is run alone, so an image the network cannot take
        costs only itself: it is recorded as failed with the error. When every image of a
        batch fails alone too, or :data:`MAX_MODEL_FAILURES` in a row do, the fault is
        not in the images and the run stops (committed shards are kept)."""
        try:
            outs = self._run_model(job, group)
            self._model_failures = 0
            return [(group, outs)]
        except Exception as e:  # noqa: BLE001 - retried image by image below
            if len(group) == 1:
                self._model_failed(job, group[0], e)
                return []
            first = e
        done = []
        for r in group:
            try:
                done.append(([r], self._run_model(job, [r])))
                self._model_failures = 0
            except Exception as e:  # noqa: BLE001 - recorded for this image
                self._model_failed(job, r, e)
        if not done:
            raise DeepfeatError(f"the network failed on every image of a batch, also one at a time: "
                                f"{_one_line(first)}. Committed shards are kept.") from first
        log.warning("the network failed on a batch of %d; %d of its images went through one at a time", len(group),
                    len(done))
        return done

    def _run_model(self, job: ShardJob, group: list[tuple]) -> list[np.ndarray]:
        if faults.enabled():
            paths = dict(job.items)
            faults.model_fault([paths[r[0]] for r in group])
        run_list = getattr(self.runner, "run_list", None)  # a padding runner takes several shapes at once
        if run_list is not None:
            return run_list([r[1] for r in group])
        return self.runner(np.stack([r[1] for r in group]))

    def _model_failed(self, job: ShardJob, r: tuple, e: Exception) -> None:
        self._model_failures = getattr(self, "_model_failures", 0) + 1
        if self._model_failures >= self.MAX_MODEL_FAILURES:
            raise DeepfeatError(f"the network failed on {self._model_failures} images in a row: {_one_line(e)}. "
                                "Committed shards are kept.") from e
        job.results[r[0]] = (None, f"the network failed on this image: {_one_line(e)}")

    def commit(self, job: ShardJob) -> tuple[int, int]:
        """Write the shard (arrays, then the items file that marks it committed); returns (ok, failed)."""
        t0 = time.perf_counter()
        items_tab = ShardItems.empty()
        feats: list[list[np.ndarray]] = [[] for _ in self.layers]
        for item_id, path in job.items:
            if item_id in job.bad:
                items_tab.add(item_id, path, ok=False, error=job.bad[item_id])
                continue
            r = job.results[item_id]
            if r[0] is None:
                items_tab.add(item_id, path, ok=False, error=r[1])
                continue
            vecs, w, h, notes = r
            items_tab.add(item_id, path, ok=True, width=w, height=h, offset=len(feats[0]), notes=notes)
            for j, v in enumerate(vecs):
                feats[j].append(v)
        arrays = {
            name: (np.stack(f).astype(self.out_dtype) if f else np.zeros((0, d), self.out_dtype))
            for name, f, d in zip(self.layers, feats, self.dims)
        }
        try:
            self.store.commit_shard(job.shard, items_tab, arrays)
        except OSError as e:
            raise StoreError(f"cannot write shard {job.shard} to {self.store.path}: {e.strerror or e}. Committed "
                             "shards are kept; free space and run the same command again to continue.") from None
        self.stages["write"] += time.perf_counter() - t0
        n_ok = sum(s == "ok" for s in items_tab.status)
        return n_ok, len(items_tab) - n_ok

    def run(self, shard: int, items: list[tuple[int, str]], executor: Executor, workers: int) -> tuple[int, int]:
        """Compute and commit a whole shard, decoding up to ``2 * workers`` batches ahead of inference."""
        job = self.plan(shard, items, executor, workers)
        ahead = max(2, 2 * workers)
        pending: deque = deque()
        nxt = 0
        while nxt < len(job.batches) or pending:
            while nxt < len(job.batches) and len(pending) < ahead:
                pending.append(executor.submit(decode_batch, job.batches[nxt]))
                nxt += 1
            self.infer(job, pending.popleft().result())
        return self.commit(job)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_feature_net(cfg: ExtractConfig, out: Path, device) -> tuple[Any, list[str], Any, Any]:
    """(model, resolved layers, pooling, FeatureNet on *device*) as *cfg* defines them; a pooling
    that learns is taken from --pool-fit or the store's saved codebook, else fitted and returned."""
    from .features import FeatureNet
    from .models import load_model
    from .pooling import get_pooling

    model = load_model(cfg.model, device=str(device), labels=cfg.labels)
    layers = _resolve_layers(model, cfg.layers)
    pooling = get_pooling(default_pooling(model) if cfg.pooling in ("default", "") else cfg.pooling)
    if pooling.needs_fit:
        pooling = _fitted_pooling(cfg, model, layers, pooling, parse_size_policy(cfg.size), out, device)
    fnet = FeatureNet(model, layers, pooling, cfg.scales, cfg.scale_combine).to(device)
    return model, layers, pooling, fnet


def make_runner(cfg: ExtractConfig, fnet, device, threads: int | None = None
                ) -> Callable[[np.ndarray], list[np.ndarray]]:
    """The inference runner for *cfg*; ONNX Runtime gets *threads* intra-op threads (None: torch's)."""
    import torch

    from .features import FallbackRunner, OnnxRunner, TorchRunner

    threads = threads or torch.get_num_threads()
    if padding(cfg):
        from .batching import PaddedTorchRunner

        return PaddedTorchRunner(fnet, device, cfg.pad_to, channels_last=cfg.channels_last)
    # one shape: static graphs (fastest per image); many shapes (aspect-preserving policies):
    # one graph with dynamic height and width (docs/benchmarks.md, "ONNX Runtime at retrieval sizes")
    export = "static" if parse_size_policy(cfg.size).fixed else "dynamic"
    if cfg.backend == "onnx":
        return OnnxRunner(fnet, threads=threads, batch_size=cfg.batch_size or 8, export=export)
    if cfg.backend == "auto" and auto_prefers_onnx(cfg, fnet, device):
        onnx = OnnxRunner(fnet, threads=threads, batch_size=cfg.batch_size or 8, export=export)
        return FallbackRunner(onnx, TorchRunner(fnet, device))
    return TorchRunner(fnet, device, channels_last=cfg.channels_last, compile=cfg.compile)


def padding(cfg: ExtractConfig) -> int | None:
    """The multiple images are padded to (``--pad-to``), for aspect-preserving policies on the torch backend."""
    if cfg.pad_to and not parse_size_policy(cfg.size).fixed and cfg.backend != "onnx":
        return cfg.pad_to
    return None


def resolve_threads(cfg: ExtractConfig) -> tuple[int, int]:
    """(inference threads, decode workers): ``--threads`` and ``--workers`` where given, else
    :func:`deepfeat.onnx_runtime.default_threads` for this machine's cores."""
    from .onnx_runtime import default_threads

    threads, workers = default_threads()
    return (cfg.threads or threads), (cfg.workers if cfg.workers is not None else workers)


def eager_cpu(cfg: ExtractConfig, device) -> bool:
    """Whether an aspect-preserving extraction runs on CPUs (here, or on Ray's CPU-only actors):
    the case for :data:`CPU_BATCH_PIXELS` (eager torch and ONNX Runtime alike)."""
    on_cpu = device.type == "cpu" and (cfg.engine == "local" or not cfg.gpus_per_actor)
    return on_cpu and not parse_size_policy(cfg.size).fixed


def auto_prefers_onnx(cfg: ExtractConfig, fnet, device) -> bool:
    """``--backend auto``: ONNX Runtime on the CPU (2-3.5x eager PyTorch, docs/benchmarks.md), for
    every size policy (one static graph for one shape, one dynamic graph for many); eager torch
    on CUDA."""
    import importlib.util

    return (device.type == "cpu" and fnet.exportable and not padding(cfg)
            and importlib.util.find_spec("onnxruntime") is not None)


# ---------------------------------------------------------------------------
# The run: setup, plan, one engine, finish
# ---------------------------------------------------------------------------


def extract(cfg: ExtractConfig, on_shard: Callable[[int], None] | None = None) -> ExtractReport:
    """Run (or continue) an extraction into ``cfg.output``, as the store's only writer.

    The store's lock (:class:`~deepfeat.storelock.StoreLock`) is taken first: a second
    ``extract`` on the same store, or a store folder that cannot be written, is refused
    before the model is loaded. The run itself is :func:`_extract`.
    """
    cfg.validate()
    check_store_dir(Path(cfg.output))
    with StoreLock(cfg.output, create=not cfg.resume):
        return _extract(cfg, on_shard)


def _extract(cfg: ExtractConfig, on_shard: Callable[[int], None] | None = None) -> ExtractReport:
    """Run (or continue) an extraction into ``cfg.output``; see the module docstring.

    The setup (model, meta, store), the plan and the finish (items.parquet, fitted
    post-processing, failures.csv) are the same for both engines; only where the
    uncommitted shards are computed differs. *on_shard* is called with each shard id
    as it is committed (in this process for both engines).
    """
    from .features import pooled_dims
    from .models.base import resolve_device

    cfg.validate()
    post = cfg.post_chain()
    post_file = cfg.post if post.fitted and post.needs_fit else None  # a saved, fitted chain file
    cfg.post = post.spec
    if cfg.engine == "ray":
        from .distributed import require_ray

        require_ray()  # before any heavy work: a missing extra is a UsageError that says how to install it
    t_start = time.perf_counter()
    out = Path(cfg.output)
    existing = FeatureStore(out) if (out / "meta.json").is_file() else None
    if cfg.resume and existing is None:
        raise UsageError(f"--resume: {out} is not an existing feature store")
    if existing is not None and cfg.resume:
        _adopt_meta(cfg, existing.meta)

    # the Ray driver only plans (and fits a codebook, if any) on its CPU; actors pick their device
    device = resolve_device(cfg.device if cfg.backend in ("torch", "auto") and cfg.engine == "local" else "cpu")
    model, layers, pooling, fnet = load_feature_net(cfg, out, device)
    dims = pooled_dims(fnet, model.data_config.input_size)
    if post_file:
        check_post_dim(post, post_file, dims[0])  # before the store is made
    meta = build_meta(cfg, model, layers, pooling, dims)
    store = FeatureStore.create(out, meta)
    if pooling.needs_fit and not (store.path / POOLING_FILE).is_file():
        pooling.save(store.path / POOLING_FILE, extra={"layer": layers[0], "model": model.spec})
    if store.meta.get("post") != meta["post"]:
        store.update_meta(post=meta["post"])
        (store.path / "post.npz").unlink(missing_ok=True)
    if post_file:
        install_post(store, post, post_file, dims[0])

    # plan
    # names that are not UTF-8 are planned (as \xNN escapes) and reported, see images.file_problem
    paths = [printable_path(p) for p in discover(cfg.inputs)] if cfg.inputs else []
    root = store.meta.get("root")
    if root and os.path.abspath(root) != os.getcwd():
        # appending from another folder: keep relative paths relative to the store's root
        paths = [p if os.path.isabs(p) else os.path.relpath(os.path.abspath(p), root) for p in paths]
    if cfg.limit is not None:
        paths = paths[: cfg.limit]
    ids, ppaths, shards = plan_inputs(store, paths, cfg.shard_size)
    if not ids:
        raise UsageError("no images found in the inputs")
    committed = set(store.committed_shards())
    by_shard: OrderedDict[int, list[tuple[int, str]]] = OrderedDict()
    for i, p, s in zip(ids, ppaths, shards):
        if s not in committed:
            by_shard.setdefault(s, []).append((i, p))
    report = ExtractReport(store=str(out), planned=len(ids), skipped_shards=len(committed))
    if cfg.batch_size is None:
        cfg.batch_size = 64 if device.type == "cuda" else 8
        if cfg.batch_pixels is None and eager_cpu(cfg, device):
            cfg.batch_pixels = CPU_BATCH_PIXELS
    todo = sum(len(v) for v in by_shard.values())
    if committed:
        log.info("resuming: %d shard(s) already committed", len(committed))

    stages = {"read": 0.0, "decode": 0.0, "infer": 0.0, "write": 0.0}
    progress = Progress(len(ids), len(ids) - todo, cfg.progress)
    try:
        if cfg.engine == "ray":
            from .distributed import run_shards_on_ray

            run_shards_on_ray(cfg, store, layers, by_shard, report, progress, stages, on_shard)
        else:
            _run_local(cfg, store, model, fnet, layers, dims, device, by_shard, report, progress, stages, on_shard,
                       t_start)
    except KeyboardInterrupt:
        report.interrupted = True
        raise
    finally:
        progress.close()
        report.seconds = time.perf_counter() - t_start
        report.stage_seconds = {k: round(v, 3) for k, v in stages.items()}
        try:
            store.consolidate()
        except Exception as e:  # never hide the original error behind a consolidation failure
            log.warning("could not consolidate items.parquet: %s", e)
    _finish_post(store, cfg)
    failed = store.failed()
    if failed.num_rows:
        import pyarrow.csv as pacsv

        rep = store.path / "failures.csv"
        pacsv.write_csv(failed.select(["id", "path", "error"]), rep)
        report.failures_report = str(rep)
    store.update_meta(last_run=report.to_dict())
    return report


def _run_local(cfg: ExtractConfig, store: FeatureStore, model, fnet, layers: list[str], dims: list[int], device,
               by_shard: OrderedDict[int, list[tuple[int, str]]], report: ExtractReport, progress: Progress,
               stages: dict[str, float], on_shard: Callable[[int], None] | None, t_start: float) -> None:
    """The local engine: decode workers feed inference in this process, several shards in flight."""
    import torch

    policy = parse_size_policy(cfg.size)
    threads, workers = resolve_threads(cfg)
    torch_threads = torch.get_num_threads()
    if cfg.threads:  # eager torch keeps its own default (all cores) unless --threads is given
        torch.set_num_threads(cfg.threads)
    proc = ShardProcessor(store, make_runner(cfg, fnet, device, threads), layers, dims, policy, cfg.batch_size,
                          cfg.dtype, cfg.batch_pixels, padding(cfg))
    proc.stages = stages  # accumulate into the caller's dict, which the report reads even after an interrupt
    from . import backend_check

    try:
        backend_check.guard(store, proc.runner, layers, lambda p: decode_image(
            p, policy, model.data_config, draft=cfg.draft, max_pixels=cfg.max_pixels).pixels)
    except BaseException:
        torch.set_num_threads(torch_threads)
        raise
    report.backend = proc.runner.name
    initargs = (policy, model.data_config, cfg.draft, cfg.max_pixels)
    executor = make_executor(cfg.decode_in, workers, initargs, cfg.decode_timeout)
    inflight_max = max(2, 2 * max(workers, 1))
    interrupted = False
    try:
        pending: deque = deque()  # (job, future of decode_batch), in submission order
        jobs: dict[int, ShardJob] = {}

        def submit_shard(shard: int, items: list[tuple[int, str]]) -> None:
            job = jobs[shard] = proc.plan(shard, items, executor, workers)
            for b in job.batches:
                pending.append((job, executor.submit(decode_batch, b)))
            if not job.batches:
                finish_shard(job)

        def finish_shard(job: ShardJob) -> None:
            del jobs[job.shard]
            if report.processed and "inference" not in store.meta:
                # before the first commit, so that a run killed after it still says which backend made its rows
                backend_check.record(store, proc.runner)
            n_ok, n_failed = proc.commit(job)
            report.ok += n_ok
            report.failed += n_failed
            if on_shard is not None:
                on_shard(job.shard)

        def drain_one() -> None:
            job, fut = pending.popleft()
            n = proc.infer(job, fut.result())
            report.backend = proc.runner.name
            report.processed += n
            if report.warmup_seconds is None:
                report.warmup_seconds = time.perf_counter() - t_start
                report.warmup_items = n
            progress.update(n, stages)
            if job.left == 0:
                finish_shard(job)

        shard_iter = iter(by_shard.items())
        exhausted = False
        while True:
            while not exhausted and len(pending) < inflight_max:
                nxt = next(shard_iter, None)
                if nxt is None:
                    exhausted = True
                    break
                submit_shard(*nxt)
            if not pending:
                break
            drain_one()
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        _shutdown(executor, cancel=interrupted)
        torch.set_num_threads(torch_threads)
    if report.processed:
        backend_check.record(store, proc.runner)


POOLING_FILE = "pooling.npz"


def _fitted_pooling(cfg: ExtractConfig, model, layers: list[str], pooling, policy: SizePolicy, out: Path, device):
    """A pooling that learns (MOP's codebooks): from --pool-fit, from the store, or fitted on
    a seeded sample of the inputs and saved into the store so a resumed run reuses it."""
    import torch

    from .pooling import load_pooling
    from .taps import make_taps

    if len(layers) != 1:
        raise UsageError(f"pooling {pooling.spec!r} learns a codebook per layer; tap one layer, not {layers}")
    saved = out / POOLING_FILE
    src = cfg.pool_fit or (str(saved) if saved.is_file() else None)
    if src:
        fitted = load_pooling(src)
        if fitted.spec != pooling.spec:
            raise UsageError(f"codebook {src} is for {fitted.spec!r}, not {pooling.spec!r}")
        return fitted
    paths = discover(cfg.inputs) if cfg.inputs else []
    if not paths:
        raise UsageError(f"pooling {pooling.spec!r} needs a codebook: give inputs to fit on, or --pool-fit FILE")
    rng = np.random.default_rng(0)
    sample = [paths[i] for i in sorted(rng.choice(len(paths), min(len(paths), cfg.pool_fit_samples),
                                                  replace=False))]
    log.warning("fitting %s on %d of the input images", pooling.spec, len(sample))
    taps = make_taps(model, layers)

    def batches():
        for p in sample:
            try:
                px = decode_image(p, policy, model.data_config, draft=cfg.draft).pixels
            except DeepfeatError:
                continue
            with torch.inference_mode():
                yield taps(model.normalize(torch.from_numpy(px)[None].to(device)))[layers[0]].cpu()

    pooling.fit(batches())
    pooling.fit_info = {**getattr(pooling, "fit_info", {}), "fitted_on_images": len(sample)}
    return pooling


def _shutdown(executor: Executor, cancel: bool) -> None:
    try:
        executor.shutdown(wait=not cancel, cancel_futures=True)
    except TypeError:
        executor.shutdown(wait=not cancel)


def _adopt_meta(cfg: ExtractConfig, meta: dict[str, Any]) -> None:
    """--resume: take the settings from the store, so flags need not be repeated."""
    cfg.model = meta["model"]["spec"]
    cfg.layers = list(meta["layers"])
    cfg.pooling = meta["pooling"]
    cfg.size = meta["size"]
    cfg.scales = tuple(meta.get("scales", [1.0]))
    cfg.scale_combine = meta.get("scale_combine", "sum")
    cfg.dtype = meta.get("dtype", "float32")
    cfg.post = meta.get("post", cfg.post)
    cfg.draft = meta.get("draft_decode", cfg.draft)


def _finish_post(store: FeatureStore, cfg: ExtractConfig) -> None:
    """Fit the post-processing chain if it needs fitting and is not fitted yet."""
    from .postprocess import PostChain

    chain = PostChain.parse(store.meta.get("post") or "none")
    if not chain.needs_fit or (store.path / "post.npz").is_file():
        return
    fit_post(store, chain, cfg.fit_on, cfg.fit_max)


def check_post_dim(chain, source: str, dim: int) -> None:
    """A fitted chain from the file *source* must take *dim*-D descriptors."""
    if chain.dim_in is not None and int(chain.dim_in) != int(dim):
        raise UsageError(f"{source} post-processes {chain.dim_in}-D descriptors but this store's are {dim}-D "
                         "(another layer or pooling?)")


def install_post(store: FeatureStore, chain, source: str, dim: int | None = None) -> None:
    """Use an already fitted *chain* (loaded from the file *source*) as *store*'s post-processing."""
    check_post_dim(chain, source, store.dim if dim is None else dim)
    chain.save(store.path / "post.npz", extra={"copied_from": str(source)})
    store.update_meta(post=chain.spec, post_fitted_on=str(source), post_fitted_rows=int(chain.n_fit))
    store._post = None


def fit_post(store: FeatureStore, chain, fit_on: str | None, fit_max: int = 100_000, seed: int = 0) -> None:
    """Fit *chain* on another store (``fit_on``) or on this one, and save it into *store*."""
    src = FeatureStore(fit_on) if fit_on else store
    if fit_on:
        src.check_compatible({**store.meta, "post": src.meta.get("post")})
    x = src.raw(store.feature_name())
    if len(x) > fit_max:
        rng = np.random.default_rng(seed)
        x = x[np.sort(rng.choice(len(x), fit_max, replace=False))]
    if not fit_on:
        log.warning("fitting %s on the features being indexed (no --fit-on given)", chain.spec)
    fitted = chain.fit(x)
    fitted.save(store.path / "post.npz")
    store.update_meta(post=chain.spec, post_fitted_on=str(src.path), post_fitted_rows=int(len(x)))
    store._post = None


def default_workers() -> int:
    """Decode workers: one per core (inference shares them; decoding is the CPU bottleneck)."""
    n = os.cpu_count() or 1
    return max(1, n)
