"""The snapshots of a fine-tuning run, ``snapshots/epoch_NNN.pt``: their format, finding and
reading them safely, and the RNG state they carry, so that a resumed run continues exactly
as the uninterrupted run would have. Writing them is :class:`~deepfeat.finetune.rundir.RunDirectory`'s."""

from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfeat.errors import ModelError, UsageError

SNAPSHOT_FORMAT = "deepfeat-finetune-snapshot/1"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def rng_state() -> dict[str, Any]:
    """Every global RNG state as tensors/lists, so ``torch.load(weights_only=True)`` reads it."""
    np_state = np.random.get_state()
    py = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": int(py[0]), "state": list(py[1]), "gauss": py[2]},
    }
    if torch.cuda.is_available():
        st["cuda"] = list(torch.cuda.get_rng_state_all())
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def snapshot_path(run: str | Path, epoch: int) -> Path:
    return Path(run) / "snapshots" / f"epoch_{epoch:03d}.pt"


def latest_snapshot(run: str | Path) -> Path | None:
    snaps = sorted((Path(run) / "snapshots").glob("epoch_*.pt"))
    return snaps[-1] if snaps else None


def load_snapshot(path: str | Path) -> dict[str, Any]:
    """Read a snapshot safely (``weights_only=True``) and check its format."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"snapshot not found: {p}")
    try:
        snap = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"cannot read snapshot {p}: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    if not isinstance(snap, dict) or snap.get("format") != SNAPSHOT_FORMAT:
        raise ModelError(f"{p} is not a deepfeat fine-tuning snapshot")
    return snap
