"""The run directory's state: ``config.json`` (and the checks of ``--resume``), the
snapshots ``snapshots/epoch_NNN.pt`` (written, found, read, restored) and the RNG state
they carry, so that a resumed run continues exactly as the uninterrupted run would have."""

from __future__ import annotations

import json
import logging
import os
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfeat import __version__
from deepfeat.errors import ModelError, UsageError
from deepfeat.finetune import heads as H
from deepfeat.finetune import retrieval as R
from deepfeat.finetune.config import adopt_identity
from deepfeat.finetune.progress import write_log

log = logging.getLogger(__name__)

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


class SnapshotMixin:
    """:class:`~deepfeat.finetune.train.Finetuner`'s run directory and snapshots."""

    def _prepare_run_dir(self) -> dict | None:
        cfg = self.cfg
        snap = None
        if cfg.resume:
            if not (self.run / "config.json").is_file():
                raise UsageError(f"--resume: {self.run} is not a fine-tuning run directory (no config.json)")
            saved = json.loads((self.run / "config.json").read_text(encoding="utf-8"))["config"]
            adopt_identity(cfg, saved)
            if cfg.resume is True or cfg.resume in ("latest", "", "true"):
                path = latest_snapshot(self.run)
            else:
                path = Path(str(cfg.resume))
                if not path.is_file() and (self.run / "snapshots" / str(cfg.resume)).is_file():
                    path = self.run / "snapshots" / str(cfg.resume)
            if path is not None:
                snap = load_snapshot(path)
                self.resumed_from = str(path)
            else:
                log.warning("--resume: no snapshot in %s yet; starting from the beginning", self.run)
        else:
            if (self.run / "meta.json").is_file() or latest_snapshot(self.run) is not None:
                raise UsageError(f"{self.run} already holds a fine-tuning run; continue it with --resume, or give "
                                 "another -o RUN_DIR")
        self.run.mkdir(parents=True, exist_ok=True)
        (self.run / "snapshots").mkdir(exist_ok=True)
        created = now()
        if (self.run / "config.json").is_file():
            created = json.loads((self.run / "config.json").read_text(encoding="utf-8")).get("created", created)
        self.created = created
        R.write_json(self.run / "config.json", {"created": created, "deepfeat_version": __version__,
                                                "config": cfg.to_dict()})
        return snap

    def _snapshot(self, epoch: int, stage: str, opt: torch.optim.Optimizer, it: int) -> Path:
        snap = {
            "format": SNAPSHOT_FORMAT,
            "epoch": epoch,
            "stage": stage,
            "model": H.to_checkpoint({k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                                     self.head_module),
            "optimizer": opt.state_dict(),
            "scheduler": {"kind": self.cfg.schedule, "iteration": it},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "metric": self.metric.state_dict() if self.metric is not None else {},
            "rng": rng_state(),
            "history": self.history,
            "classes": list(self.classes),
            "base_model": self.cfg.model,
            "head_module": self.head_module,
            "deepfeat_version": __version__,
            "saved": now(),
        }
        path = snapshot_path(self.run, epoch)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(snap, tmp)
        os.replace(tmp, path)
        if self.cfg.keep_snapshots:
            for old in sorted((self.run / "snapshots").glob("epoch_*.pt"))[:-self.cfg.keep_snapshots]:
                old.unlink(missing_ok=True)
        return path

    def _restore(self, snap: dict) -> int:
        """Continue from *snap*: its weights, metric-learning state, RNG state and history;
        returns the number of epochs it had done."""
        if list(snap["classes"]) != list(self.classes) or snap["head_module"] != self.head_module:
            raise UsageError(f"snapshot {self.resumed_from} was made for other classes or another model; "
                             "resume it in its own run directory")
        sd = H.from_checkpoint(snap["model"], self.head_module, f"snapshot {self.resumed_from}")
        from deepfeat.models.weights import fit_state_dict

        fit_state_dict(self.net, sd, f"snapshot {self.resumed_from}")
        if self.metric is not None and snap.get("metric"):
            self.metric.load_state_dict(snap["metric"])
        set_rng_state(snap["rng"])
        start = int(snap["epoch"])
        self.history = [dict(h) for h in snap["history"]]
        self._seconds_before = sum(float(h.get("seconds") or 0) for h in self.history)
        write_log(self.run, self.history)
        self.progress.line(f"resuming from {self.resumed_from} (epoch {start} of {self.total_epochs})")
        return start
