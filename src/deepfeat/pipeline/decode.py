"""The decode workers: header probes and image decoding in worker processes (or threads).

Everything here is module level so that it pickles into spawned worker processes; a
worker's settings (size policy, data config, draft mode, pixel limit) live in ``_W``,
set by :func:`_worker_init`. :func:`make_executor` chooses inline, threads or a
:class:`~deepfeat.data.workers.SupervisedPool`, which runs :func:`decode_batch` and
:func:`probe_sizes` image by image so that a hang or a crash costs one image.
"""

from __future__ import annotations

import io
import os
import sys
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Callable, Sequence

from deepfeat.data.images import check_decode, decode_image, file_problem, open_image
from deepfeat.data.preprocess import DataConfig, SizePolicy, target_size
from deepfeat.data.sources import read_recorded
from deepfeat.data.workers import PerItem, SupervisedPool
from deepfeat.errors import DeepfeatError
from deepfeat.pipeline import faults

_W: dict[str, Any] = {}


def _worker_init(policy: SizePolicy, cfg: DataConfig, draft: bool, max_pixels: int | None,
                 in_process: bool = False) -> None:
    _W.update(policy=policy, cfg=cfg, draft=draft, max_pixels=max_pixels, in_process=in_process)
    if in_process:
        _die_with_parent()


def _die_with_parent() -> None:
    """Linux: a decode worker gets SIGKILL when its parent dies (``kill -9`` of a run),
    instead of lingering as an orphan; Ctrl-C is handled by the main process alone."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent is already gone
            os._exit(1)
    except Exception:  # best effort only
        pass


def _probe_one(path: str) -> tuple[int, int] | str:
    """Output (H, W) for *path* under the worker's policy, from the header only; or an error."""
    policy: SizePolicy = _W["policy"]
    cfg: DataConfig = _W["cfg"]
    try:
        img = open_image(path, _W["max_pixels"])
        try:
            w, h = img.size
            try:
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    w, h = h, w
            except Exception:
                pass
        finally:
            img.close()
    except DeepfeatError as e:
        return str(e)
    except Exception as e:  # anything else the header parser throws
        return f"{type(e).__name__}: {e}"
    try:
        check_decode(w, h, policy, cfg, _W["max_pixels"])
    except DeepfeatError as e:
        return str(e)
    if policy.kind == "model":
        return tuple(cfg.input_size)  # type: ignore[return-value]
    tw, th = target_size(w, h, policy, cfg)
    return th, tw


def _probe_failed(path: str, reason: str) -> str:
    return reason


def probe_sizes(paths: Sequence[str]) -> list[tuple[int, int] | str]:
    return [_probe_one(p) for p in paths]


def decode_one(item: tuple[int, str]) -> tuple[tuple, float, float]:
    """Decode one image in a worker: ((id, pixels|None, error|None, w, h, notes, source), read s, decode s),
    where *source* is the :class:`~deepfeat.data.sources.SourceRecord` of the bytes that were decoded
    (size, mtime, sha256: one read, hashed here), or None when the file could not be read."""
    item_id, path = item
    t0 = time.perf_counter()
    if _W.get("in_process"):
        faults.decode_faults(path)
    problem = file_problem(path)  # before open(): a FIFO would block it, /dev/zero never end
    if problem:
        return (item_id, None, problem, None, None, (), None), time.perf_counter() - t0, 0.0
    try:
        data, source = read_recorded(path)
    except OSError as e:
        return ((item_id, None, f"cannot read file: {e.strerror or e}", None, None, (), None),
                time.perf_counter() - t0, 0.0)
    t1 = time.perf_counter()
    try:
        if not data:
            raise_empty()
        d = decode_image(io.BytesIO(data), _W["policy"], _W["cfg"], draft=_W["draft"], max_pixels=_W["max_pixels"])
        out = (item_id, d.pixels, None, d.width, d.height, d.notes, source)
    except DeepfeatError as e:
        out = (item_id, None, str(e), None, None, (), source)
    except Exception as e:  # a decoder bug must not kill the run
        out = (item_id, None, f"{type(e).__name__}: {e}", None, None, (), source)
    return out, t1 - t0, time.perf_counter() - t1


def _decode_failed(item: tuple[int, str], reason: str) -> tuple[tuple, float, float]:
    return (item[0], None, reason, None, None, (), None), 0.0, 0.0


def _merge_decoded(results: list[tuple[tuple, float, float]]) -> tuple[list[tuple], float, float]:
    return [r[0] for r in results], sum(r[1] for r in results), sum(r[2] for r in results)


def decode_batch(items: Sequence[tuple[int, str]]) -> tuple[list[tuple], float, float]:
    """Decode a batch in a worker: [(id, pixels|None, error|None, w, h, notes, source)], read s, decode s."""
    return _merge_decoded([decode_one(it) for it in items])


# a SupervisedPool runs these image by image, so a hang or a crash costs one image, not the run
decode_batch.per_item = PerItem(decode_one, _decode_failed, _merge_decoded)  # type: ignore[attr-defined]
probe_sizes.per_item = PerItem(_probe_one, _probe_failed, list)  # type: ignore[attr-defined]


def raise_empty() -> None:
    from deepfeat.errors import ImageError

    raise ImageError("empty file (0 bytes)")


class _InlineExecutor(Executor):
    """Runs tasks in the calling thread (``--workers 0``)."""

    def __init__(self, initializer: Callable, initargs: tuple):
        initializer(*initargs)

    def submit(self, fn, *args, **kwargs):
        from concurrent.futures import Future

        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - delivered through the future
            f.set_exception(e)
        return f


def make_executor(kind: str, workers: int, initargs: tuple, timeout: float | None = None) -> Executor:
    """Decode workers: inline (0), threads, or supervised processes, where one image may take
    *timeout* seconds before its worker is killed and replaced (:mod:`deepfeat.data.workers`)."""
    if workers == 0:
        return _InlineExecutor(_worker_init, initargs)
    if kind == "threads":
        _worker_init(*initargs)
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deepfeat-decode")
    # spawn: workers are direct children of this process (so they can die with it on
    # Linux) and start clean, without the parent's torch threads or CUDA state
    return SupervisedPool(workers, _worker_init, (*initargs, True), timeout=timeout)


def _shutdown(executor: Executor, cancel: bool) -> None:
    try:
        executor.shutdown(wait=not cancel, cancel_futures=True)
    except TypeError:
        executor.shutdown(wait=not cancel)


def default_workers() -> int:
    """Decode workers: one per core (inference shares them; decoding is the CPU bottleneck)."""
    n = os.cpu_count() or 1
    return max(1, n)
