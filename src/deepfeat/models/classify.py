"""Top-k classification of image files, one result (or error) per image."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from deepfeat.data.images import decode_image
from deepfeat.data.preprocess import SizePolicy
from deepfeat.errors import DeepfeatError, UsageError

if TYPE_CHECKING:  # torch is imported where a network runs, not by this module (docs/startup.md)
    import torch

    from deepfeat.models.base import Model


@dataclass
class Prediction:
    index: int
    label: str
    prob: float


@dataclass
class ClassifyResult:
    """The outcome for one input path: predictions, or an error message."""

    path: str
    predictions: list[Prediction] = field(default_factory=list)
    error: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"path": self.path, "ok": self.ok}
        if self.ok:
            d["predictions"] = [p.__dict__ for p in self.predictions]
        else:
            d["error"] = self.error
        if self.notes:
            d["notes"] = list(self.notes)
        return d


def probabilities(model: Model, output: torch.Tensor) -> torch.Tensor:
    """Class probabilities from the network output (softmax unless already probabilities)."""
    output = output.float().flatten(1) if output.dim() > 2 else output.float()
    return output if model.output_kind == "probs" else output.softmax(dim=-1)


def topk(model: Model, probs, k: int) -> list[list[Prediction]]:
    """The *k* most probable classes of each row of *probs* (a tensor or an array), best first
    (ties: the lower class index first)."""
    probs = np.asarray(probs.numpy() if hasattr(probs, "numpy") else probs, dtype=np.float32)
    k = min(k, probs.shape[-1])
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    labels = model.labels
    return [[Prediction(int(i), labels[i] if labels and i < len(labels) else f"class {i}", float(row[i]))
             for i in i_row] for row, i_row in zip(probs, idx)]


def torch_predict(model: Model) -> Callable[[np.ndarray], Any]:
    """Class probabilities of a uint8 N x H x W x C batch, by *model* in eager PyTorch."""
    import torch

    def predict(pixels: np.ndarray):
        with torch.inference_mode():
            return probabilities(model, model.forward_uint8(torch.from_numpy(pixels))).cpu()

    return predict


def _decode(path: str, model: Model) -> tuple[str, np.ndarray | None, str | None, tuple[str, ...]]:
    try:
        d = decode_image(path, SizePolicy("model"), model.data_config)
        return path, d.pixels, None, d.notes
    except DeepfeatError as e:
        return path, None, str(e), ()
    except Exception as e:  # any other decoder failure is this image's problem only
        return path, None, f"{type(e).__name__}: {e}", ()


def classify_iter(
    model: Model, paths: Sequence[str], *, k: int = 5, batch_size: int = 16, workers: int = 2,
    predict: Callable[[np.ndarray], Any] | None = None,
) -> Iterator[ClassifyResult]:
    """Yield one :class:`ClassifyResult` per path, in input order; never raises for a bad image.
    *predict* maps a uint8 batch to class probabilities (default: *model* in eager PyTorch,
    :func:`torch_predict`; ``deepfeat classify`` passes a prepared graph's, see
    :mod:`deepfeat.backends.classify_graph`); *model* gives the labels and how images are prepared."""
    predict = predict or torch_predict(model)
    if k < 1:
        raise UsageError(f"--top must be at least 1, not {k}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        decoded = pool.map(lambda p: _decode(p, model), paths)
        batch: list[tuple[str, np.ndarray, tuple[str, ...]]] = []
        pending: list[ClassifyResult] = []  # results in order, some waiting for their batch

        def flush() -> Iterable[ClassifyResult]:
            if batch:
                it = iter(topk(model, predict(np.stack([b[1] for b in batch])), k))
                for r in pending:
                    if r.ok:
                        r.predictions = next(it)
                batch.clear()
            out = list(pending)
            pending.clear()
            return out

        for path, pixels, err, notes in decoded:
            if err is not None:
                pending.append(ClassifyResult(path, error=err))
                if not batch:
                    yield from flush()
                continue
            batch.append((path, pixels, notes))
            pending.append(ClassifyResult(path, notes=notes))
            if len(batch) >= batch_size:
                yield from flush()
        yield from flush()


def classify(model: Model, paths: Sequence[str], **kw: Any) -> list[ClassifyResult]:
    """Classify image files; see :func:`classify_iter`."""
    return list(classify_iter(model, paths, **kw))


def classify_images(model: Model, images: Sequence[np.ndarray], k: int = 5) -> list[list[Prediction]]:
    """Classify already decoded and resized uint8 H x W x C arrays of the model's input size."""
    return topk(model, torch_predict(model)(np.stack(images)), k)


class Throughput:
    """Images/s over a run, for the summary line."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.count = 0

    def add(self, n: int = 1) -> None:
        self.count += n

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.start
        return self.count / dt if dt > 0 else 0.0
