"""The loaded-model value every other stage works with."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from deepfeat.data.normalize import Normalize
from deepfeat.data.preprocess import DataConfig
from deepfeat.data.sources import file_sha256 as sha256_of_file


@dataclass
class Model:
    """A pretrained network plus everything needed to use it correctly.

    ``net`` takes the normalised ``N x C x H x W`` float tensor and returns the
    classifier output (``output_kind`` says whether that is logits or already
    probabilities, as with a Caffe ``Softmax`` top). ``data_config`` is how images
    must be prepared; ``normalize`` applies its pixel part to uint8 batches.
    ``classifier`` names the final classification layer (for surgery and
    fine-tuning); ``layer_aliases`` maps extra tappable names (e.g. Caffe blob names)
    to module names.
    """

    spec: str
    source: str
    arch: str
    net: torch.nn.Module
    data_config: DataConfig
    labels: list[str] | None = None
    weights_path: str | None = None
    weights_sha256: str | None = None
    classifier: str | None = None
    output_kind: str = "logits"
    extra_meta: dict[str, Any] = field(default_factory=dict)
    layer_aliases: dict[str, str] = field(default_factory=dict)
    #: for networks that are not torch modules inside (ONNX): ``tapper(layers)`` returns a
    #: callable normalised-batch -> {layer: tensor}; ``layer_lister((C, H, W))`` a LayerTable
    tapper: Any = None
    layer_lister: Any = None
    #: False when the network cannot be traced into an ONNX graph by torch (it already is one)
    exportable: bool = True

    def __post_init__(self) -> None:
        self.net.eval()
        self.normalize = Normalize(self.data_config)

    @property
    def num_classes(self) -> int | None:
        return len(self.labels) if self.labels is not None else self.extra_meta.get("num_classes")

    @property
    def device(self) -> torch.device:
        for p in self.net.parameters():
            return p.device
        for b in self.net.buffers():
            return b.device
        return torch.device("cpu")

    def to(self, device: str | torch.device) -> "Model":
        self.net.to(device)
        self.normalize.to(device)
        return self

    def meta(self) -> dict[str, Any]:
        """What identifies this model in an artefact's ``meta.json``."""
        return {
            "spec": self.spec,
            "source": self.source,
            "arch": self.arch,
            "weights": os.path.basename(self.weights_path) if self.weights_path else None,
            "weights_sha256": self.weights_sha256,
            "num_classes": self.num_classes,
            "output_kind": self.output_kind,
            "data_config": self.data_config.to_dict(),
            **self.extra_meta,
        }

    def forward_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        """Classifier output for an ``N x H x W x C`` uint8 batch."""
        return self.net(self.normalize(batch.to(self.device)))


def resolve_device(device: str | None) -> torch.device:
    """``auto`` -> cuda when available, else cpu; validates explicit choices."""
    from deepfeat.errors import UsageError

    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise UsageError(f"device {device!r} unknown; choose auto, cpu or cuda")


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    return sha256_of_file(path)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached by (path, size, mtime)."""
    st = os.stat(path)
    return _sha256_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)
