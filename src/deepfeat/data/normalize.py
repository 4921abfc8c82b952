"""uint8 image batches to the float tensors a network expects (a torch module)."""

from __future__ import annotations

import numpy as np
import torch

from deepfeat.data.preprocess import DataConfig
from deepfeat.errors import UsageError


class Normalize(torch.nn.Module):
    """uint8 ``N x H x W x C`` (RGB or L) -> float ``N x C x H x W`` as the net expects.

    Reorders channels (RGB -> BGR for Caffe models), scales, subtracts the mean (or
    the centre crop of a mean image) and divides by std. Being a module, it is part
    of the exported ONNX graph, so decode workers only ever ship uint8 pixels.
    """

    def __init__(self, cfg: DataConfig):
        super().__init__()
        c = cfg.channels
        mean = torch.tensor(cfg.mean[:c] if len(cfg.mean) >= c else cfg.mean * c, dtype=torch.float32)
        std = torch.tensor(cfg.std[:c] if len(cfg.std) >= c else cfg.std * c, dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, c, 1, 1), persistent=False)
        self.register_buffer("inv_std", (1.0 / std).view(1, c, 1, 1), persistent=False)
        self.scale = float(cfg.scale)
        self.bgr = cfg.channel_order == "BGR"
        self.gray = cfg.channel_order == "L"
        if cfg.mean_image is not None:
            mi = torch.as_tensor(np.asarray(cfg.mean_image, dtype=np.float32))
            if mi.ndim != 3 or mi.shape[0] != c:
                raise UsageError(f"mean image must be {c} x H x W, got shape {tuple(mi.shape)}")
            self.register_buffer("mean_image", mi[None], persistent=False)
        else:
            self.mean_image = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected an N x H x W x C batch, got shape {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).float()
        if self.gray and x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if self.bgr:
            x = x.flip(1)
        x = x * self.scale
        if self.mean_image is not None:
            mh, mw = self.mean_image.shape[-2:]
            h, w = x.shape[-2:]
            if h <= mh and w <= mw:
                top, left = (mh - h) // 2, (mw - w) // 2
                x = x - self.mean_image[..., top : top + h, left : left + w]
            else:  # larger than the mean image: Caffe users fall back to its channel means
                x = x - self.mean_image.mean(dim=(2, 3), keepdim=True)
        else:
            x = x - self.mean
        return x * self.inv_std
