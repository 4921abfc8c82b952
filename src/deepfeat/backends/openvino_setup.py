"""OpenVINO on this machine: whether it is installed, the process's ``Core``, what the CPU runs
(f32, bf16 with AMX or AVX512_BF16), the compile settings, the CPU runtime cache's capacity, and the
check of a result against eager PyTorch (:mod:`deepfeat.backends.tolerance`). The compilations
themselves are :mod:`deepfeat.backends.openvino_runtime`."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from deepfeat.backends.tolerance import for_precision
from deepfeat.errors import DeepfeatError, UsageError

PRECISIONS = ("f32", "bf16")
#: OpenVINO's CPU runtime cache (``CPU_RUNTIME_CACHE_CAPACITY``: kernels kept per input shape of the
#: dynamic compilation) at OpenVINO's default capacity below RUNTIME_CACHE_OFF_PIXELS input pixels per
#: image (``long:512``: 384 x 512), off from there (``long:768``: 576 x 768, and up). Measured on 400
#: Flowers 17 photos (docs/benchmarks.md, "At long:1024"): at ``long:1024`` it grew the memory by
#: about 1-2 MB per new shape (+300 MB from 100 to 400 images; off: flat) for 7% of speed; at
#: ``long:512`` by about 0.5 MB per new shape (+137 MB) for 11%.
RUNTIME_CACHE_CAPACITY = 5000
RUNTIME_CACHE_OFF_PIXELS = 400_000


def runtime_cache_capacity(pixels: int) -> int:
    """``CPU_RUNTIME_CACHE_CAPACITY`` for a dynamic compilation fed images of about *pixels* pixels."""
    return 0 if pixels >= RUNTIME_CACHE_OFF_PIXELS else RUNTIME_CACHE_CAPACITY


class OpenVinoCheckError(DeepfeatError):
    """OpenVINO's result for a batch is not the eager PyTorch one within the precision's tolerance."""


def available() -> bool:
    """Whether the ``openvino`` package imports (the ``[openvino]`` extra)."""
    try:
        import openvino  # noqa: F401
    except Exception:  # noqa: BLE001 - missing, or a broken install: either way not usable
        return False
    return True


@functools.lru_cache(maxsize=1)
def _core():
    import openvino as ov

    return ov.Core()


def core():
    """The process's OpenVINO ``Core``."""
    return _core()


def cpu_capabilities() -> list[str]:
    return list(core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def bf16_supported() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 here (AMX or AVX512_BF16)."""
    return "BF16" in cpu_capabilities()


def require(precision: str = "f32") -> None:
    """Raise :class:`UsageError` unless OpenVINO is installed and runs *precision* on this CPU."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r} unknown; choose {', '.join(PRECISIONS)}")
    if not available():
        raise UsageError("--backend openvino (and --precision bf16) need OpenVINO: pip install 'deepfeat[openvino]'")
    if precision == "bf16" and not bf16_supported():
        raise UsageError("--precision bf16: this CPU has no bfloat16 support OpenVINO can use (it needs AMX or "
                         f"AVX512_BF16; OpenVINO reports {', '.join(cpu_capabilities())}); use --precision f32")


def compare(got: np.ndarray, want: np.ndarray, precision: str) -> tuple[bool, str]:
    """Whether *got* is *want* within *precision*'s tolerance (:mod:`deepfeat.backends.tolerance`),
    and the numbers."""
    return for_precision(precision).check(got, want)


def tolerance(precision: str) -> dict[str, float]:
    """The tolerance of *precision*, as recorded in a store's ``backend_check``."""
    return for_precision(precision).as_dict()


def compile_config(threads: int | None, precision: str) -> dict[str, Any]:
    """CPU plugin settings: the precision, *threads* inference threads, one stream, latency mode,
    threads not pinned to cores (the decode workers and other jobs share them)."""
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                           "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg
