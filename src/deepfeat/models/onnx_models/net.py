"""What deepfeat sees of an ONNX graph on the torch side: :class:`OnnxNet` (the graph as a
module returning the chosen output) and :class:`OnnxTaps` (named tensors as ``N x C x H x W``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from deepfeat.models.onnx_models.graph import OnnxGraph


def _to_torch(arr: np.ndarray, device: torch.device, transpose: bool = False) -> torch.Tensor:
    if transpose and arr.ndim == 4:
        arr = arr.transpose(0, 3, 1, 2)
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype in (torch.float16, torch.float64, torch.bfloat16):
        t = t.float()
    return t.to(device)


class OnnxNet(torch.nn.Module):
    """The ONNX graph as a module: normalised ``N x C x H x W`` float tensor -> the
    chosen output, computed by ONNX Runtime on the CPU (and returned on the input's device)."""

    def __init__(self, graph: OnnxGraph, output: str):
        super().__init__()
        self.graph = graph
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _to_torch(self.graph.run(x, [self.output])[self.output], x.device)

    def extra_repr(self) -> str:
        return f"{os.path.basename(self.graph.path)}, output={self.output!r}, layout={self.graph.layout}"


class OnnxTaps:
    """Capture named tensors of an ONNX graph: ``taps(x) -> {name: tensor}`` (batch first,
    4-D tensors as ``N x C x H x W``)."""

    def __init__(self, graph: OnnxGraph, layers: Sequence[str], output: str):
        self.graph = graph
        self.requested = list(layers)
        self.layers = graph.resolve(layers, output)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        names = [n for n in self.layers if n != self.graph.input_name]
        arrays = self.graph.run(x, names) if names else {}
        out: dict[str, torch.Tensor] = {}
        for req, name in zip(self.requested, self.layers):
            if name == self.graph.input_name:
                out[req] = x.clone()
            else:
                out[req] = _to_torch(arrays[name], x.device, transpose=self.graph.transposed(name))
        return out
