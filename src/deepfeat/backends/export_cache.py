"""Exported ONNX graphs kept on disk between runs, so a command does not export the same graph again.

Exporting the descriptor network (:func:`deepfeat.backends.onnx_runtime.export`) costs seconds per
graph and is the largest part of one small ``deepfeat extract`` (docs/benchmarks.md, "Start-up").
The graph depends only on the network and how it is exported, so it is cached under a key of:

* the network's weights and buffers (a SHA-256 of every tensor, names, shapes and dtypes) and its
  structure (``repr``: the architecture, the taps, the pooling's module),
* the taps, the pooling (spec and parameters), the scales and how they combine,
* the graph itself: export kind, batch size, the input shape for a ``static`` graph (which is what
  the size policy fixes) and the channels for a ``dynamic`` one, and the opset,
* the versions of the libraries that write the graph (torch, onnx, timm, deepfeat) and
  :data:`FORMAT`, raised whenever the export code changes what it writes.

Where: ``$DEEPFEAT_CACHE`` if set, else ``$XDG_CACHE_HOME/deepfeat``, else ``~/.cache/deepfeat``
(:func:`default_root`); graphs go in its ``graphs/`` folder, one folder per key holding
``graph.onnx`` (and any external-data files of a large model) and ``key.json`` (what the key is made
of, readable). Two processes may fill it at once: each exports into a private temporary folder and
renames it into place (atomic on one file system); the first rename wins, the other process drops
its copy and uses the winner's, so both succeed and run the same graph. Size: at most
:data:`DEFAULT_MAX_BYTES` (``$DEEPFEAT_CACHE_MAX_MB`` to change it); the least recently used
entries (by folder mtime, touched on every use) go first. A cache that cannot be written (read-only
home, full disk) is skipped with a warning: exporting still works, only not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_ROOT = "DEEPFEAT_CACHE"
ENV_MAX_MB = "DEEPFEAT_CACHE_MAX_MB"
#: the cache's size bound unless $DEEPFEAT_CACHE_MAX_MB says otherwise (an EfficientNet-Lite0
#: graph is about 14 MB, a ResNet-50 about 95 MB)
DEFAULT_MAX_BYTES = 2 * 1024 ** 3
#: raised whenever the export code changes the graphs it writes, so older entries are not used
FORMAT = 1
GRAPH_FILE = "graph.onnx"
KEY_FILE = "key.json"
#: descriptor lengths per network (a few bytes each), beside ``graphs/``
DIMS_DIR = "dims"
_WARNED: set[str] = set()
TMP_PREFIX = ".tmp-"
#: a temporary folder older than this is a crashed writer's and is removed by the next eviction
STALE_TMP_SECONDS = 3600.0


def default_root() -> Path:
    """``$DEEPFEAT_CACHE``, else ``$XDG_CACHE_HOME/deepfeat``, else ``~/.cache/deepfeat``."""
    if os.environ.get(ENV_ROOT):
        return Path(os.environ[ENV_ROOT]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "deepfeat"


def default_max_bytes() -> int:
    """:data:`DEFAULT_MAX_BYTES`, or ``$DEEPFEAT_CACHE_MAX_MB`` megabytes."""
    text = os.environ.get(ENV_MAX_MB)
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        mb = float(text)
    except ValueError:
        from deepfeat.errors import UsageError

        raise UsageError(f"${ENV_MAX_MB}={text!r}: give a number of megabytes") from None
    return max(0, int(mb * 1024 ** 2))


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that write an exported graph (part of every key)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("torch", "onnx", "timm", "deepfeat"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def network_digest(fnet) -> str:
    """SHA-256 of a :class:`~deepfeat.backends.featurenet.FeatureNet`'s weights and buffers (names,
    shapes, dtypes, bytes) and its structure (``repr``). Kept on *fnet* after the first call: a
    network is not changed while it runs."""
    cached = getattr(fnet, "_export_digest", None)
    if cached:
        return cached
    digest = _digest(fnet)
    fnet._export_digest = digest
    return digest


def _digest(fnet) -> str:
    import torch

    h = hashlib.sha256(repr(fnet).encode())
    tensors = list(fnet.named_parameters()) + list(fnet.named_buffers())
    for name, t in sorted(tensors, key=lambda nt: nt[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        h.update(memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def graph_key(fnet, kind: str, shape: tuple[int, int, int], batch_size: int | None, opset: int) -> dict[str, Any]:
    """What identifies one exported graph of *fnet* (see the module)."""
    pooling = fnet.pooling
    to_dict = getattr(pooling, "to_dict", None)
    return {
        "format": FORMAT,
        "network": network_digest(fnet),
        "layers": list(fnet.layers),
        "pooling": getattr(pooling, "spec", type(pooling).__name__),
        "pooling_params": to_dict() if callable(to_dict) else None,
        "scales": list(fnet.scales),
        "scale_combine": fnet.scale_combine,
        "scale_p": fnet.scale_p,
        "kind": kind,
        "batch_size": batch_size,
        # a dynamic graph serves every height and width: only its channels count
        "shape": [int(shape[2])] if kind == "dynamic" else [int(s) for s in shape],
        "opset": opset,
        "versions": library_versions(),
    }


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:40]


def _folder_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:  # removed meanwhile by another process's eviction
                pass
    return total


class ExportCache:
    """A folder of exported graphs (see the module): :meth:`graph` gives a graph's path, exporting it on a miss."""

    def __init__(self, root: str | os.PathLike | None = None, max_bytes: int | None = None):
        self.root = Path(root) if root is not None else default_root()
        self.folder = self.root / "graphs"
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        self.hits = self.misses = self.evictions = 0

    def entry(self, key: dict[str, Any]) -> Path:
        return self.folder / key_digest(key)

    def graph(self, key: dict[str, Any], write: Callable[[str], None]) -> str:
        """The path of the graph for *key*: the cached one (its use recorded for LRU), else
        ``write(path)`` exports it into a private temporary folder that is renamed into place."""
        final = self.entry(key)
        path = final / GRAPH_FILE
        if path.is_file():
            self.hits += 1
            _touch(final)
            return str(path)
        self.misses += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            write(str(tmp / GRAPH_FILE))
            (tmp / KEY_FILE).write_text(json.dumps(key, indent=2, sort_keys=True, default=str))
            self._publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; a loser's copy otherwise
        self.evict(keep=final)
        return str(path)

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename *tmp* to *final*; if another process got there first, keep its entry (the same key:
        the same graph) and drop ours."""
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / GRAPH_FILE).is_file():
                raise
            log.debug("graph %s was cached meanwhile by another process; using that one", final.name)

    def discard(self, path: str | os.PathLike) -> None:
        """Remove the entry holding *path* (a graph that failed to load)."""
        entry = Path(path).parent
        if entry.parent == self.folder:
            shutil.rmtree(entry, ignore_errors=True)

    def entries(self) -> list[tuple[float, int, Path]]:
        """(last use, bytes, folder) of every complete entry, least recently used first."""
        out = []
        if not self.folder.is_dir():
            return out
        for p in self.folder.iterdir():
            if p.name.startswith(TMP_PREFIX):
                continue
            try:
                out.append((p.stat().st_mtime, _folder_bytes(p), p))
            except OSError:  # evicted meanwhile
                continue
        return sorted(out, key=lambda e: e[0])

    def size_bytes(self) -> int:
        return sum(b for _, b, _ in self.entries())

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries until the cache holds at most ``max_bytes`` (never
        *keep*, the entry just used), and temporary folders of crashed writers; the number removed."""
        removed = 0
        now = time.time()
        for p in self.folder.glob(TMP_PREFIX + "*"):
            try:
                if now - p.stat().st_mtime > STALE_TMP_SECONDS:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass
        entries = self.entries()
        total = sum(b for _, b, _ in entries)
        for _, size, p in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and p == keep:
                continue
            shutil.rmtree(p, ignore_errors=True)
            total -= size
            removed += 1
        self.evictions += removed
        if removed:
            log.info("graph cache %s: removed %d least recently used graph(s) to stay under %.0f MB",
                     self.folder, removed, self.max_bytes / 1024 ** 2)
        return removed


