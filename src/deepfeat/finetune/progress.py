"""What a fine-tuning run reports while it runs: the progress bars or lines on stderr,
and the per-epoch log (``log.csv``, ``log.json``) of the run directory."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


class Progress:
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

    def epoch_done(self, entry: dict) -> None:
        if self.epoch_bar is None:
            return
        post = [f"{entry['stage']}", f"loss {entry['train_loss']:.4f}"]
        if entry.get("train_acc") is not None:
            post.append(f"acc {100 * entry['train_acc']:.1f}%")
        if entry.get("val_acc") is not None:
            post.append(f"val acc {100 * entry['val_acc']:.1f}%")
        if entry.get("val_map") is not None:
            post.append(f"val mAP {100 * entry['val_map']:.1f}%")
        post.append(f"{entry['seconds']:.1f}s/epoch")
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


LOG_FIELDS = ("epoch", "stage", "iters", "images", "train_loss", "train_acc", "val_loss", "val_acc", "val_map",
              "val_mp10", "lr", "seconds")


def write_log(run: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(LOG_FIELDS), extrasaction="ignore")
    w.writeheader()
    for h in history:
        w.writerow({k: ("" if h.get(k) is None else (f"{h[k]:.6g}" if isinstance(h[k], float) else h[k]))
                    for k in LOG_FIELDS})
    from deepfeat.store import atomic_write_bytes

    atomic_write_bytes(run / "log.csv", buf.getvalue().encode())
    atomic_write_bytes(run / "log.json", (json.dumps(history, indent=1) + "\n").encode())
