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
from typing import Sequence

import numpy as np
import torch

from deepfeat.errors import UsageError
from deepfeat.models.base import Model
from deepfeat.models.layouts import LayoutTaps

log = logging.getLogger(__name__)

SCALE_COMBINES = ("sum", "gem")


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
        #: scaled inputs are rounded to this (a transformer's patch stride: data_config.size_multiple)
        self.size_multiple = int(getattr(model.data_config, "size_multiple", 1) or 1)
        self.layers = list(layers)
        #: reads each tap by its layout (tokens, channels-last maps): maps of the spatial part + prefix tokens
        self.taps = LayoutTaps(model, self.layers)
        self.exportable = getattr(model, "exportable", True)
        #: why a dynamic-shape export of this network does not give its descriptors at other input
        #: sizes (set by the first check, :func:`deepfeat.backends.onnx_runtime.dynamic_graph_agrees`), so that
        #: the next engine does not export and check it again; None: not known to fail
        self.dynamic_problem: str | None = None
        self.pooling = pooling
        self.scales = tuple(float(s) for s in scales)
        self.scale_combine = scale_combine
        self.scale_p = float(scale_p)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from deepfeat.pooling import rescale

        x = self.normalize(pixels)
        if len(self.scales) == 1 and self.scales[0] == 1.0:
            acts = self.taps(x)
            return tuple(self.pooling(*acts[name]) for name in self.layers)
        maps: list[list[torch.Tensor]] = [[] for _ in self.layers]
        tokens: list[list[dict | None]] = [[] for _ in self.layers]
        for s in self.scales:
            acts = self.taps(x if s == 1.0 else rescale(x, s, self.size_multiple))
            for i, name in enumerate(self.layers):
                maps[i].append(acts[name][0])
                tokens[i].append(acts[name][1])
        # the pooling knows how its kind combines across scales (regional sums before the final L2)
        return tuple(self.pooling.multiscale(m, mode=self.scale_combine, p=self.scale_p, tokens=t)
                     for m, t in zip(maps, tokens))


class TorchRunner:
    """Runs a :class:`FeatureNet` on a device, under ``torch.inference_mode``.

    On CUDA the network runs in channels-last memory format (*channels_last*, the layout
    cuDNN's convolutions are fastest in, with tensor cores); on the CPU the format is left
    as it is. *compile*: ``torch.compile`` the feature network (dynamic shapes, for
    aspect-preserving policies); if compiling fails on the first batch, this says so once
    and runs eagerly. Neither was measured on a GPU in this project (none was available):
    see docs/benchmarks.md.
    """

    name = "torch"

    def __init__(self, feature_net: FeatureNet, device: torch.device, channels_last: bool = True,
                 compile: bool = False):
        self.fnet = feature_net.eval()
        self.device = torch.device(device)
        self.channels_last = bool(channels_last) and self.device.type == "cuda"
        if self.channels_last:
            self.fnet.net.to(memory_format=torch.channels_last)
        self._fn = self.fnet
        self.compiled = False
        if compile:
            self._fn = torch.compile(self.fnet, dynamic=True)
            self.compiled = True

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        x = torch.from_numpy(pixels).to(self.device, non_blocking=True)
        with torch.inference_mode():
            try:
                out = self._fn(x)
            except Exception as e:  # noqa: BLE001 - a compiler failure must not cost the run
                if not self.compiled:
                    raise
                log.warning("torch.compile failed (%s: %s); running eagerly", type(e).__name__,
                            str(e).splitlines()[0][:200] if str(e) else "")
                self._fn, self.compiled = self.fnet, False
                out = self._fn(x)
        return [o.float().cpu().numpy() for o in out]


class OnnxRunner:
    """Exports a :class:`FeatureNet` to ONNX and runs it with ONNX Runtime.

    *export* chooses the graphs (:mod:`deepfeat.backends.onnx_runtime`): ``static``, one graph per
    input shape with H and W fixed, because some networks (TF 'SAME' padding) and poolings
    (R-MAC's region grid) compute shape-dependent constants at trace time; with
    *batch_size* the batch dimension is fixed too (ONNX Runtime runs a fully static graph
    about 1.5x faster than one with a dynamic batch, docs/benchmarks.md; short batches are
    padded with zero images, which do not change the others' results). At most
    :data:`~deepfeat.backends.onnx_runtime.MAX_STATIC_GRAPHS` static graphs are kept (LRU).
    ``dynamic``: one graph with dynamic batch, height and width, for the many shapes of
    aspect-preserving and multi-scale policies; checked against PyTorch at a second shape
    after the export, and replaced by static graphs if it does not agree (*on_mismatch*
    ``static``) or refused with :class:`~deepfeat.backends.onnx_runtime.DynamicGraphError` (``raise``:
    ``--backend auto``, which then runs eager PyTorch). *disk_cache*: an
    :class:`~deepfeat.backends.export_cache.ExportCache` that keeps exported graphs between runs (None: off).
    """

    name = "onnx"

    def __init__(self, feature_net: FeatureNet, threads: int | None = None, batch_size: int | None = None,
                 export: str = "static", on_mismatch: str = "static", disk_cache=None):
        try:
            import onnxruntime as ort  # noqa: F401
        except ImportError:
            raise UsageError("--backend onnx needs ONNX Runtime: pip install 'deepfeat[onnx]'") from None
        from deepfeat.backends.onnx_runtime import GraphCache

        self.fnet = feature_net.eval().cpu()
        self.threads = threads
        self.graphs = GraphCache(self.fnet, export, threads=threads, batch_size=batch_size,
                                 on_mismatch=on_mismatch, disk_cache=disk_cache)
        # a network that already runs in ONNX Runtime (an onnx: model) is not re-exported
        self._eager = None if feature_net.exportable else TorchRunner(feature_net, torch.device("cpu"))

    @property
    def export(self) -> str:
        """The export kind in use: ``static``, ``dynamic``, or ``static`` after a failed dynamic check."""
        g = self.graphs
        return "static" if g.kind == "static" or g.fallback_reason else "dynamic"

    @property
    def export_seconds(self) -> float:
        return self.graphs.export_seconds

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        if self._eager is not None:
            return self._eager(pixels)
        return self.graphs.run(pixels)


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
    from deepfeat.backends.onnx_runtime import export

    export(fnet, shape, path, "static", batch_size, opset)


def pooled_dims(fnet: FeatureNet, input_hw: tuple[int, int]) -> list[int]:
    """Descriptor length per layer, from one tiny forward pass."""
    h, w = input_hw
    with torch.inference_mode():
        out = fnet(torch.zeros(1, h, w, fnet.normalize.mean.shape[1], dtype=torch.uint8,
                               device=fnet.normalize.mean.device))
    return [int(math.prod(o.shape[1:])) for o in out]