def _touch(folder: Path) -> None:
    try:
        os.utime(folder)
    except OSError:  # evicted meanwhile, or a read-only cache: the graph is still usable
        pass


def cached_graph(cache: ExportCache | None, fnet, kind: str, shape: tuple[int, int, int], batch_size: int | None,
                 write: Callable[[str], None], load: Callable[[str], Any], counter=None, opset: int = 17
                 ) -> tuple[str, Any]:
    """(path, ``load(path)``) of *fnet*'s graph of *kind* for inputs of *shape*, from *cache*, written by
    ``write(path)`` on a miss; a cached graph that does not load (damaged, removed meanwhile) is dropped
    and written again, once. *counter* (the runner's graph set) gets ``exports`` or ``cache_hits`` added.
    *cache* None (no cache): exported into a temporary folder, removed once the graph is loaded."""
    if cache is None:
        tmp = tempfile.mkdtemp(prefix="deepfeat-export-")
        try:
            return cached_graph(ExportCache(tmp, max_bytes=0), fnet, kind, shape, batch_size, write, load, counter,
                                opset)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    key = graph_key(fnet, kind, shape, batch_size, opset)
    exported: list[float] = []

    def timed_write(path: str) -> None:
        t0 = time.perf_counter()
        write(path)
        exported.append(time.perf_counter() - t0)
        log.info("exported a %s graph at input %s in %.1fs", kind, shape, exported[-1])

    for attempt in (1, 2):
        exported.clear()
        path = cache.graph(key, timed_write)
        if counter is not None:
            if exported:
                counter.exports += 1
            else:
                counter.cache_hits += 1
                log.info("%s graph for input %s from the graph cache %s", kind, shape, cache.folder)
        try:
            return path, load(path)
        except Exception as e:  # any load failure of a cached file: export it again (once)
            if attempt == 2 or exported:
                raise
            log.warning("cached graph %s does not load (%s: %s); exporting it again", path, type(e).__name__,
                        str(e).splitlines()[0][:200] if str(e) else "")
            cache.discard(path)
    raise AssertionError("unreachable")


