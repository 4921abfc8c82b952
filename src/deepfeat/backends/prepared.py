"""Prepared networks: a later run computes descriptors or class probabilities from the graph cache
alone, without importing PyTorch or building the model.

Importing torch and timm and building the network is most of what a warm one-photo command costs
(docs/startup.md). Once a run has exported a network's graph (:mod:`deepfeat.backends.export_cache`)
and ONNX Runtime has answered with it, everything the next run needs is known: the graph, how images
are prepared (the model's :class:`~deepfeat.data.preprocess.DataConfig`), what the store's meta says
about the model, the layers, pooling and descriptor lengths (or the class labels). That is written
as one small JSON file, ``prepared/<digest>.json`` beside ``graphs/`` in the cache folder.

The key is computed without torch: what the entry is for (``descriptors``, ``classes``), the model
spec, the settings that shape the network (taps, pooling, scales, size policy, batch size, labels
file) and the versions of torch, onnx, timm and deepfeat (:func:`~deepfeat.backends.export_cache.
library_versions`) with this module's :data:`FORMAT`. The entry lists the files the model was built
from (weights, a Caffe prototxt, a labels file) with their size and modification time; a run uses the
entry only when every file still has them, like ``make`` (a re-downloaded or edited weights file
sends the run back to PyTorch, which prepares the entry again). Only models that files define
completely are prepared (:data:`SOURCES`, with a weights file); a random network, a fine-tuned run
folder, an ``onnx:`` model or a Caffe mean image are not.

Writes are atomic (a temporary file renamed into place), so two processes may prepare the same entry
at once; a damaged or unreadable entry is ignored (the run builds the network). ``--no-cache`` neither
reads nor writes entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat.backends.export_cache import GRAPH_FILE, TMP_PREFIX, ExportCache, _touch, library_versions
from deepfeat.data.preprocess import parse_size_policy
from deepfeat.errors import DeepfeatError

log = logging.getLogger(__name__)

PREPARED_DIR = "prepared"
#: raised whenever what an entry holds, or how it is read, changes
FORMAT = 1
#: model sources whose network is defined by the spec and its files alone
SOURCES = ("embedded", "timm", "torchvision", "caffe")
PURPOSES = ("descriptors", "classes")


def cpu_only(device: str | None) -> bool:
    """Whether a run asked for *device* surely runs on the CPU, decided without importing torch:
    ``cpu``, or ``auto`` on a machine without a GPU device node (CUDA, ROCm, WSL) and not macOS (MPS)."""
    device = (device or "auto").lower()
    if device == "cpu":
        return True
    if device != "auto":
        return False
    if "torch" in sys.modules:
        import torch

        return not torch.cuda.is_available()
    gpu_nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
    return sys.platform.startswith("linux") and not any(os.path.exists(p) for p in gpu_nodes)


def key(purpose: str, spec: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What identifies one prepared entry (see the module); the files named in *spec* and a ``labels``
    setting by their absolute paths, so the same relative spec typed in another folder is another key."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose {purpose!r}; choose {', '.join(PURPOSES)}")
    if settings.get("labels"):
        settings = {**settings, "labels": os.path.abspath(settings["labels"])}
    return {"format": FORMAT, "purpose": purpose, "spec": absolute_spec(spec), "settings": settings,
            "versions": library_versions()}


def absolute_spec(spec: str) -> str:
    """*spec* with every part that names an existing file (between ``:``, ``@`` and ``,``) made absolute."""
    parts = re.split(r"([:@,])", spec)
    return "".join(os.path.abspath(p) if p not in ":@," and p and os.path.isfile(p) else p for p in parts)


def descriptor_settings(layers, pooling: str, scales, scale_combine: str, size: str, **extra: Any) -> dict[str, Any]:
    """The settings part of a descriptor entry's key (the size policy in its canonical form)."""
    return {"layers": list(layers), "pooling": pooling, "scales": [float(s) for s in scales],
            "scale_combine": scale_combine, "size": str(parse_size_policy(size)), **extra}


def resolved_key(spec: str, recipe: dict[str, Any]) -> dict[str, Any]:
    """The key a store's descriptors are prepared under, from its meta (or descriptor recipe)."""
    return key("descriptors", spec, descriptor_settings(
        recipe["layers"], recipe["pooling"], recipe.get("scales", [1.0]), recipe.get("scale_combine", "sum"),
        recipe.get("size", "model"), resolved=True))


def digest(k: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(k, sort_keys=True, default=str).encode()).hexdigest()[:40]


def model_files(model, labels: str | None = None) -> list[str] | None:
    """The files that define *model* (its weights, files named in its spec, the labels file), or None
    when the model is not defined by files alone and so is never prepared."""
    if model.source not in SOURCES or not model.weights_path or model.data_config.mean_image is not None:
        return None
    files = {os.path.abspath(model.weights_path)}
    rest = model.spec.partition(":")[2] if ":" in model.spec else ""
    for part in rest.replace("@", ":").split(":"):
        if part and os.path.isfile(part):
            files.add(os.path.abspath(part))
    if labels:
        files.add(os.path.abspath(labels))
    return sorted(files)


