"""The run directory of a fine-tuning run and every file in it.

``config.json`` (and the checks of ``--resume``), the split (``classes.txt``,
``train.txt``, ``val.txt``, ``check.json``), the per-epoch log (``log.csv``,
``log.json``), the snapshots (``snapshots/epoch_NNN.pt``, format in
:mod:`deepfeat.finetune.snapshots`), ``retrieval.json``, the curves picture, and the
final artefacts that make the directory the model spec ``finetuned:RUN_DIR``
(``model.safetensors``, ``meta.json``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deepfeat import __version__
from deepfeat.errors import UsageError
from deepfeat.finetune import data as D
from deepfeat.finetune import retrieval as R
from deepfeat.finetune.config import FinetuneConfig, adopt_identity
from deepfeat.finetune.snapshots import latest_snapshot, load_snapshot, now, snapshot_path
from deepfeat.finetune.state import LogEntry

log = logging.getLogger(__name__)

LOG_FIELDS = ("epoch", "stage", "iters", "images", "train_loss", "train_acc", "val_loss", "val_acc", "val_map",
              "val_mp10", "lr", "seconds")
SPLIT_FILES = ("classes.txt", "train.txt", "val.txt", "check.json")


class RunDirectory:
    """One run's directory. :meth:`open` checks it for a new run or a resumed one and
    records when the run was created and which snapshot it resumes from."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.created: str | None = None
        self.resumed_from: str | None = None

    def __str__(self) -> str:
        return str(self.path)

    # ----------------------------------------------------------------- config.json

    def open(self, cfg: FinetuneConfig) -> tuple[FinetuneConfig, dict[str, Any] | None]:
        """Check the directory for *cfg* and write ``config.json``. Returns the run's config
        (with ``--resume``, *cfg* with the run's data, split and model settings) and the
        snapshot to continue from (None: from the beginning)."""
        snap = None
        if cfg.resume:
            if not (self.path / "config.json").is_file():
                raise UsageError(f"--resume: {self.path} is not a fine-tuning run directory (no config.json)")
            saved = json.loads((self.path / "config.json").read_text(encoding="utf-8"))["config"]
            cfg = adopt_identity(cfg, saved)
            path = self._resume_path(cfg.resume)
            if path is not None:
                snap = load_snapshot(path)
                self.resumed_from = str(path)
            else:
                log.warning("--resume: no snapshot in %s yet; starting from the beginning", self.path)
        elif (self.path / "meta.json").is_file() or latest_snapshot(self.path) is not None:
            raise UsageError(f"{self.path} already holds a fine-tuning run; continue it with --resume, or give "
                             "another -o RUN_DIR")
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "snapshots").mkdir(exist_ok=True)
        created = now()
        if (self.path / "config.json").is_file():
            created = json.loads((self.path / "config.json").read_text(encoding="utf-8")).get("created", created)
        self.created = created
        R.write_json(self.path / "config.json", {"created": created, "deepfeat_version": __version__,
                                                 "config": cfg.to_dict()})
        return cfg, snap

    def _resume_path(self, resume: str | bool) -> Path | None:
        if resume is True or resume in ("latest", "", "true"):
            return latest_snapshot(self.path)
        path = Path(str(resume))
        if not path.is_file() and (self.path / "snapshots" / str(resume)).is_file():
            path = self.path / "snapshots" / str(resume)
        return path

    # ----------------------------------------------------------------- the split

    def has_split(self) -> bool:
        return all((self.path / f).is_file() for f in SPLIT_FILES)

    def read_check(self) -> dict[str, Any]:
        return json.loads((self.path / "check.json").read_text(encoding="utf-8"))

    def read_classes(self) -> list[str]:
        return [c for c in (self.path / "classes.txt").read_text(encoding="utf-8").splitlines() if c]

    def read_split(self, name: str, root: str, n_classes: int) -> list[D.LabelledImage]:
        return D.read_split(self.path / f"{name}.txt", root, n_classes)

    def write_split(self, classes: Sequence[str], train: Sequence[D.LabelledImage], val: Sequence[D.LabelledImage],
                    check: dict[str, Any]) -> None:
        from deepfeat.store import atomic_write_bytes

        atomic_write_bytes(self.path / "classes.txt", ("\n".join(classes) + "\n").encode("utf-8"))
        D.write_split(self.path / "train.txt", train, check["root"])
        D.write_split(self.path / "val.txt", val, check["root"])
        R.write_json(self.path / "check.json", check)

    # ----------------------------------------------------------------- log, snapshots

    def write_log(self, history: Sequence[LogEntry]) -> None:
        """``log.csv`` (the :data:`LOG_FIELDS`, floats to 6 significant digits) and ``log.json``."""
        from deepfeat.store import atomic_write_bytes

        rows = [h.to_dict() for h in history]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(LOG_FIELDS), extrasaction="ignore")
        w.writeheader()
        for h in rows:
            w.writerow({k: ("" if h.get(k) is None else (f"{h[k]:.6g}" if isinstance(h[k], float) else h[k]))
                        for k in LOG_FIELDS})
        atomic_write_bytes(self.path / "log.csv", buf.getvalue().encode())
        atomic_write_bytes(self.path / "log.json", (json.dumps(rows, indent=1) + "\n").encode())

    def save_snapshot(self, snap: dict[str, Any], keep: int = 0) -> Path:
        """Write *snap* as ``snapshots/epoch_NNN.pt`` (atomically); with *keep*, only the
        last *keep* snapshots stay."""
        path = snapshot_path(self.path, int(snap["epoch"]))
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(snap, tmp)
        os.replace(tmp, path)
        if keep:
            for old in sorted((self.path / "snapshots").glob("epoch_*.pt"))[:-keep]:
                old.unlink(missing_ok=True)
        return path

    def latest_snapshot(self) -> Path | None:
        return latest_snapshot(self.path)

    # ----------------------------------------------------------------- outputs

    def read_retrieval(self) -> dict[str, Any] | None:
        return R.read_json(self.path / "retrieval.json")

    def write_retrieval(self, doc: dict[str, Any]) -> None:
        R.write_json(self.path / "retrieval.json", doc)

    def write_curves(self, history: Sequence[LogEntry], title: str) -> None:
        from deepfeat.finetune.curves import write_curves

        try:
            write_curves(self.path, [h.to_dict() for h in history], title)
        except Exception as e:  # a picture must never stop a run
            log.warning("could not draw %s: %s: %s", self.path / "curves.png", type(e).__name__, e)

    def save_weights(self, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        """``model.safetensors`` (atomically)."""
        from safetensors.torch import save_file

        path = self.path / "model.safetensors"
        tmp = path.with_name(".model.safetensors.tmp")
        save_file(sd, str(tmp), metadata=metadata)
        os.replace(tmp, path)
        return path

    def write_meta(self, meta: dict[str, Any]) -> None:
        R.write_json(self.path / "meta.json", meta)
