"""Which descriptor of a fine-tuned network retrieves best: several, side by side, on one split.

A classifier fine-tuned to high accuracy has features that separate its classes, but
which tensor carries that to retrieval depends on where it is read: the last feature
map pooled one way or another, the head's input (the penultimate embedding the head was
trained on), the logits, or the class probabilities. :func:`compare_descriptors` runs
a model once over a list of labelled images, captures every layer the candidates need
and scores each candidate with the held-out protocol of :mod:`.retrieval`; with a base
model it does the same for the network before fine-tuning, and :func:`weight_change`
says how far each backbone unit moved.

A descriptor is ``(layer, pooling)`` as ``extract --layer --pool`` take them, plus the
``softmax`` transform of the network output (which ``extract`` does not offer; it is
measured here to show what class probabilities give).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepfeat.errors import UsageError
from deepfeat.finetune import data as D
from deepfeat.finetune import retrieval as R


@dataclass(frozen=True)
class Descriptor:
    """One candidate: *layer* pooled with *pooling* (``none`` for vectors), then *transform*."""

    name: str
    layer: str
    pooling: str
    transform: str = ""  # "" or "softmax"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "layer": self.layer, "pooling": self.pooling,
                **({"transform": self.transform} if self.transform else {})}


def candidates(model, learned_p: float | None = None) -> list[Descriptor]:
    """The descriptors worth comparing for *model*: its last feature map with GeM (p = 3,
    and the learned p when given), average (the head's input for EfficientNet/ResNet
    heads) and max pooling; the head's input as captured; the logits; the softmax."""
    from deepfeat.models.taps import OUTPUT
    from deepfeat.pipeline import default_layer

    layer = default_layer(model)
    out = [Descriptor(f"{layer} + GeM p=3", layer, "gem"),
           Descriptor(f"{layer} + average", layer, "avg"),
           Descriptor(f"{layer} + MAC", layer, "mac")]
    if learned_p is not None:
        out.insert(1, Descriptor(f"{layer} + GeM learned p={learned_p:.3g}", layer, f"gem:p={learned_p:.6g}"))
    if model.classifier:
        out.append(Descriptor(f"penultimate ({model.classifier}:in)", f"{model.classifier}:in", "none"))
    out += [Descriptor("logits", OUTPUT, "none"), Descriptor("softmax", OUTPUT, "none", "softmax")]
    return out


def describe(model, items: Sequence[D.LabelledImage], descriptors: Sequence[Descriptor], *, batch_size: int = 32,
             workers: int = 2, device: str = "cpu", data_config=None) -> tuple[dict[str, np.ndarray], list[int]]:
    """Every descriptor of every image in *items* from one pass of *model* (eval mode, no
    grad). Returns name -> ``N x D`` float32 rows and the positions of the images that
    decoded (unreadable images are left out, as in training)."""
    from deepfeat.data.normalize import Normalize
    from deepfeat.models.taps import Taps
    from deepfeat.pooling import get_pooling

    if not descriptors:
        raise UsageError("no descriptors to compute")
    dc = data_config or model.data_config
    dev = torch.device(device)
    net = model.net.to(dev).eval()
    layers = sorted({d.layer for d in descriptors})
    taps = Taps(net, layers, getattr(model, "layer_aliases", None))
    pools = {d.name: get_pooling(d.pooling).to(dev) for d in descriptors}
    normalize = Normalize(dc).to(dev)
    loader = D.BatchLoader(items, dc, workers=workers, cache=False)
    samples = [D.Sample(i, it.label, 0) for i, it in enumerate(items)]
    outs: dict[str, list[np.ndarray]] = {d.name: [] for d in descriptors}
    kept: list[int] = []
    for x, _, pos in loader.batches(samples, batch_size):
        if not len(pos):
            continue
        with torch.inference_mode():
            acts = taps(normalize(torch.from_numpy(x).to(dev)))
            for d in descriptors:
                a = acts[d.layer].float()
                if a.dim() == 4 and d.pooling.split(":")[0] == "none" and a.shape[2:] != (1, 1):
                    raise UsageError(f"{d.name}: layer {d.layer} is a spatial map; give it a pooling")
                v = pools[d.name](a).flatten(1)
                if d.transform == "softmax":
                    v = v if model.output_kind == "probs" else v.softmax(dim=1)
                outs[d.name].append(v.cpu().numpy().astype(np.float32))
        kept.extend(pos)
    return {k: (np.concatenate(v) if v else np.zeros((0, 0), np.float32)) for k, v in outs.items()}, kept


def score(desc: dict[str, np.ndarray], items: Sequence[D.LabelledImage], kept: Sequence[int],
          classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Retrieval summary (mAP, mP@k) of each descriptor matrix, every image a query."""
    labels = [items[i].label for i in kept]
    paths = [items[i].path for i in kept]
    return {name: R.summary(R.evaluate_descriptors(x, labels, paths, classes)) for name, x in desc.items()}


def weight_change(base_net: torch.nn.Module, net: torch.nn.Module, units: Sequence[str]) -> dict[str, float]:
    """Relative change ``||W - W0|| / ||W0||`` of each unit's parameters (all of them,
    flattened together) between the base network and the fine-tuned one."""
    out = {}
    for u in units:
        a = dict(base_net.get_submodule(u).named_parameters())
        b = dict(net.get_submodule(u).named_parameters())
        num = den = 0.0
        for k, w0 in a.items():
            if k in b and b[k].shape == w0.shape:
                num += float((b[k].detach().float().cpu() - w0.detach().float().cpu()).pow(2).sum())
                den += float(w0.detach().float().pow(2).sum())
        out[u] = (num ** 0.5) / max(den ** 0.5, 1e-12)
    return out


def compare_run(run_dir: str, split: str = "val", *, batch_size: int = 32, workers: int = 2,
                device: str = "cpu") -> dict[str, Any]:
    """Every candidate descriptor of the fine-tuned run and of its base model on the run's
    *split* (``val``: the held-out images), with the relative weight change per unit."""
    import json
    from pathlib import Path

    from deepfeat.finetune import heads as H
    from deepfeat.models import load_model

    run = Path(run_dir)
    meta = json.loads((run / "meta.json").read_text(encoding="utf-8"))
    root = json.loads((run / "check.json").read_text(encoding="utf-8"))["root"]
    classes = list(meta["classes"])
    items = D.read_split(run / f"{split}.txt", root, len(classes))
    ft = load_model(f"finetuned:{run}", device="cpu")
    learned = (meta.get("metric_learning") or {}).get("pooling")
    p = float(learned.split("p=")[1]) if learned and "p=" in learned else None
    descs = candidates(ft, p)
    kw = dict(batch_size=batch_size, workers=workers, device=device, data_config=ft.data_config)
    d_ft, kept = describe(ft, items, descs, **kw)
    base = load_model(meta["base_model"]["spec"], device="cpu")
    d_base, kept_b = describe(base, items, descs, **kw)  # its logits: the ImageNet classes
    after, before = score(d_ft, items, kept, classes), score(d_base, items, kept_b, classes)
    units = H.backbone_units(ft.net, meta["head"]["module"])
    return {"run": str(run), "split": split, "n_images": len(kept), "recorded": meta.get("descriptor"),
            "descriptors": [d.to_dict() for d in descs],
            "before": before, "after": after, "weight_change": weight_change(base.net, ft.net, units)}