def stamps(paths: list[str]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append({"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _unchanged(recorded: list[dict[str, Any]]) -> str | None:
    """None if every recorded file has its recorded size and mtime, else the first that does not."""
    for s in recorded:
        try:
            st = os.stat(s["path"])
        except OSError:
            return s["path"]
        if st.st_size != s["size"] or st.st_mtime_ns != s["mtime_ns"]:
            return s["path"]
    return None


@dataclass
class Prepared:
    """One prepared entry: the graph (an entry folder of ``graphs/``), how it runs, and what the run
    records and needs (``model`` is the model's meta; ``outputs`` holds, for descriptors: ``layers``,
    ``pooling``, ``pooling_params``, ``dims``; for classes: ``labels``, ``output_kind``)."""

    key: dict[str, Any]
    files: list[dict[str, Any]]
    graph: str
    kind: str  # static | dynamic
    batch_size: int | None
    shape: list[int]  # H, W, C of a static graph; C of a dynamic one
    data_config: dict[str, Any]
    model: dict[str, Any]
    outputs: dict[str, Any] = field(default_factory=dict)
    #: where the graph cache is (set when read; not written)
    root: str = ""

    @property
    def spec(self) -> str:
        return self.key["spec"]

    def graph_path(self) -> Path:
        return Path(self.root) / "graphs" / self.graph / GRAPH_FILE

    def config(self):
        from deepfeat.data.preprocess import DataConfig

        return DataConfig.from_dict(self.data_config)


def save(cache: ExportCache | None, k: dict[str, Any], entry: Prepared) -> bool:
    """Write *entry* under *k* (atomically); False, with a debug line, if the cache cannot take it."""
    if cache is None:
        return False
    path = cache.root / PREPARED_DIR / f"{digest(k)}.json"
    data = {**asdict(entry), "key": k}
    data.pop("root", None)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, default=str), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        log.debug("prepared entry not written to %s: %s", path, e)
        tmp.unlink(missing_ok=True)
        return False
    return True


def load(cache: ExportCache | None, k: dict[str, Any]) -> Prepared | None:
    """The entry for *k*, if there is one whose files are unchanged and whose graph is still cached."""
    if cache is None:
        return None
    path = cache.root / PREPARED_DIR / f"{digest(k)}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") != json.loads(json.dumps(k, default=str)):
            return None
        entry = Prepared(**{f: data[f] for f in Prepared.__dataclass_fields__ if f != "root"}, root=str(cache.root))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("prepared entry %s not used (%s)", path, e)
        return None
    changed = _unchanged(entry.files)
    if changed is not None:
        log.info("%s changed since the graph was prepared: building the network", changed)
        return None
    if not entry.graph_path().is_file():  # evicted from the graph cache
        return None
    _touch(entry.graph_path().parent)
    return entry


def graph_entry(path: str | os.PathLike, cache: ExportCache) -> str | None:
    """The name of the ``graphs/`` entry holding the graph file *path*, if it is in *cache*."""
    p = Path(path)
    return p.parent.name if p.name == GRAPH_FILE and p.parent.parent == cache.folder else None


class PreparedRunner:
    """Runs a prepared descriptor graph in ONNX Runtime, as :class:`~deepfeat.backends.featurenet.OnnxRunner`
    runs a freshly exported one (a static graph for its one shape; a dynamic one for any, with
    shape-fixed sessions of it for shapes seen again), without a PyTorch network behind it."""

    name = "onnx"

    def __init__(self, entry: Prepared, threads: int | None = None):
        from deepfeat.backends.onnx_runtime import GraphCache

        self.entry = entry
        self.export = entry.kind
        self.export_seconds = 0.0
        self.graphs = GraphCache(None, entry.kind, threads=threads, batch_size=entry.batch_size)
        self.graphs.use_graph(str(entry.graph_path()), tuple(entry.shape))

    def __call__(self, pixels: np.ndarray) -> list[np.ndarray]:
        if self.entry.kind == "static" and list(pixels.shape[1:]) != list(self.entry.shape):
            raise DeepfeatError(f"the prepared graph of {self.entry.spec} takes {self.entry.shape[0]} x "
                                f"{self.entry.shape[1]} images, not {pixels.shape[1]} x {pixels.shape[2]}")
        return self.graphs.run(pixels)


def open_runner(entry: Prepared | None, threads: int | None = None) -> PreparedRunner | None:
    """A runner for *entry*; None (the entry dropped, with a warning) if its graph does not load."""
    if entry is None:
        return None
    try:
        return PreparedRunner(entry, threads)
    except Exception as e:  # noqa: BLE001 - a damaged graph file: the run builds the network instead
        log.warning("prepared graph %s does not load (%s: %s); building the network", entry.graph_path(),
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        import shutil

        shutil.rmtree(entry.graph_path().parent, ignore_errors=True)
        return None