def cached_dims(cache: ExportCache | None, fnet, input_hw: tuple[int, int], compute: Callable[[], list[int]]
                ) -> list[int]:
    """The descriptor length per layer of *fnet* at *input_hw*: read from ``dims/`` of the cache
    when an earlier run wrote it there, else ``compute()`` (a forward pass) and written for the next
    run. Keyed like a graph (the network's weights and structure, taps, pooling, scales, versions),
    hashed afresh here: the digest is not kept on *fnet*, which may still change (a pooling fitted
    later). Nothing is cached without a cache; a file that cannot be read or written is ignored."""
    if cache is None:
        return compute()
    pooling = fnet.pooling
    to_dict = getattr(pooling, "to_dict", None)
    key = {"format": FORMAT, "network": _digest(fnet), "layers": list(fnet.layers),
           "pooling": getattr(pooling, "spec", type(pooling).__name__),
           "pooling_params": to_dict() if callable(to_dict) else None, "scales": list(fnet.scales),
           "scale_combine": fnet.scale_combine, "scale_p": fnet.scale_p,
           "input_hw": [int(input_hw[0]), int(input_hw[1])], "versions": library_versions()}
    path = cache.root / DIMS_DIR / f"{key_digest(key)}.json"
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
        if found.get("key") == json.loads(json.dumps(key, default=str)):
            return [int(d) for d in found["dims"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    dims = compute()
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "dims": dims}, default=str), encoding="utf-8")
        os.replace(tmp, path)  # atomic: a reader sees the whole file or none
    except OSError as e:
        log.debug("descriptor dims not cached in %s: %s", path, e)
        tmp.unlink(missing_ok=True)
    return dims


def open_cache(enabled: bool = True) -> ExportCache | None:
    """The user's graph cache (:func:`default_root`), or None if *enabled* is false (``--no-cache``)
    or the folder cannot be created and written (then with a warning: exports still work)."""
    if not enabled:
        return None
    cache = ExportCache()
    try:
        cache.folder.mkdir(parents=True, exist_ok=True)
        probe = cache.folder / f"{TMP_PREFIX}probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        if str(cache.folder) not in _WARNED:  # once per process (a run opens it for dims and graphs)
            _WARNED.add(str(cache.folder))
            log.warning("graph cache %s is not writable (%s): exporting without it (set $%s to move it)",
                        cache.folder, e, ENV_ROOT)
        return None
    return cache
