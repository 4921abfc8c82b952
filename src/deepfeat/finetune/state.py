"""Where a fine-tuning run stands: one :class:`LogEntry` per epoch (a row of ``log.csv``, an
item of ``log.json`` and of a snapshot's ``history``) and the :class:`TrainingState` a
:class:`~deepfeat.finetune.trainer.Trainer` advances (stage, epochs done, iteration, history)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

#: the fields every entry writes, null or not; the others are written only when measured
_ALWAYS = ("epoch", "stage", "iters", "images", "train_loss", "train_acc", "lr")


@dataclass
class LogEntry:
    """One epoch's numbers. ``to_dict`` gives the keys in the order the run files have always
    had them; measurements an epoch did not make (validation every ``--val-every`` epochs,
    ``gem_p`` of a metric loss) are left out rather than written as null."""

    epoch: int
    stage: str
    iters: int
    images: int
    train_loss: float
    train_acc: float | None
    lr: float
    gem_p: float | None = None
    mine_seconds: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    val_map: float | None = None
    val_mp10: float | None = None
    seconds: float = 0.0
    #: keys of an entry read from a file that this version does not know, written back as they were
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if f.name in _ALWAYS or v is not None:
                out[f.name] = v
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LogEntry:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in known},
                   extra={k: v for k, v in d.items() if k not in known})


@dataclass
class TrainingState:
    """The trainer's state: the stage and epochs done, the iteration within the stage (what
    the learning-rate schedule is a function of), the history, and the seconds the epochs of
    a resumed run took before it was interrupted."""

    stage: str = "head"
    epoch: int = 0
    iteration: int = 0
    history: list[LogEntry] = field(default_factory=list)
    seconds_before: float = 0.0

    @property
    def best(self) -> LogEntry | None:
        """The epoch with the highest validation accuracy (the first of equals)."""
        return max((h for h in self.history if h.val_acc is not None), key=lambda h: h.val_acc, default=None)

    @property
    def last_val_acc(self) -> float | None:
        return next((h.val_acc for h in reversed(self.history) if h.val_acc is not None), None)

    def history_dicts(self) -> list[dict[str, Any]]:
        return [h.to_dict() for h in self.history]
