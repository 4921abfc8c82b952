"""``classify`` from the graph cache: the classifier exported once to ONNX, run by ONNX Runtime.

:func:`prepare` exports a model's classifier (uint8 pixels at the model's input size -> normalise ->
network -> class probabilities) into the graph cache, checks it against eager PyTorch on a seeded
random batch and writes a prepared entry (:mod:`deepfeat.backends.prepared`) with the labels; :func:`lookup`
finds that entry in a later run, which then classifies without importing PyTorch. Both runs answer
with the same graph, so a cold and a warm ``deepfeat classify`` print the same probabilities.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from deepfeat.backends import prepared
from deepfeat.backends.export_cache import FORMAT, ExportCache, _digest, library_versions
from deepfeat.backends.tolerance import F32

log = logging.getLogger(__name__)


def _key(spec: str, labels: str | None) -> dict[str, Any]:
    return prepared.key("classes", spec, {"labels": labels, "size": "model"})


class GraphClassifier:
    """What :func:`deepfeat.models.classify.classify_iter` needs of a model, served by a prepared graph."""

    device = "cpu"

    def __init__(self, entry: prepared.Prepared, runner: prepared.PreparedRunner, spec: str):
        self.entry, self.runner = entry, runner
        self.spec = spec  # as this run gives it
        self.data_config = entry.config()
        self.labels = entry.outputs.get("labels")

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities (N x classes, float32) of a uint8 N x H x W x C batch."""
        return self.runner(pixels)[0]


def lookup(spec: str, labels: str | None, cache: ExportCache | None) -> GraphClassifier | None:
    """The prepared classifier of *spec* (with the labels file *labels*), if an earlier run left one."""
    entry = prepared.load(cache, _key(spec, labels))
    runner = prepared.open_runner(entry)
    if entry is None or runner is None:
        return None
    log.info("%s classifier from the graph cache: PyTorch not needed", spec)
    return GraphClassifier(entry, runner, spec)


def _classifier_net(model):
    import torch

    class ClassifierNet(torch.nn.Module):
        """uint8 N x H x W x C -> class probabilities, as :func:`deepfeat.models.classify.probabilities`."""

        def __init__(self) -> None:
            super().__init__()
            self.normalize, self.net = model.normalize, model.net

        def forward(self, pixels):
            out = self.net(self.normalize(pixels)).float()
            out = out.flatten(1) if out.dim() > 2 else out
            return out if model.output_kind == "probs" else out.softmax(dim=-1)

    return ClassifierNet().eval()


def prepare(model, labels: str | None, cache: ExportCache | None) -> GraphClassifier | None:
    """Export *model*'s classifier into *cache*, check it against PyTorch and write its prepared
    entry; the classifier running that graph, or None (the caller classifies in PyTorch) when the
    model is not prepared (:func:`~deepfeat.backends.prepared.model_files`), the export fails or the
    graph disagrees."""
    files = prepared.model_files(model, labels)
    if cache is None or files is None or not model.exportable:
        return None
    import torch

    from deepfeat.backends.onnx_runtime import export_module, load_session

    net = _classifier_net(model.to("cpu"))
    h, w = model.data_config.input_size
    shape = (int(h), int(w), model.data_config.channels)
    gkey = {"format": FORMAT, "purpose": "classes", "network": _digest(net), "shape": list(shape), "opset": 17,
            "versions": library_versions()}

    def write(path: str) -> None:
        export_module(net, torch.zeros(2, *shape, dtype=torch.uint8), path, ["probs"],
                      {"pixels": {0: "batch"}, "probs": {0: "batch"}})

    try:
        path = cache.graph(gkey, write)
        x = np.random.default_rng(0).integers(0, 256, (2, *shape), dtype=np.uint8)
        got = load_session(path, None).run(None, {"pixels": x})[0]
        with torch.inference_mode():
            want = net(torch.from_numpy(x)).numpy()
        ok, numbers = F32.check(got, want)
    except Exception as e:  # noqa: BLE001 - an export failure leaves classify in PyTorch, as before
        log.info("classifier of %s not exported (%s: %s); classifying in PyTorch", model.spec, type(e).__name__,
                 str(e).splitlines()[0][:200] if str(e) else "")
        return None
    if not ok:
        log.warning("the exported classifier of %s differs from PyTorch (%s); classifying in PyTorch",
                    model.spec, numbers)
        return None
    entry = prepared.Prepared(
        key={}, files=prepared.stamps(files), graph=prepared.graph_entry(path, cache) or "", kind="static",
        batch_size=None, shape=list(shape), data_config=model.data_config.to_dict(), model=model.meta(),
        outputs={"labels": model.labels, "output_kind": model.output_kind}, root=str(cache.root))
    k = _key(model.spec, labels)
    prepared.save(cache, k, entry)
    entry.key = k
    runner = prepared.open_runner(entry)
    return None if runner is None else GraphClassifier(entry, runner, model.spec)
