"""The sweep's descriptors: one forward pass per image gives every (layer, pooling)
descriptor (:class:`MultiPoolNet`), run over a dataset with the extraction pipeline's
decode workers and batches (:func:`compute_descriptors`)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from deepfeat.data.preprocess import parse_size_policy
from deepfeat.errors import DeepfeatError
from deepfeat.models.layouts import LayoutTaps
from deepfeat.pipeline import shard_batches
from deepfeat.pipeline.decode import decode_batch, default_workers, make_executor, probe_sizes


class MultiPoolNet(torch.nn.Module):
    """uint8 batch -> every (layer, pooling) descriptor from one forward pass (one per scale
    with *scales*, combined as :class:`deepfeat.backends.featurenet.FeatureNet` does, so that ``extract
    --scales`` reproduces them)."""

    def __init__(self, model, layers: Sequence[str], poolings: Sequence, scales: Sequence[float] = (1.0,)):
        super().__init__()
        self.normalize = model.normalize
        self.taps = LayoutTaps(model, list(layers))
        self.layers = list(layers)
        self.poolings = torch.nn.ModuleList(poolings)
        self.scales = tuple(float(s) for s in scales)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        from deepfeat.pooling import rescale

        x = self.normalize(pixels)
        if self.scales == (1.0,):
            acts = self.taps(x)
            return [p(*acts[layer]) for layer in self.layers for p in self.poolings]
        per_scale = [self.taps(rescale(x, s)) for s in self.scales]
        return [p.multiscale([a[layer][0] for a in per_scale], tokens=[a[layer][1] for a in per_scale])
                for layer in self.layers for p in self.poolings]


def compute_descriptors(paths: Sequence[str], net: MultiPoolNet, model, size: str = "model", batch_size: int = 32,
                        workers: int | None = None, draft: bool = True, device: str = "cpu",
                        crop_boxes: Sequence | None = None) -> tuple[np.ndarray, list[np.ndarray], dict[str, str]]:
    """Run *net* over *paths* with the pipeline's decoders. Returns (ok mask, one N x D array
    per output with zero rows for failed images, errors by path)."""
    from deepfeat.data.images import decode_image

    policy = parse_size_policy(size)
    n_out = len(net.layers) * len(net.poolings)
    ok = np.zeros(len(paths), dtype=bool)
    rows: list[dict[int, np.ndarray]] = [{} for _ in range(n_out)]
    errors: dict[str, str] = {}

    def run(idx: list[int], pixels: list[np.ndarray]) -> None:
        with torch.inference_mode():
            outs = net(torch.from_numpy(np.stack(pixels)).to(device))
        for j, o in enumerate(outs):
            o = o.float().cpu().numpy().reshape(len(idx), -1)
            for k, i in enumerate(idx):
                rows[j][i] = o[k]
        ok[idx] = True

    if crop_boxes is not None:  # query regions: one image at a time, cropped first
        for i, (p, box) in enumerate(zip(paths, crop_boxes)):
            try:
                run([i], [decode_image(p, policy, model.data_config, crop_box=box, draft=draft).pixels])
            except DeepfeatError as e:
                errors[p] = str(e)
    else:
        workers = default_workers() if workers is None else workers
        items = list(enumerate(paths))
        with make_executor("processes", workers, (policy, model.data_config, draft, None)) as ex:
            sizes = None
            if not policy.fixed:
                chunk = max(1, math.ceil(len(items) / max(workers, 1)))
                futs = [ex.submit(probe_sizes, list(paths[i: i + chunk])) for i in range(0, len(paths), chunk)]
                sizes = [s for f in futs for s in f.result()]
            batches, bad = shard_batches(items, policy, batch_size, sizes)
            for i, err in bad.items():
                errors[paths[i]] = err
            futures = [ex.submit(decode_batch, b) for b in batches]
            for fut in futures:
                results, _, _ = fut.result()
                good = [r for r in results if r[1] is not None]
                for r in results:
                    if r[1] is None:
                        errors[paths[r[0]]] = r[2]
                if good:
                    run([r[0] for r in good], [r[1] for r in good])
    dims = [next(iter(r.values())).shape[0] if r else 0 for r in rows]
    arrays = []
    for j in range(n_out):
        a = np.zeros((len(paths), dims[j]), np.float32)
        for i, v in rows[j].items():
            a[i] = v
        arrays.append(a)
    return ok, arrays, errors
