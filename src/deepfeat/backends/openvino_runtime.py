"""OpenVINO for a :class:`~deepfeat.backends.featurenet.FeatureNet`: its ONNX export compiled for the CPU.

The descriptor network (normalisation, the taps, the pooling, the scales) is exported to ONNX
exactly as for ONNX Runtime (:func:`deepfeat.backends.onnx_runtime.export`) and compiled by OpenVINO's
CPU plugin, in one of two precisions (:data:`PRECISIONS`):

* ``f32`` (the default): float32 throughout (``INFERENCE_PRECISION_HINT=f32``; OpenVINO would
  otherwise pick bf16 on a CPU with AMX). The same descriptors as eager PyTorch within
  :data:`~deepfeat.backends.tolerance.F32`.
* ``bf16`` (opt-in, ``--precision bf16``): bfloat16 matrix products where the CPU has them (AMX
  or AVX512_BF16); descriptors within :data:`~deepfeat.backends.tolerance.BF16` of float32.

Shapes (figures: docs/benchmarks.md, "OpenVINO and bf16"). ``dynamic`` (aspect-preserving policies,
``--scales``): one export with dynamic batch, height and width, read into OpenVINO once and compiled
with dynamic shapes, which runs any input. A compilation for one exact input shape (the same model
reshaped: no new export) runs faster but takes time to compile, so compiling every new shape
loses on a collection of many shapes. A shape therefore runs on
the dynamic compilation until the time it has lost there reaches the cost of a compilation (rent or
buy: :meth:`CompiledGraphs._wants_compile`, both measured as the run goes), then on its own; at most
:data:`MAX_COMPILED_SHAPES` holding at most :data:`MAX_COMPILED_PIXELS` input pixels are kept (least
recently used out); OpenVINO's kernel cache per input shape is off from :data:`RUNTIME_CACHE_OFF_PIXELS`
(``long:768`` up), where it grew the memory with every new shape (docs/benchmarks.md, "At long:1024").
In ``bf16`` the dynamic compilation is bf16 too (faster than the f32 one): that needs the graph's
arithmetic on shapes in integers (bf16 rounds an odd side above 256;
:func:`deepfeat.backends.export_ops.integer_same_padding`), and is checked at :data:`ODD_PROBE`;
where it fails, the dynamic compilation stays f32. ``static`` (one shape: ``--size model``,
``warp:``): a graph exported at that shape with a fixed batch (short batches padded with zero
images), as ONNX Runtime's static graphs.

Checks, before any descriptor is returned: the dynamic graph in f32 against eager PyTorch at a
second input shape (:func:`deepfeat.backends.onnx_runtime.dynamic_graph_agrees`; a graph with trace-time
shape constants, such as R-MAC's region grid, fails it and per-shape static exports take over, as
with ONNX Runtime); the first batch against eager PyTorch at the precision's tolerance
(:class:`OpenVinoCheckError` if not: ``--backend auto`` then falls back to ONNX Runtime); in bf16
the dynamic compilation at :data:`ODD_PROBE`; the first per-shape compilation against the dynamic one.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from deepfeat.backends.onnx_runtime import (
    MAX_STATIC_GRAPHS,
    ON_MISMATCH,
    dynamic_graph_agrees,
    dynamic_mismatch,
    dynamic_problem,
    export,  # noqa: F401 - the name tests patch to count exports (export_for calls it)
    export_for,
    run_in_batches_of,
)
from deepfeat.backends.openvino_setup import (
    PRECISIONS,
    OpenVinoCheckError,
    compare,
    compile_config,
    core,
    require,
    runtime_cache_capacity,
)
from deepfeat.errors import UsageError

log = logging.getLogger(__name__)

EXPORT_KINDS = ("static", "dynamic")
#: the first shape seen this many times gets its own compilation, which measures what one costs
#: and how much faster it runs; later shapes by the rent-or-buy rule (CompiledGraphs._wants_compile)
COMPILE_AT_SIGHT = 2
#: per-shape compilations are given up if the first one runs less than this times the dynamic one
MIN_SPEEDUP = 1.1
#: the input size a dynamic bf16 compilation is checked at (portrait: transposed): odd sides above
#: 256, which bf16 cannot represent, so float arithmetic on shapes in the graph would show
ODD_PROBE = (385, 513)
#: per-shape compilations kept at once (each holds its own weights and activation buffers) ...
MAX_COMPILED_SHAPES = 8
#: ... and at most this many input pixels (N x H x W) over all of them, the first always kept: each
#: held about 120 MB at 768 x 1024, so at ``long:1024`` two are kept, at ``long:512`` eight
#: (docs/benchmarks.md, "At long:1024")
MAX_COMPILED_PIXELS = 2 * 768 * 1024
class Compiled:
    """One compiled model and its infer request, with ONNX Runtime's ``run(None, feed)`` call
    (so :func:`~deepfeat.backends.onnx_runtime.dynamic_graph_agrees` can check it)."""

    def __init__(self, model, config: dict[str, Any]):
        self.compiled = core().compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.outputs = len(self.compiled.outputs)

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        self.request.infer({0: np.ascontiguousarray(pixels)})
        return [self.request.get_output_tensor(i).data.copy() for i in range(self.outputs)]

    def run(self, _names, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self(feed["pixels"])


def _read(fnet, shape: tuple[int, int, int], kind: str, batch_size: int | None, disk_cache=None, counter=None):
    """*fnet*'s ONNX graph read into an OpenVINO model: from the on-disk graph cache *disk_cache*, exported
    on a miss (or, without a cache, into a temporary folder); *counter* counts exports and cache hits."""
    from deepfeat.backends.export_cache import cached_graph

    write = functools.partial(export_for, fnet, shape, kind=kind, batch_size=batch_size)
    return cached_graph(disk_cache, fnet, kind, shape, batch_size, write, core().read_model, counter)[1]


class CompiledGraphs:
    """OpenVINO compilations of one FeatureNet: a dynamic one plus per-shape ones, or static exports."""

    def __init__(self, fnet, kind: str = "dynamic", threads: int | None = None, precision: str = "f32",
                 batch_size: int | None = None, compile_at: int = COMPILE_AT_SIGHT,
                 max_shapes: int = MAX_COMPILED_SHAPES, on_mismatch: str = "static",
                 max_pixels: int = MAX_COMPILED_PIXELS, disk_cache=None):
        if kind not in EXPORT_KINDS:
            raise ValueError(f"export kind {kind!r}; choose {', '.join(EXPORT_KINDS)}")
        if on_mismatch not in ON_MISMATCH:
            raise ValueError(f"on_mismatch {on_mismatch!r}; choose {', '.join(ON_MISMATCH)}")
        self.on_mismatch = on_mismatch
        if precision not in PRECISIONS:
            raise UsageError(f"--precision {precision!r} unknown; choose {', '.join(PRECISIONS)}")
        self.fnet, self.kind, self.precision = fnet, kind, precision
        self.config = compile_config(threads, precision)
        self.batch_size = batch_size if kind == "static" else None
        self.compile_at, self.max_shapes = max(1, int(compile_at)), max(0, int(max_shapes))
        self.max_pixels = int(max_pixels)
        self._model = None  # the dynamic graph, reshaped for each per-shape compilation
        self._dynamic: Compiled | None = None
        self._shapes: OrderedDict[tuple[int, ...], Compiled] = OrderedDict()  # per-shape compilations (LRU)
        self._static: OrderedDict[tuple[int, int, int], Compiled] = OrderedDict()  # static exports (LRU)
        self._seen: dict[tuple[int, ...], int] = {}  # batches of each shape run on the dynamic compilation
        self._lost: dict[tuple[int, ...], float] = {}  # seconds they lost there (the rent paid)
        self.compile_cost: float | None = None  # mean seconds of a per-shape compilation, measured
        self.speedup: float | None = None  # per-shape / dynamic compilation speed, measured on the first
        self.shape_compiles = 0
        self.checked = False  # the first batch was compared with eager PyTorch
        self.fallback_reason: str | None = None  # why the dynamic graph was given up for static exports
        self.shape_problem: str | None = None  # why per-shape compilations were turned off
        self.dynamic_precision: str | None = None  # the dynamic compilation's (f32 where bf16 failed its check)
        self.dynamic_problem: str | None = None  # why a bf16 dynamic compilation was given up
        self.exports = self.compiles = self.evictions = 0
        self.cache_hits = 0  # graphs taken from the on-disk cache (deepfeat.backends.export_cache)
        self.disk_cache = disk_cache
        self.export_seconds = self.compile_seconds = 0.0

    @property
    def export_kind(self) -> str:
        return "static" if self.kind == "static" or self.fallback_reason else "dynamic"

    def _compile(self, model, precision: str | None = None) -> Compiled:
        t0 = time.perf_counter()
        config = dict(self.config, INFERENCE_PRECISION_HINT=precision or self.precision)
        out = Compiled(model, config)
        self.compiles += 1
        self.compile_seconds += time.perf_counter() - t0
        return out

    def _export(self, shape: tuple[int, int, int], kind: str, batch_size: int | None):
        t0 = time.perf_counter()
        model = _read(self.fnet, shape, kind, batch_size, self.disk_cache, self)  # counts exports, cache hits
        dt = time.perf_counter() - t0
        self.export_seconds += dt
        log.info("exported a %s graph at input %s for OpenVINO in %.1fs", kind, shape, dt)
        return model

    def _build_dynamic(self, pixels: np.ndarray) -> None:
        """Export the dynamic graph and check it in f32 at another shape (exactness of the graph
        itself: bf16's tolerance would hide a shape constant); in bf16, compile it in bf16 too and
        check that on the batch's first image resized to :data:`ODD_PROBE` (odd sides above 256, which
        bf16 cannot represent: float shape arithmetic in the graph would show)."""
        shape = tuple(pixels.shape[1:])
        self.config["CPU_RUNTIME_CACHE_CAPACITY"] = runtime_cache_capacity(shape[0] * shape[1])
        compiled = []

        def check():
            self._model = self._export(shape, "dynamic", None)
            compiled.append(self._compile(self._model, "f32"))
            return dynamic_graph_agrees(compiled[0], self.fnet, shape)

        why = dynamic_problem(self.fnet, check)
        if why is not None:
            self._model = None
            dynamic_mismatch(why, "OpenVINO", self.on_mismatch, MAX_STATIC_GRAPHS)
            self.fallback_reason = why
            return
        f32 = compiled[0]
        self._dynamic, self.dynamic_precision = f32, "f32"
        if self.precision == "bf16":
            bf16 = self._compile(self._model)
            odd = odd_probe(pixels[0], getattr(self.fnet, "size_multiple", 1))
            ok, why = compare_all(bf16(odd), torch_outputs(self.fnet, odd), "bf16")
            if ok:
                self._dynamic, self.dynamic_precision = bf16, "bf16"
            else:
                self.dynamic_problem = why
                log.warning("the dynamic-shape bf16 compilation is not within the bf16 tolerance at input %dx%d (%s): "
                            "shapes run in f32 until they get their own bf16 compilation", *odd.shape[1:3], why)

    def _static_for(self, shape: tuple[int, int, int]) -> Compiled:
        comp = self._static.get(shape)
        if comp is not None:
            self._static.move_to_end(shape)
            return comp
        comp = self._compile(self._export(shape, "static", self.batch_size))
        self._static[shape] = comp
        if len(self._static) > MAX_STATIC_GRAPHS:
            self._static.popitem(last=False)
            self.evictions += 1
        return comp

    def _wants_compile(self, key: tuple[int, ...]) -> bool:
        """Rent or buy: compile a shape once the time its batches have lost on the dynamic compilation
        (their time there times 1 - 1/speedup) reaches what a compilation costs; the first one at its
        :data:`COMPILE_AT_SIGHT`-th sight, which measures both (both depend on the model, the
        input size and the machine's load)."""
        if self.shape_problem is not None or self.max_shapes < 1 or self._model is None:
            return False
        if self.compile_cost is None or self.speedup is None:
            return self._seen.get(key, 0) >= self.compile_at - 1
        return self._lost.get(key, 0.0) >= self.compile_cost

    def _measure_first(self, comp: Compiled, dynamic: Compiled, pixels: np.ndarray
                       ) -> tuple[bool, list[np.ndarray]]:
        """The first per-shape compilation: the same results as the dynamic one (and those results),
        and how much faster."""
        got = comp(pixels)  # the first inference of a compilation sets it up: timed apart
        t_shape, t_dynamic = [], []
        for _ in range(2):  # alternately, the faster of two each: robust to a moment of load
            t0 = time.perf_counter()
            comp(pixels)
            t_shape.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            want = dynamic(pixels)
            t_dynamic.append(time.perf_counter() - t0)
        t_shape, t_dynamic = min(t_shape), min(t_dynamic)
        self.speedup = t_dynamic / max(t_shape, 1e-9)
        ok, why = compare_all(got, want, self.precision)
        if not ok:
            self.shape_problem = why
            log.warning("a per-shape OpenVINO compilation differs from the dynamic one (%s): using the dynamic "
                        "compilation only", why)
        elif self.speedup < MIN_SPEEDUP:
            self.shape_problem = f"a per-shape compilation ran {self.speedup:.2f}x the dynamic one"
            log.info("%s: not compiling per shape", self.shape_problem)
        return ok, (got if ok else want)

    def _for_shape(self, dynamic: Compiled, pixels: np.ndarray) -> list[np.ndarray]:
        """Run on this batch shape's own compilation, made now if :meth:`_wants_compile`, else on the
        dynamic one (timed, for the rule)."""
        key = tuple(pixels.shape)
        comp = self._shapes.get(key)
        if comp is not None:
            self._shapes.move_to_end(key)
            return comp(pixels)
        if self._wants_compile(key):
            import openvino as ov

            t0 = time.perf_counter()
            self._model.reshape({0: ov.PartialShape(list(key))})
            comp = self._compile(self._model)
            dt = time.perf_counter() - t0
            n = self.shape_compiles
            self.compile_cost = dt if self.compile_cost is None else (self.compile_cost * n + dt) / (n + 1)
            self.shape_compiles += 1
            out = None
            if self.speedup is None:
                ok, out = self._measure_first(comp, dynamic, pixels)
                if not ok:
                    return out
            self._lost.pop(key, None)
            self._seen.pop(key, None)
            self._shapes[key] = comp
            while len(self._shapes) > 1 and (len(self._shapes) > self.max_shapes
                                             or sum(k[0] * k[1] * k[2] for k in self._shapes) > self.max_pixels):
                self._shapes.popitem(last=False)
                self.evictions += 1
            return comp(pixels) if out is None else out
        t0 = time.perf_counter()
        out = dynamic(pixels)
        self._seen[key] = self._seen.get(key, 0) + 1
        if self.speedup is not None:
            self._lost[key] = self._lost.get(key, 0.0) + (time.perf_counter() - t0) * (1 - 1 / self.speedup)
        return out

    def _run_batch(self, pixels: np.ndarray) -> list[np.ndarray]:
        shape = tuple(pixels.shape[1:])
        if self.kind == "dynamic" and self.fallback_reason is None:
            if self._dynamic is None:
                self._build_dynamic(pixels)
            if self._dynamic is not None:
                return self._for_shape(self._dynamic, pixels)
        return run_in_batches_of(self._static_for(shape), pixels, self.batch_size)

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        out = self._run_batch(pixels)
        if not self.checked:  # the first real batch against eager PyTorch, at the precision's tolerance
            ok, why = compare_all(out, torch_outputs(self.fnet, pixels), self.precision)
            if not ok:
                raise OpenVinoCheckError(f"OpenVINO ({self.precision}) does not give eager PyTorch's descriptors on "
                                         f"the first batch ({why})")
            self.checked = True
        return out


def torch_outputs(fnet, pixels: np.ndarray) -> list[np.ndarray]:
    """Eager PyTorch's descriptors of a uint8 ``N x H x W x C`` batch: the reference of every check."""
    import torch

    with torch.inference_mode():
        return [o.float().numpy() for o in fnet(torch.from_numpy(np.ascontiguousarray(pixels)))]


def odd_probe(image: np.ndarray, multiple: int = 1) -> np.ndarray:
    """*image* (``H x W x C``) resized (nearest) to :data:`ODD_PROBE`, in its orientation, as a batch of one;
    sides rounded down to *multiple* (a transformer's patch stride: the only sizes it takes; such sides
    are bf16 numbers anyway up to 256 patches)."""
    h, w = ODD_PROBE if image.shape[0] <= image.shape[1] else ODD_PROBE[::-1]
    m = max(1, int(multiple or 1))
    h, w = max(m, h // m * m), max(m, w // m * m)
    rows = np.linspace(0, image.shape[0] - 1, h).round().astype(int)
    cols = np.linspace(0, image.shape[1] - 1, w).round().astype(int)
    return np.ascontiguousarray(image[rows][:, cols][None])


def compare_all(got: list[np.ndarray], want: list[np.ndarray], precision: str) -> tuple[bool, str]:
    """:func:`compare` for every output (tapped layer) in turn; the first disagreement."""
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return False, f"output shape {g.shape}, expected {w.shape}"
        ok, why = compare(g, w, precision)
        if not ok:
            return False, why
    return True, ""


class OpenVinoRunner:
    """Runs a :class:`~deepfeat.backends.featurenet.FeatureNet` with OpenVINO on the CPU (``--backend openvino``).

    *export*: ``dynamic`` for many input shapes, ``static`` for one (see the module). *precision*:
    ``f32`` or ``bf16``. *threads*: OpenVINO's inference threads (None: its default, every core).
    """

    name = "openvino"

    def __init__(self, feature_net, threads: int | None = None, batch_size: int | None = None,
                 export: str = "dynamic", precision: str = "f32", on_mismatch: str = "static", disk_cache=None):  # noqa: F811
        require(precision)
        if not getattr(feature_net, "exportable", True):
            raise UsageError("--backend openvino exports a PyTorch model to ONNX; an onnx: model runs in ONNX "
                             "Runtime (--backend onnx or auto)")
        self.fnet = feature_net.eval().cpu()
        self.threads, self.precision = threads, precision
        self.graphs = CompiledGraphs(self.fnet, export, threads=threads, precision=precision, batch_size=batch_size,
                                     on_mismatch=on_mismatch, disk_cache=disk_cache)

    @property
    def export(self) -> str:
        return self.graphs.export_kind

    @property
    def export_seconds(self) -> float:
        return self.graphs.export_seconds + self.graphs.compile_seconds

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        return self.graphs.run(pixels)
