"""ONNX Runtime sessions for a :class:`~deepfeat.backends.featurenet.FeatureNet`: which graphs, how many threads.

Two export kinds (the measured comparison is in docs/benchmarks.md, "ONNX Runtime at
retrieval sizes"):

* ``static``: one graph per input shape (and a fixed batch size). Fastest per image at
  one shape (``--size model``, ``warp:``), but every new shape costs an export (seconds:
  2.6-3.8 s for EfficientNet-Lite0, docs/benchmarks.md), so at most :data:`MAX_STATIC_GRAPHS` are kept (least recently
  used first out).
* ``dynamic``: one graph with dynamic batch, height and width, for aspect-preserving
  and multi-scale policies (hundreds of shapes). It is exact only if nothing in the
  network, normalisation or pooling turns the input shape into a constant at trace time
  (R-MAC's region grid, SPoC's centre prior, a Caffe mean image, ...). That is checked
  once, right after the export, at a second shape against eager PyTorch
  (:func:`dynamic_graph_agrees`); a graph that fails falls back to ``static`` per shape, or, for
  ``--backend auto`` (*on_mismatch* ``raise``), raises :class:`DynamicGraphError` so that auto
  runs eager PyTorch instead: one export per distinct shape costs far more than eager inference
  on a collection of many shapes (400 images at ``long:512`` x 3 scales with R-MAC: over 25 min).
  A batch shape (N, H, W) seen a second time gets its own session of the same graph with
  those dimensions fixed (ONNX Runtime's free-dimension overrides: no export, about 0.05 s),
  which runs 1.2-1.4x the dynamic session at ``long:512``/``long:1024`` (docs/benchmarks.md);
  at most :data:`MAX_FIXED_SESSIONS` are kept (least recently used out), and the first one
  is checked against the dynamic session on its batch.

Thread defaults (:func:`default_threads`) split the cores between ONNX Runtime's
intra-op threads and the decode workers; ``--threads`` overrides them.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np

from deepfeat.backends.tolerance import F32, agreement, agrees
from deepfeat.errors import DeepfeatError

log = logging.getLogger(__name__)

EXPORT_KINDS = ("static", "dynamic")
#: per-shape static graphs kept in memory at once (each EfficientNet-Lite0 session ~20 MB)
MAX_STATIC_GRAPHS = 16
#: shape-fixed sessions of the dynamic graph kept at once (each holds its plan and weights, about
#: 70-200 MB for EfficientNet-Lite0 at 768 x 1024; activations are freed after each run)
MAX_FIXED_SESSIONS = 4


#: what a dynamic graph that fails its check does: export one graph per shape, or raise
ON_MISMATCH = ("static", "raise")


class DynamicGraphError(DeepfeatError):
    """The network's dynamic-shape export does not give its descriptors at other input sizes (shape
    constants at trace time: R-MAC's region grid, SPoC's centre prior); raised where per-shape graphs
    are not wanted instead (``--backend auto``)."""


def dynamic_problem(fnet, check) -> str | None:
    """Why *fnet*'s dynamic export disagrees with eager PyTorch (None: it agrees). *check* exports,
    compiles and checks (returning ``(ok, why)``); it runs once per network, the answer is kept on
    *fnet* (``dynamic_problem``), so a second engine (auto's fallback) does not export it again."""
    why = getattr(fnet, "dynamic_problem", None)
    if why is None:
        ok, why = check()
        if ok:
            return None
        fnet.dynamic_problem = why
    return why


def dynamic_mismatch(why: str, engine: str, on_mismatch: str, max_static: int) -> None:
    """After a failed dynamic check: raise :class:`DynamicGraphError` (*on_mismatch* ``raise``), or
    say that one graph per shape follows."""
    if on_mismatch == "raise":
        raise DynamicGraphError(f"the dynamic-shape graph does not give PyTorch's descriptors at other input sizes "
                                f"({why}); one {engine} graph per input shape would be exported")
    log.warning("the dynamic-shape graph does not match PyTorch at other input sizes (%s): exporting one %s graph "
                "per shape instead (at most %d kept)", why, engine, max_static)


def session_options(threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return opts


def load_session(path_or_bytes, threads: int | None, fixed: dict[str, int] | None = None, arena: bool = True):
    """An ONNX Runtime CPU session; *fixed* overrides named dynamic dimensions (``batch``,
    ``height``, ``width``) with constants, so the session plans for that one shape.

    *arena*: ONNX Runtime's CPU memory arena. Sessions of the dynamic graph run without it: fed
    hundreds of shapes, the arena grows with each and keeps what it took, while plain allocation
    stays flat at the same speed (the figures: docs/benchmarks.md, "At long:1024")."""
    import onnxruntime as ort

    opts = session_options(threads)
    opts.enable_cpu_mem_arena = bool(arena)
    for name, value in (fixed or {}).items():
        opts.add_free_dimension_override_by_name(name, int(value))
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def export(fnet, shape: tuple[int, int, int], path: str, kind: str, batch_size: int | None = None,
           opset: int = 17) -> None:
    """Export *fnet* for uint8 ``N x H x W x C`` inputs traced at *shape* (H, W, C).

    ``static``: H and W fixed, N fixed to *batch_size* (None: dynamic). ``dynamic``: N, H and W dynamic.
    """
    import torch

    h, w, c = rounded_shape(shape, fnet) if kind == "dynamic" else shape
    dummy = torch.zeros(batch_size or 2, h, w, c, dtype=torch.uint8)
    names = [f"feat{i}" for i in range(len(fnet.layers))]
    if kind == "dynamic":
        axes: dict[str, dict[int, str]] | None = {"pixels": {0: "batch", 1: "height", 2: "width"},
                                                  **{n: {0: "batch"} for n in names}}
    elif batch_size:
        axes = None
    else:
        axes = {"pixels": {0: "batch"}, **{n: {0: "batch"} for n in names}}
    export_module(fnet, dummy, path, names, axes, opset)


def export_module(module, dummy, path: str, output_names: list[str], dynamic_axes: dict | None,
                  opset: int = 17) -> None:
    """``torch.onnx.export`` of *module* with the input ``pixels`` (traced with *dummy*), the operator
    replacements and quiet log of :func:`deepfeat.backends.export_ops.exportable_ops`, and tracer warnings
    about shape constants silenced (they are expected, and the graphs are checked after the export)."""
    import torch

    from deepfeat.backends.export_ops import exportable_ops

    with warnings.catch_warnings(), exportable_ops():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (dummy,), path, input_names=["pixels"], output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)


def export_for(fnet, shape: tuple[int, int, int], path: str, kind: str, batch_size: int | None) -> None:
    """:func:`export` for inputs of *shape*: traced at :func:`trace_shape` for a dynamic graph."""
    export(fnet, trace_shape(shape) if kind == "dynamic" else shape, path, kind, batch_size)


#: the longest side a dynamic graph is traced at: its H and W are free, so the trace shape only
#: sets the memory of the export (tracing at 768 x 1024, batch 2, took 3.6 GB), not the graph
TRACE_SIDE = 256


def trace_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The shape to trace a dynamic graph at for inputs like *shape*: the same aspect, the longer
    side at most :data:`TRACE_SIDE`, odd sides kept odd (TF 'SAME' padding is traced either way and
    checked at :func:`probe_shape` after the export)."""
    h, w, c = shape
    f = min(1.0, TRACE_SIDE / max(h, w))
    t = (max(33, round(h * f)), max(33, round(w * f)), c)
    return t if t != probe_shape(shape) else (t[0] + 2, t[1], c)  # the check must see a second shape


def rounded_shape(shape: tuple[int, int, int], fnet) -> tuple[int, int, int]:
    """*shape* with H and W rounded down to the network's patch stride (``fnet.size_multiple``: a
    transformer's patch grid takes only multiples of it), so a trace or probe shape is one it runs at."""
    m = int(getattr(fnet, "size_multiple", 1) or 1)
    h, w, c = shape
    return (max(m, h // m * m), max(m, w // m * m), c) if m > 1 else shape


def probe_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """A second, different shape to check a dynamic graph at: other sizes, other parity (odd sides
    exercise TF 'SAME' padding), landscape for portrait and back, and small, so the check is cheap."""
    h, w, c = shape
    return max(33, w // 2 + 1), max(33, h // 2 + 3), c


def dynamic_graph_agrees(sess, fnet, shape: tuple[int, int, int]) -> tuple[bool, str]:
    """Run the dynamic graph and eager PyTorch on random pixels at :func:`probe_shape` of *shape*."""
    import torch

    ps = rounded_shape(probe_shape(shape), fnet)
    x = np.random.default_rng(0).integers(0, 256, (1, *ps), dtype=np.uint8)
    try:
        got = sess.run(None, {"pixels": x})
    except Exception as e:  # noqa: BLE001 - a graph that cannot run at another shape is not dynamic
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    with torch.inference_mode():
        want = [o.float().numpy() for o in fnet(torch.from_numpy(x))]
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return False, f"output shape {g.shape} at input {ps[:2]}, torch gives {w.shape}"
        ok, numbers = F32.check(g, w)
        if not ok:
            return False, f"at input {ps[0]}x{ps[1]} {numbers} to torch"
    return True, ""


class GraphCache:
    """ONNX Runtime sessions for one FeatureNet: one dynamic graph, or static graphs per shape (LRU)."""

    def __init__(self, fnet, kind: str = "static", threads: int | None = None, batch_size: int | None = None,
                 disk_cache=None, max_static: int = MAX_STATIC_GRAPHS, on_mismatch: str = "static"):
        if kind not in EXPORT_KINDS:
            raise ValueError(f"export kind {kind!r}; choose {', '.join(EXPORT_KINDS)}")
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch {on_mismatch!r}; choose {', '.join(ON_MISMATCH)}")
        self.fnet, self.kind, self.threads = fnet, kind, threads
        self.on_mismatch = on_mismatch
        self.batch_size = batch_size if kind == "static" else None
        self.max_static = max(1, int(max_static))
        self._static: OrderedDict[tuple[int, int, int], Any] = OrderedDict()
        self._dynamic = None
        self._dynamic_model: bytes | None = None  # the dynamic graph, for shape-fixed sessions of it
        self._seen: dict[tuple[int, ...], int] = {}  # batch shapes run on the dynamic session
        self._fixed: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self.max_fixed = MAX_FIXED_SESSIONS
        self.fixed_sessions = 0  # shape-fixed sessions made (a reused shape costs none)
        self.fixed_problem: str | None = None  # why shape-fixed sessions were turned off
        self.export_seconds = 0.0
        self.exports = 0
        self.cache_hits = 0  # graphs taken from the on-disk cache instead of exported
        self.evictions = 0
        self.fallback_reason: str | None = None  # why a dynamic graph was given up for static ones
        #: the graph file of each session built, by (kind, input shape): a prepared entry names it
        self.paths: dict[tuple[str, tuple[int, int, int]], str] = {}
        #: exported graphs kept between runs (:class:`deepfeat.backends.export_cache.ExportCache`); None: off
        self.disk_cache = disk_cache

    @property
    def graphs(self) -> int:
        return len(self._static) + (self._dynamic is not None)

    def _build(self, kind: str, shape: tuple[int, int, int], batch_size: int | None):
        """The session of *kind* for inputs of *shape*: its graph from the on-disk cache, or exported
        (into the cache, or a temporary folder without one)."""
        from deepfeat.backends.export_cache import cached_graph

        t0 = time.perf_counter()

        write = functools.partial(export_for, self.fnet, shape, kind=kind, batch_size=batch_size)
        path, sess = cached_graph(self.disk_cache, self.fnet, kind, shape, batch_size, write,
                                  functools.partial(self._load, kind=kind), self)
        self.paths[(kind, tuple(shape))] = path
        self.export_seconds += time.perf_counter() - t0
        return sess

    def _load(self, path: str, kind: str):
        """A session of the graph file *path* (a dynamic graph's bytes kept for shape-fixed sessions)."""
        sess = load_session(path, self.threads, arena=kind != "dynamic")
        if kind == "dynamic":
            with open(path, "rb") as f:
                self._dynamic_model = f.read()
        return sess

    def use_graph(self, path: str, shape: tuple[int, int, int]) -> None:
        """Serve this cache's kind from the graph file *path*, already exported and checked (a prepared
        network's, :mod:`deepfeat.backends.prepared`): the dynamic graph, or the static one of *shape*."""
        sess = self._load(path, self.kind)
        if self.kind == "dynamic":
            self._dynamic = sess
        else:
            self._static[tuple(shape)] = sess
        self.paths[(self.kind, tuple(shape))] = path

    def session(self, shape: tuple[int, int, int]) -> tuple[Any, int | None]:
        """(session, the batch size it must be fed: None for any) for inputs of *shape*."""
        if self.kind == "dynamic" and self.fallback_reason is None:
            if self._dynamic is None:
                built = []

                def check():
                    built.append(self._build("dynamic", shape, None))
                    return dynamic_graph_agrees(built[0], self.fnet, shape)

                why = dynamic_problem(self.fnet, check)
                if why is None:
                    self._dynamic = built[0]
                else:
                    self._dynamic_model = None
                    dynamic_mismatch(why, "ONNX", self.on_mismatch, self.max_static)
                    self.fallback_reason = why
            if self._dynamic is not None:
                return self._dynamic, None
        sess = self._static.get(shape)
        if sess is not None:
            self._static.move_to_end(shape)
            return sess, self.batch_size
        sess = self._build("static", shape, self.batch_size)
        self._static[shape] = sess
        if len(self._static) > self.max_static:
            self._static.popitem(last=False)
            self.evictions += 1
        return sess, self.batch_size

    def _fixed_session(self, sess, pixels: np.ndarray):
        """The shape-fixed session for this batch's (N, H, W, C) if the shape was seen before
        (made now if need be), else *sess* (the dynamic one)."""
        key = tuple(pixels.shape)
        if self.fixed_problem is not None or self._dynamic_model is None or self.max_fixed < 1:
            return sess
        fixed = self._fixed.get(key)
        if fixed is not None:
            self._fixed.move_to_end(key)
            return fixed
        self._seen[key] = self._seen.get(key, 0) + 1
        if self._seen[key] < 2:  # a shape seen once may never come back: not worth a session
            return sess
        fixed = load_session(self._dynamic_model, self.threads, dict(zip(("batch", "height", "width"), key[:3])),
                             arena=False)
        if self.fixed_sessions == 0:  # the first one is checked against the dynamic session
            feed = {"pixels": np.ascontiguousarray(pixels)}
            for g, w in zip(fixed.run(None, feed), sess.run(None, feed)):
                if not agrees(g, w):
                    self.fixed_problem = "cosine %.6f, max abs diff %.2e" % agreement(g, w)
                    log.warning("a shape-fixed ONNX Runtime session differs from the dynamic one (%s): "
                                "using the dynamic session only", self.fixed_problem)
                    return sess
        self.fixed_sessions += 1
        self._fixed[key] = fixed
        if len(self._fixed) > self.max_fixed:
            self._fixed.popitem(last=False)
        return fixed

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        sess, b = self.session(tuple(pixels.shape[1:]))
        if sess is self._dynamic:
            sess = self._fixed_session(sess, pixels)
        return run_in_batches_of(lambda x: list(sess.run(None, {"pixels": np.ascontiguousarray(x)})), pixels, b)


def run_in_batches_of(run, pixels: np.ndarray, b: int | None) -> list[np.ndarray]:
    """*run* (a graph with a fixed batch *b*; None: any batch) over *pixels*, in chunks of *b*,
    the last padded with zero images, whose outputs are dropped."""
    n = len(pixels)
    if not b or n == b:
        return run(pixels)
    parts = []
    for i in range(0, n, b):
        chunk = pixels[i: i + b]
        m = len(chunk)
        if m < b:  # every image is computed independently: zero images do not change the others
            chunk = np.concatenate([chunk, np.zeros((b - m, *chunk.shape[1:]), chunk.dtype)])
        parts.append([o[:m] for o in run(chunk)])
    return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


#: Input pixels per image (summed over scales) from which inference, not decoding, is the cost
#: and decoding gets only half the cores: measured on a quiet 2-core machine between 224 x 224
#: (``--size model``, decode-bound) and 512 x 512 (``long:512``), docs/benchmarks.md.
LARGE_INPUT_PIXELS = 200_000


def work_pixels(size: str, scales=(1.0,)) -> int | None:
    """About the input pixels per image of a size policy (``long:S``, ``short:S``, ``warp:S``:
    S x S; ``warp:HxW``: H x W) summed over *scales*; None for ``model``/``native``."""
    from deepfeat.data.preprocess import parse_size_policy

    side = parse_size_policy(size).size
    if isinstance(side, int):
        base = side * side
    elif isinstance(side, tuple) and len(side) == 2:
        base = int(side[0]) * int(side[1])
    else:
        return None
    return int(base * sum(float(s) ** 2 for s in scales))


def default_threads(cores: int | None = None, pixels: int | None = None) -> tuple[int, int]:
    """(intra-op threads, decode workers) for a box with *cores* cores and inputs of about
    *pixels* pixels per image (:func:`work_pixels`).

    ONNX Runtime gets every core (at most 8). Decoding gets one worker per core for small
    inputs (``--size model``, 224 x 224) and half the cores from :data:`LARGE_INPUT_PIXELS`
    up (``long:512``, ``long:1024``, ``--scales``), where it is a few percent of the work: the
    rule measured best end to end on a quiet 2-core machine (benchmarks/bench_threads.py; the
    ratios are in docs/benchmarks.md). On a machine shared with other jobs the spinning
    inference threads lose their cores and ``--threads 1`` does better; pass it there. The
    16-core rules are not measured (no such machine was available); ``--threads`` and
    ``--workers`` override the defaults.
    """
    n = max(1, cores or os.cpu_count() or 1)
    threads = max(1, min(8, n))
    if pixels is not None and pixels >= LARGE_INPUT_PIXELS:
        return threads, max(1, n // 2)
    return threads, n
