"""What "the same descriptor" means between backends and precisions: one definition,
used by the ONNX Runtime and OpenVINO checks and by the append check of a store.

Two descriptors (rows of N x D arrays) agree within a :class:`Tolerance` when every
row's cosine similarity is at least ``min_cosine`` and no component is further apart
than ``max_abs_diff`` (float32) or ``max_rel_diff`` times the reference's largest
component (bf16, whose rounding scales with the values). The bf16 thresholds come
from measurements against eager PyTorch float32 (docs/benchmarks.md, "OpenVINO").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Row cosine at least *min_cosine*, and an absolute or a relative component bound."""

    min_cosine: float
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None

    def check(self, got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
        """Whether *got* is *want* within this tolerance, and the numbers."""
        cos, diff = agreement(got, want)
        if self.max_rel_diff is not None:
            rel = diff / max(float(np.abs(np.asarray(want, np.float64)).max()), 1e-30)
            return cos >= self.min_cosine and rel <= self.max_rel_diff, f"cosine {cos:.6f}, max abs diff / max {rel:.3g}"
        return cos >= self.min_cosine and diff <= self.max_abs_diff, f"cosine {cos:.6f}, max abs diff {diff:.2e}"

    def as_dict(self) -> dict[str, float]:
        """As recorded in a store's ``backend_check``."""
        d = {"min_cosine": self.min_cosine}
        if self.max_rel_diff is not None:
            d["max_rel_diff"] = self.max_rel_diff
        else:
            d["max_abs_diff"] = self.max_abs_diff
        return d


#: float32 backends (eager PyTorch, ONNX Runtime, OpenVINO f32)
F32 = Tolerance(min_cosine=0.9999, max_abs_diff=1e-4)
#: a float16 store compared with float32 descriptors: float16 keeps 11 bits
F16_STORE = Tolerance(min_cosine=0.9999, max_abs_diff=2e-3)
#: a bf16 run against float32
BF16 = Tolerance(min_cosine=0.99, max_rel_diff=0.5)

COSINE_MIN = F32.min_cosine
ATOL = F32.max_abs_diff
BF16_COSINE_MIN = BF16.min_cosine
BF16_RTOL = BF16.max_rel_diff


def for_precision(precision: str) -> Tolerance:
    """The tolerance of a run in *precision* (``f32`` or ``bf16``) against float32."""
    return BF16 if precision == "bf16" else F32


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(smallest row cosine, largest absolute difference) of two N x D arrays."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN or inf (a broken graph) compare as False
        cos = (a * b).sum(1) / np.maximum(na * nb, 1e-30)
    both_zero = (na == 0) & (nb == 0)
    cos[both_zero] = 1.0
    return float(cos.min()), float(np.abs(a - b).max())


def agrees(a: np.ndarray, b: np.ndarray, cosine_min: float = COSINE_MIN, atol: float = ATOL) -> bool:
    cos, diff = agreement(a, b)
    return cos >= cosine_min and diff <= atol
