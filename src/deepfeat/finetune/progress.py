"""What a fine-tuning run shows while it runs: the progress bars or lines on stderr
(:class:`TrainingProgress`) and the line that sums up each epoch (:func:`epoch_line`). The
per-epoch log files are :class:`~deepfeat.finetune.rundir.RunDirectory`'s."""

from __future__ import annotations

import logging
import sys
import time

from deepfeat.finetune.state import LogEntry

log = logging.getLogger(__name__)


class TrainingProgress:
    """Progress of a run: on a terminal (``bar``) an epoch bar (epochs done, last epoch's
    loss, accuracy, validation accuracy / mAP and seconds per epoch) above a bar of the
    current pass (iterations, running loss and accuracy); otherwise (``lines``) one line
    per epoch with the same numbers plus a line every 30 s within a long pass; or nothing."""

    def __init__(self, mode: str):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode
        self.bar = None
        self.epoch_bar = None
        self.last = 0.0

    def epochs(self, total: int, done: int = 0) -> None:
        """Open the epoch bar (``bar`` mode) at *done* of *total* epochs."""
        if self.mode != "bar":
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.mode = "lines"
            return
        self.epoch_bar = tqdm(total=total, initial=done, desc="fine-tuning", unit="epoch", dynamic_ncols=True,
                              position=0, leave=True)

    def epoch_done(self, entry: LogEntry) -> None:
        if self.epoch_bar is None:
            return
        post = [f"{entry.stage}", f"loss {entry.train_loss:.4f}"]
        if entry.train_acc is not None:
            post.append(f"acc {100 * entry.train_acc:.1f}%")
        if entry.val_acc is not None:
            post.append(f"val acc {100 * entry.val_acc:.1f}%")
        if entry.val_map is not None:
            post.append(f"val mAP {100 * entry.val_map:.1f}%")
        post.append(f"{entry.seconds:.1f}s/epoch")
        self.epoch_bar.set_postfix_str(", ".join(post), refresh=False)
        self.epoch_bar.update(1)

    def start(self, total: int, desc: str) -> None:
        self.total, self.done, self.desc = total, 0, desc
        self.t0 = self.last = time.perf_counter()
        if self.mode == "bar":
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, leave=False,
                                position=1 if self.epoch_bar is not None else 0)
            except ImportError:
                self.mode = "lines"

    def update(self, loss: float | None = None, n: int = 1, acc: float | None = None) -> None:
        self.done += n
        post = ", ".join(([f"loss {loss:.4f}"] if loss is not None else [])
                         + ([f"acc {100 * acc:.1f}%"] if acc is not None else []))
        if self.bar is not None:
            self.bar.update(n)
            if post:
                self.bar.set_postfix_str(post, refresh=False)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self.last >= 30:
                self.last = now
                rate = self.done / (now - self.t0)
                eta = (self.total - self.done) / rate if rate > 0 else float("nan")
                print(f"  {self.desc}: {self.done}/{self.total}{', ' + post if post else ''}, {rate:.2f}/s, "
                      f"ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self) -> None:
        self.close()
        if self.epoch_bar is not None:
            self.epoch_bar.close()
            self.epoch_bar = None

    def line(self, text: str) -> None:
        log.info(text)
        if self.mode == "none":
            return
        if self.epoch_bar is not None:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)


def epoch_line(entry: LogEntry, total_epochs: int, snapshot: str | None = None) -> str:
    """``epoch E/N [stage], loss ..., acc ..., val ..., seconds[, snapshot FILE]``."""
    parts = [f"epoch {entry.epoch}/{total_epochs} [{entry.stage}]", f"loss {entry.train_loss:.4f}"]
    if entry.train_acc is not None:
        parts.append(f"acc {100 * entry.train_acc:.1f}%")
    if entry.gem_p is not None:
        parts.append(f"GeM p {entry.gem_p:.3f}")
    if entry.val_acc is not None:
        parts.append(f"val loss {entry.val_loss:.4f} val acc {100 * entry.val_acc:.1f}%")
    if entry.val_map is not None:
        parts.append(f"val mAP {100 * entry.val_map:.2f}%")
    parts.append(f"{entry.seconds:.0f}s")
    if snapshot:
        parts.append(f"snapshot {snapshot}")
    return ", ".join(parts)
