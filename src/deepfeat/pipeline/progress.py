"""Progress of a run: a tqdm bar on a terminal, plain periodic lines otherwise, or nothing."""

from __future__ import annotations

import math
import sys
import time


class Progress:
    """A tqdm bar on a terminal, plain periodic lines otherwise, or nothing."""

    def __init__(self, total: int, done: int, mode: str = "auto", every: float = 10.0):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode, self.total, self.done, self.every = mode, total, done, every
        self.start = time.perf_counter()
        self.start_done = done
        self.last = self.start
        self.bar = None
        if mode == "bar":
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, unit="img", dynamic_ncols=True, smoothing=0.1)
            except ImportError:
                self.mode = "lines"

    def update(self, n: int, stages: dict[str, float]) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(_stage_str(stages), refresh=False)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self.last >= self.every:
                self.last = now
                print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        dt = time.perf_counter() - self.start
        rate = (self.done - self.start_done) / dt if dt > 0 else 0.0
        left = self.total - self.done
        eta = left / rate if rate > 0 else float("nan")
        return (f"{self.done}/{self.total} images, {rate:.1f} img/s, "
                f"ETA {_fmt_seconds(eta) if math.isfinite(eta) else '?'}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _stage_str(stages: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.1f}s" for k, v in stages.items())
