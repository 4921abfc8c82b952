"""The descriptor network: uint8 pixels -> normalise -> backbone (tapped) -> pool.

:class:`FeatureNet` is one ``nn.Module`` holding the whole computation from a uint8
``N x H x W x C`` batch to one pooled ``N x D`` descriptor per tapped layer, over one
or several scales. Because normalisation, the taps (which stop the forward pass at
the last tapped layer) and the pooling are all inside it, the very same module runs
eagerly in PyTorch (:class:`TorchRunner`) or is exported to ONNX and run by ONNX
Runtime (:class:`OnnxRunner`); both backends therefore compute the same thing.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Sequence

import numpy as np
import torch

from .errors import UsageError
from .models.base import Model
from .taps import make_taps

log = logging.getLogger(__name__)

SCALE_COMBINES = ("sum", "gem")


def parse_scales(text: str | Sequence[float] | None) -> tuple[float, ...]:
    """``"1,0.707,0.5"`` -> (1.0, 0.707, 0.5); also accepts ``1/sqrt(2)``-free decimals only."""
    if text is None or text == "":
        return (1.0,)
    if isinstance(text, (list, tuple)):
        vals = [float(v) for v in text]
    else:
        try:
            vals = [float(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--scales {text!r}: give comma-separated numbers, e.g. 1,0.707,0.5") from None
    if not vals or any(not (0 < v <= 4) for v in vals):
        raise UsageError(f"--scales {text!r}: every scale must be in (0, 4]")
    return tuple(vals)


class FeatureNet(torch.nn.Module):
    """uint8 batch -> tuple of pooled descriptors, one per layer.

    Multi-scale: the normalised image is resized by each factor (bilinear, as in
    cirtorch's ``extract_ms``) and the pooled vectors of all scales are combined by
    :func:`deepfeat.pooling.combine_scales` (sum, or generalised mean with power p).
    """

    def __init__(self, model: Model, layers: Sequence[str], pooling, scales: Sequence[float] = (1.0,),
                 scale_combine: str = "sum", scale_p: float = 3.0):
        super().__init__()
        if scale_combine not in SCALE_COMBINES:
            raise UsageError(f"scale combination {scale_combine!r} unknown; choose {', '.join(SCALE_COMBINES)}")
        self.normalize = model.normalize
        self.net = model.net
        self.layers = list(layers)
        self.taps = make_taps(model, self.layers)
        self.exportable = getattr(model, "exportable", True)
        self.pooling = pooling
        self.scales = tuple(float(s) for s in scales)
        self.scale_combine = scale_combine
        self.scale_p = float(scale_p)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from .pooling import rescale

        x = self.normalize(pixels)
        if len(self.scales) == 1 and self.scales[0] == 1.0:
            acts = self.taps(x)
            return tuple(self.pooling(acts[name]) for name in self.layers)
        maps: list[list[torch.Tensor]] = [[] for _ in self.layers]
        for s in self.scales:
            acts = self.taps(x if s == 1.0 else rescale(x, s))
            for i, name in enumerate(self.layers):
                maps[i].append(acts[name])
        # the pooling knows how its kind combines across scales (regional sums before the final L2)
        return tuple(self.pooling.multiscale(m, mode=self.scale_combine, p=self.scale_p) for m in maps)


class TorchRunner:
    """Runs a :class:`FeatureNet` eagerly on a device."""

    name = "torch"

    def __init__(self, feature_net: FeatureNet, device: torch.device):
        self.fnet = feature_net.eval()
        self.device = device

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode():
            out = self.fnet(torch.from_numpy(pixels).to(self.device))
        return [o.float().cpu().numpy() for o in out]


class OnnxRunner:
    """Exports a :class:`FeatureNet` to ONNX per input shape and runs it with ONNX Runtime.

    Height and width are fixed per exported graph because some networks (TF 'SAME'
    padding) and poolings (R-MAC's region grid) compute shape-dependent constants at
    trace time. With *batch_size*, the batch dimension is fixed too: ONNX Runtime runs a
    fully static graph about 1.5x faster than one with a dynamic batch (measured on
    EfficientNet-Lite0, docs/benchmarks.md); smaller batches are padded with zeros
    (every image is computed independently, so padding does not change the others'
    results) and larger ones split. Without it the batch is dynamic. A graph is exported
    once per distinct input shape and cached (in memory, and on disk under *cache_dir*).
    """

    name = "onnx"

    def __init__(self, feature_net: FeatureNet, threads: int | None = None, cache_dir: str | None = None,
                 batch_size: int | None = None):
        try:
            import onnxruntime as ort  # noqa: F401
        except ImportError:
            raise UsageError("--backend onnx needs ONNX Runtime: pip install 'deepfeat[onnx]'") from None
        self.fnet = feature_net.eval().cpu()
        self.threads = threads
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self._sessions: dict[tuple[int, ...], object] = {}
        self.export_seconds = 0.0
        # a network that already runs in ONNX Runtime (an onnx: model) is not re-exported
        self._eager = None if feature_net.exportable else TorchRunner(feature_net, torch.device("cpu"))

    def _session(self, shape: tuple[int, int, int]):
        sess = self._sessions.get(shape)
        if sess is not None:
            return sess
        import onnxruntime as ort

        t0 = time.perf_counter()
        tmpdir = None
        if self.cache_dir:
            os.makedirs(self.cache_dir, exist_ok=True)
            b = self.batch_size or "dyn"
            path = os.path.join(self.cache_dir, f"features_b{b}_{shape[0]}x{shape[1]}x{shape[2]}.onnx")
        else:
            tmpdir = tempfile.mkdtemp(prefix="deepfeat-onnx-")
            path = os.path.join(tmpdir, "features.onnx")
        export_feature_net(self.fnet, shape, path, batch_size=self.batch_size)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = int(self.threads)
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        if tmpdir:
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)
        self._sessions[shape] = sess
        self.export_seconds += time.perf_counter() - t0
        log.info("exported ONNX graph for input %s in %.1fs", shape, time.perf_counter() - t0)
        return sess

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        if self._eager is not None:
            return self._eager(pixels)
        sess = self._session(tuple(pixels.shape[1:]))
        b, n = self.batch_size, len(pixels)
        if not b or n == b:
            return list(sess.run(None, {"pixels": np.ascontiguousarray(pixels)}))
        parts = []
        for i in range(0, n, b):
            chunk = pixels[i: i + b]
            m = len(chunk)
            if m < b:
                chunk = np.concatenate([chunk, np.zeros((b - m, *chunk.shape[1:]), chunk.dtype)])
            parts.append([o[:m] for o in sess.run(None, {"pixels": np.ascontiguousarray(chunk)})])
        return [np.concatenate([p[j] for p in parts]) for j in range(len(parts[0]))]


class FallbackRunner:
    """Tries a fast runner; if it fails on its first batch (an operator the ONNX exporter
    does not support, say), says so once and uses the safe one for the whole run."""

    def __init__(self, primary, fallback):
        self.primary, self.fallback = primary, fallback
        self.active = None

    @property
    def name(self) -> str:
        return (self.active or self.primary).name

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        if self.active is not None:
            return self.active(pixels)
        try:
            out = self.primary(pixels)
            self.active = self.primary
            return out
        except Exception as e:  # noqa: BLE001 - any export/runtime failure means: use the other runner
            log.warning("%s backend unavailable for this model (%s: %s); using %s",
                        self.primary.name, type(e).__name__, str(e).splitlines()[0][:200], self.fallback.name)
            self.active = self.fallback
            return self.fallback(pixels)


def export_feature_net(fnet: FeatureNet, shape: tuple[int, int, int], path: str, opset: int = 17,
                       batch_size: int | None = None) -> None:
    """Export *fnet* for uint8 inputs of ``shape`` (H, W, C), batch *batch_size* (None: dynamic)."""
    import warnings

    h, w, c = shape
    dummy = torch.zeros(batch_size or 2, h, w, c, dtype=torch.uint8)
    names = [f"feat{i}" for i in range(len(fnet.layers))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape constants are expected
        torch.onnx.export(
            fnet,
            (dummy,),
            path,
            input_names=["pixels"],
            output_names=names,
            dynamic_axes=None if batch_size else {"pixels": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )


def pooled_dims(fnet: FeatureNet, input_hw: tuple[int, int]) -> list[int]:
    """Descriptor length per layer, from one tiny forward pass."""
    h, w = input_hw
    with torch.inference_mode():
        out = fnet(torch.zeros(1, h, w, fnet.normalize.mean.shape[1], dtype=torch.uint8,
                               device=fnet.normalize.mean.device))
    return [int(math.prod(o.shape[1:])) for o in out]
