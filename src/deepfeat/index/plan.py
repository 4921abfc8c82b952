"""The automatic choice of a kind and its memory model: what :meth:`Index.build` will make.

:func:`choose_kind` resolves ``auto`` by size, :func:`default_params` and the private
``_resolve_params`` turn a kind and the user's overrides into checked parameters, and
:func:`plan_index` / :func:`estimate_memory` report them with the expected memory (each
kind's memory model is its entry in :data:`~deepfeat.index.kinds.INDEX_KINDS`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.index.checks import _check_metric
from deepfeat.index.kinds import (
    FLAT_MAX_N,
    INDEX_KINDS,
    UNCOMPRESSED_MAX_BYTES,
    UNCOMPRESSED_MAX_N,
    _train_size,
    get_kind,
)


def choose_kind(n: int, d: int) -> str:
    """The concrete kind ``auto`` picks for n vectors of d dimensions.

    * ``flat`` below :data:`FLAT_MAX_N` (200k): exact, nothing to train or tune, and fast
      enough (a query scans at most 200k x d floats);
    * ``hnsw`` below :data:`UNCOMPRESSED_MAX_N` (2M) while the raw float32 vectors fit in
      :data:`UNCOMPRESSED_MAX_BYTES` (4 GiB): the fastest queries at high recall, no
      training, appends are cheap; memory is the raw vectors plus ~280 bytes per vector (M=32);
    * ``ivfpq`` beyond: ~d/4 + 8 bytes per vector instead of 4d, the only kind that
      fits tens of millions of vectors in memory, at lower recall.
    """
    if n < 0 or d < 1:
        raise UsageError(f"cannot choose an index kind for n={n}, d={d}")
    if n < FLAT_MAX_N:
        return "flat"
    if n < UNCOMPRESSED_MAX_N and 4 * n * d <= UNCOMPRESSED_MAX_BYTES:
        return "hnsw"
    return "ivfpq"


def _resolve_kind(kind: str, n: int, d: int) -> str:
    get_kind(kind)
    return choose_kind(n, d) if kind == "auto" else kind


def default_params(kind: str, n: int, d: int) -> dict[str, int]:
    """The parameters :meth:`Index.build` uses for *kind* on n x d data (``auto`` resolved first)."""
    spec = get_kind(_resolve_kind(kind, n, d))
    assert spec.defaults is not None  # every concrete kind has defaults
    return spec.defaults(n, d)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"index parameter {name} must be a positive integer, not {value!r}")
    return int(value)


def _resolve_params(kind: str, n: int, d: int, params: Mapping[str, Any]) -> dict[str, int]:
    spec = get_kind(kind)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        valid = ", ".join(spec.params) if spec.params else "none"
        raise UsageError(f"index kind {kind!r} has no parameter {', '.join(unknown)}; its parameters: {valid}")
    p = default_params(kind, n, d)
    for name, value in params.items():
        p[name] = _positive_int(name, value)
    if kind in ("ivf", "ivfpq"):
        if "train_size" not in params:  # follow a user's nlist / nbits
            p["train_size"] = _train_size(n, p["nlist"], 2 ** p.get("nbits", 0) if kind == "ivfpq" else 0)
        if p["nprobe"] > p["nlist"]:
            if "nprobe" in params:
                raise UsageError(f"nprobe ({p['nprobe']}) cannot exceed nlist ({p['nlist']})")
            p["nprobe"] = p["nlist"]
        if n and p["train_size"] > n:
            raise UsageError(f"train_size ({p['train_size']}) exceeds the number of vectors ({n})")
        if n and p["train_size"] < p["nlist"]:
            raise UsageError(
                f"{p['train_size']} training vectors cannot train nlist={p['nlist']} lists: use fewer lists "
                f"(nlist <= {p['train_size']}, ideally <= {max(1, p['train_size'] // 39)}) or kind='flat'"
            )
    if kind == "ivfpq":
        if d % p["M"]:
            raise UsageError(f"PQ sub-quantizers M={p['M']} must divide d={d}")
        if p["nbits"] > 16:
            raise UsageError(f"nbits must be between 1 and 16, not {p['nbits']}")
        if n and p["train_size"] < 2 ** p["nbits"]:
            raise UsageError(
                f"{p['train_size']} training vectors cannot train 2^{p['nbits']} PQ centroids: use a smaller nbits "
                f"(<= {int(math.log2(p['train_size']))}) or kind='flat'"
            )
    if kind == "hnsw" and p["M"] < 2:
        raise UsageError(f"HNSW M must be at least 2, not {p['M']}")
    return p


def estimate_memory(kind: str, n: int, d: int, metric: str = "ip", **params: Any) -> int:
    """Expected resident size in bytes of a *kind* index of n x d vectors (``auto`` resolved first).

    Counts what grows with n (vectors or codes, ids, HNSW links) and the trained tables
    (centroids, PQ codebooks, IVF-PQ's precomputed L2 tables); within a few percent of
    the saved file. While adding, IVF lists can briefly hold up to ~2x their codes.
    """
    _check_metric(metric)
    concrete = _resolve_kind(kind, n, d)
    p = _resolve_params(concrete, n, d, params)
    mem = INDEX_KINDS[concrete].memory
    assert mem is not None
    return int(mem(n, d, p, metric))


def _format_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if b < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TiB"  # pragma: no cover


@dataclass(frozen=True)
class IndexPlan:
    """What :meth:`Index.build` will make: concrete kind, parameters, FAISS factory, expected memory."""

    kind: str
    requested: str
    n: int
    d: int
    metric: str
    params: dict[str, int] = field(default_factory=dict)
    factory: str = ""
    memory_bytes: int = 0

    @property
    def reason(self) -> str:
        if self.requested != "auto":
            return f"{self.kind} (requested)"
        raw = 4 * self.n * self.d
        if self.kind == "flat":
            why = f"n={self.n:,} < {FLAT_MAX_N:,}: exact search"
        elif self.kind == "hnsw":
            why = (
                f"{FLAT_MAX_N:,} <= n={self.n:,} < {UNCOMPRESSED_MAX_N:,} and raw vectors {_format_bytes(raw)} <= 4 GiB"
            )
        else:
            why = f"n={self.n:,} and raw vectors {_format_bytes(raw)}: compress"
        return f"auto -> {self.kind} ({why})"

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items()) or "no parameters"
        return (
            f"{self.reason}; {self.factory}, metric={self.metric}, {params}; "
            f"expected memory {_format_bytes(self.memory_bytes)}"
        )


def plan_index(n: int, d: int, kind: str = "auto", metric: str = "ip", **params: Any) -> IndexPlan:
    """Resolve *kind* (``auto`` by size) and its parameters for n x d data, with the expected memory."""
    _check_metric(metric)
    if n < 1 or d < 1:
        raise UsageError(f"cannot plan an index for n={n}, d={d}: need at least one vector of one dimension")
    concrete = _resolve_kind(kind, n, d)
    p = _resolve_params(concrete, n, d, params)
    spec = INDEX_KINDS[concrete]
    assert spec.factory is not None and spec.memory is not None
    return IndexPlan(
        kind=concrete,
        requested=kind,
        n=n,
        d=d,
        metric=metric,
        params=p,
        factory=spec.factory(d, p),
        memory_bytes=int(spec.memory(n, d, p, metric)),
    )
