"""Appending to a store with another inference backend: allowed only when the descriptors agree.

A store records which backend computed its descriptors and in which precision
(``meta["inference"]``: ``torch`` with its device, ``onnx`` or ``openvino`` with the export kind;
``precision`` ``f32`` or ``bf16``). Appending (or ``--resume``) with a different one is checked
first: a few of the store's own images are extracted again with the new backend and compared
with their stored descriptors. Within the tolerance of :mod:`deepfeat.backends.tolerance`
(``F32``, ``F16_STORE`` for a float16 store, or ``BF16`` when either side is bf16), the run
goes on and the store notes both backends; otherwise it is refused with the numbers, and
nothing is written.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from deepfeat.backends.tolerance import BF16, F16_STORE, F32, agreement
from deepfeat.errors import DeepfeatError, StoreError

log = logging.getLogger(__name__)

#: images of the store compared when the backend changes
CHECK_IMAGES = 3


def active_runner(runner):
    """The runner that does the work: through (nested) fallback runners, the one in use, else the
    one that will be tried first."""
    while hasattr(runner, "primary"):
        runner = getattr(runner, "active", None) or runner.primary
    return runner


def runner_info(runner) -> dict[str, Any]:
    """What ``meta["inference"]`` records for *runner* (after it has run once)."""
    active = active_runner(runner)
    info: dict[str, Any] = {"backend": active.name, "precision": getattr(active, "precision", "f32")}
    if active.name in ("onnx", "openvino"):
        info["export"] = active.export
    elif getattr(active, "device", None) is not None:
        info["device"] = active.device.type
    if getattr(active, "multiple", None):
        info["pad_to"] = int(active.multiple)  # padded batches (deepfeat.backends.padding)
    return info


def recorded_info(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The backend a store was made with: ``meta["inference"]``, else (older stores) the last run's."""
    if meta.get("inference"):
        return dict(meta["inference"])
    last = (meta.get("last_run") or {}).get("backend")
    return {"backend": last} if last else None


def same_backend(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """Same backend, export kind, device, padding and precision (torch on CUDA may use TF32: checked
    too); a store recorded before precisions were recorded is f32."""
    keys = ("backend", "export", "device", "pad_to")
    return (a is not None and all(a.get(k) == b.get(k) for k in keys)
            and a.get("precision", "f32") == b.get("precision", "f32"))


def tolerance(recorded: dict[str, Any] | None, new: dict[str, Any], dtype: str) -> dict[str, float]:
    """The agreement asked of an append: bf16's when either side ran in bf16, else float32's
    (float16's rounding for a float16 store)."""
    if "bf16" in ((recorded or {}).get("precision"), new.get("precision")):
        return BF16.as_dict()
    return (F32 if dtype == "float32" else F16_STORE).as_dict()


def check_append(store, runner: Callable[[np.ndarray], list[np.ndarray]], layers: list[str],
                 decode: Callable[[str], np.ndarray], n: int = CHECK_IMAGES) -> dict[str, Any] | None:
    """Before new rows are added to *store* with *runner*: if the store already has rows made by
    another backend, recompute *n* of them (``decode(path)`` gives the pixels) and compare.

    Returns the comparison (recorded in the meta) or None when there was nothing to compare;
    raises :class:`StoreError` when they disagree.
    """
    ok = store.ok_items() if store.committed_shards() else None
    if ok is None or ok.num_rows == 0:
        return None
    dtype = store.meta.get("dtype", "float32")
    first = ok.slice(0, n)
    paths = first.column("path").to_pylist()
    stored = {name: first_rows(store, name, len(paths)) for name in layers}  # rows are in ok-item order
    worst_cos, worst_diff, worst_rel, checked = 1.0, 0.0, 0.0, 0
    for row, path in enumerate(paths):
        try:
            px = decode(store.resolve_path(path))
        except (DeepfeatError, OSError):
            continue  # the image is gone or changed: compare the others
        outs = runner(px[None])
        for name, o in zip(layers, outs):
            ref = stored[name][row: row + 1]
            got = o.reshape(1, -1).astype(np.float16 if dtype == "float16" else np.float32)
            cos, diff = agreement(got, ref)
            scale = float(np.abs(ref).max()) or 1.0
            worst_cos, worst_diff = min(worst_cos, cos), max(worst_diff, diff / max(1.0, scale))
            worst_rel = max(worst_rel, diff / scale)
        checked += 1
    if not checked:
        log.warning("cannot check the new backend against %s: none of its first images can be read", store.path)
        return None
    recorded = recorded_info(store.meta)
    tol = tolerance(recorded, runner_info(runner), dtype)
    result = {"images": checked, "min_cosine": round(worst_cos, 7), "max_abs_diff": float(f"{worst_diff:.3g}"),
              "max_rel_diff": float(f"{worst_rel:.3g}"), "tolerance": tol}
    if "max_rel_diff" in tol:
        bad, diff, limit = worst_rel > tol["max_rel_diff"], worst_rel, f"relative diff <= {tol['max_rel_diff']:g}"
    else:
        bad, diff, limit = worst_diff > tol["max_abs_diff"], worst_diff, f"diff <= {tol['max_abs_diff']:g}"
    if worst_cos < tol["min_cosine"] or bad:
        raise StoreError(
            f"{store.path} was made with {describe(recorded)}; this run's "
            f"{describe(runner_info(runner))} gives other descriptors for the store's own images (cosine "
            f"{worst_cos:.6f}, max {'relative' if 'max_rel_diff' in tol else 'abs'} diff {diff:.2e}; they agree at "
            f"cosine >= {tol['min_cosine']} and {limit}), so appending would mix two kinds of descriptors. Use the "
            f"store's backend (--backend {(recorded or {}).get('backend', 'torch')} --precision "
            f"{(recorded or {}).get('precision', 'f32')}) or extract into a new store.")
    return result


def first_rows(store, name: str, n: int) -> np.ndarray:
    """The first *n* stored feature rows of *name*, reading only the shards that hold them."""
    parts, have = [], 0
    for _, arr in store.features(name):
        parts.append(np.asarray(arr[: n - have], np.float32))
        have += len(parts[-1])
        if have >= n:
            break
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def guard(store, runner, layers: list[str], decode: Callable[[str], np.ndarray]) -> None:
    """Refuse (StoreError) to add rows made by *runner* to a store whose rows another backend made,
    unless they agree; see :func:`check_append`."""
    recorded = recorded_info(store.meta)
    intended = runner_info(runner)
    if same_backend(recorded, intended) or not store.committed_shards():
        return
    result = check_append(store, runner, layers, decode)
    if result is not None:
        log.info("appending with %s to a store made with %s: the descriptors agree (%s)", describe(intended),
                 describe(recorded), result)
        store.update_meta(backend_check={"recorded": recorded, "new": runner_info(runner), **result})


def record(store, runner) -> None:
    """Note in the store's meta which backend computed its rows (the first one stays ``inference``)."""
    info = runner_info(runner)
    recorded = store.meta.get("inference")
    if not recorded:
        store.update_meta(inference=info)
    elif not same_backend(recorded, info):
        also = [x for x in store.meta.get("inference_also", []) if not same_backend(x, info)]
        store.update_meta(inference_also=[*also, info])


def describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "an unrecorded backend"
    extra = ", ".join(f"{k} {v}" for k, v in info.items() if k != "backend")
    return f"backend {info['backend']}" + (f" ({extra})" if extra else "")
