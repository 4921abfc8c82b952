"""Post-processing of pooled descriptors: L2, power law, PCA, PCA-whitening.

Everything here is numpy in, numpy out, on ``N x D`` float32 C-contiguous arrays
(rows are images). Fitted transforms are learned on one set of descriptors (a
training or "whitening" set) and applied to another, and they are saved as
self-describing ``.npz`` files: the arrays plus a JSON ``meta`` entry saying what
the file is, its dimensions, how many descriptors it was fitted on, the deepfeat
version and when it was made. Files are read with ``allow_pickle=False``.

A chain of steps is one string (see :class:`PostChain`)::

    none | step[,step...]
    step := l2 | power[:ALPHA] | sqrt | pca:DIM | pca-whiten:DIM[:shrink=S] | lw:DIM

e.g. ``l2``, ``power:0.5,l2``, ``pca:128``, ``pca-whiten:128,l2``,
``l2,pca-whiten:256:shrink=0.5,l2`` (the classic SPoC/R-MAC/CroW post-processing).

``lw:DIM`` is a whitening *learned* end to end with the network (``deepfeat finetune
--loss contrastive --whiten DIM``): an affine map ``x W^T + b`` that cannot be fitted
from descriptors alone, so it only exists in a saved chain file (the run's
``whitening.npz``). Wherever a chain is given (``extract --post``, ``postprocess
--post``), the path of a saved chain file (``.npz``) is accepted in place of a spec and
used as it is, fitted steps included: a PCA-whitening fitted on one collection (say
Paris) applied to another (Oxford), or a learned whitening.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from ..errors import FormatError, UsageError, suggest

PCA_FILE_KIND = "deepfeat.pca"
CHAIN_FILE_KIND = "deepfeat.postchain"
FORMAT_VERSION = 1
_APPLY_CHUNK = 65536  # rows per float64 block when applying a PCA


def _version() -> str:
    from .. import __version__

    return __version__


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def as_descriptors(X: Any, what: str = "descriptors") -> np.ndarray:
    """*X* as an ``N x D`` float32 C-contiguous array; a 1-D vector becomes one row."""
    if hasattr(X, "detach") and hasattr(X, "cpu"):  # a torch tensor, without importing torch
        X = X.detach().cpu().numpy()
    X = np.asarray(X)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2:
        raise UsageError(f"{what} must be an N x D array, got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise UsageError(f"{what} must be numeric, got dtype {X.dtype}")
    return np.ascontiguousarray(X, dtype=np.float32)


def l2n(X: Any, eps: float = 1e-12) -> np.ndarray:
    """Scale every row to unit L2 norm (rows with norm below *eps* are left ~zero)."""
    X = as_descriptors(X)
    norms = np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    return np.ascontiguousarray(X / np.maximum(norms, eps), dtype=np.float32)


def power_law(X: Any, alpha: float = 0.5) -> np.ndarray:
    """Signed power law ``sign(x) |x|^alpha``; ``alpha=0.5`` is the signed square root.

    Dampens bursty components (Jégou, Perronnin, Douze, Sánchez, Pérez & Schmid,
    "Aggregating local image descriptors into compact codes", TPAMI 2012). Follow it
    with ``l2`` to get unit vectors again.
    """
    if not alpha > 0:
        raise UsageError(f"power-law alpha must be > 0, got {alpha}")
    X = as_descriptors(X)
    return np.ascontiguousarray(np.sign(X) * np.abs(X) ** np.float32(alpha), dtype=np.float32)


# ---------------------------------------------------------------------------
# PCA and PCA-whitening
# ---------------------------------------------------------------------------


class PCA:
    """PCA to ``dim`` dimensions, optionally whitened, with optional shrinkage.

    ``fit`` learns the mean and the leading eigenvectors of the covariance (with
    the ``1/(n-1)`` normalisation of ``np.cov``) of a training set; ``apply`` maps
    any descriptors as ``(x - mean) @ components.T`` times ``scale``. With
    ``whiten=True`` the scale is ``lambda'^(-1/2)`` per component, so the
    whitened *training* descriptors have identity covariance (PCA-whitening as used
    for retrieval by Jégou & Chum, "Negative evidences and co-occurrences in image
    retrieval: the benefit of PCA and whitening", ECCV 2012). Shrinkage
    ``s`` in [0, 1] regularises the eigenvalues towards their mean,
    ``lambda' = (1 - s) lambda + s mean(lambda)`` over all D input dimensions (the
    covariance shrinkage of Ledoit & Wolf, 2004), so weak, noisy directions are
    amplified less; ``s=0`` is plain whitening, ``s=1`` a uniformly scaled PCA.

    >>> pca = PCA().fit(train, 128, whiten=True)
    >>> Y = pca.apply(database)
    """

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None  # (D,) float64
        self.components: np.ndarray | None = None  # (dim, D) float64, rows orthonormal
        self.eigvals: np.ndarray | None = None  # (dim,) training variance along each component
        self.scale: np.ndarray | None = None  # (dim,) multiplier after projection
        self.whiten = False
        self.shrinkage = 0.0
        self.mean_eigval = 0.0  # trace(cov) / D, the shrinkage target
        self.n_fit = 0
        self.created: str | None = None

    # -- state -----------------------------------------------------------------

    @property
    def fitted(self) -> bool:
        return self.components is not None

    @property
    def dim(self) -> int | None:
        return None if self.components is None else int(self.components.shape[0])

    @property
    def dim_in(self) -> int | None:
        return None if self.components is None else int(self.components.shape[1])

    @property
    def method(self) -> str:
        return "pca-whiten" if self.whiten else "pca"

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise UsageError("this PCA is not fitted yet: call fit(X, dim) on training descriptors first")

    # -- fit / apply -------------------------------------------------------------

    def fit(self, X: Any, dim: int, whiten: bool = False, shrinkage: float = 0.0) -> PCA:
        """Learn the mean and leading *dim* components of *X*; returns ``self``.

        Raises :class:`UsageError` if *dim* exceeds the rank of the centred data
        (at most ``min(N - 1, D)``): such extra directions would be arbitrary.
        """
        X = as_descriptors(X, "training descriptors")
        n, d = X.shape
        dim = int(dim)
        if dim < 1:
            raise UsageError(f"PCA dimension must be a positive integer, got {dim}")
        if not 0.0 <= float(shrinkage) <= 1.0:
            raise UsageError(f"PCA shrinkage must be in [0, 1], got {shrinkage}")
        if shrinkage and not whiten:
            raise UsageError("shrinkage only applies to PCA-whitening (whiten=True / pca-whiten:D:shrink=S)")
        if n < 2:
            raise UsageError(f"PCA needs at least 2 training descriptors, got {n}")
        if dim > d:
            raise UsageError(f"cannot reduce {d}-dimensional descriptors to {dim} dimensions by PCA; choose dim <= {d}")
        Xd = X.astype(np.float64)
        if not np.isfinite(Xd).all():
            raise UsageError("training descriptors contain NaN or infinite values")
        mean = Xd.mean(axis=0)
        Xc = Xd - mean
        eps = np.finfo(np.float64).eps
        if n > d:  # eigen-decomposition of the D x D covariance
            cov = (Xc.T @ Xc) / (n - 1)
            lam, vec = np.linalg.eigh(cov)
            order = np.argsort(lam)[::-1]
            lam, vec = lam[order], vec[:, order].T
            tol = max(lam[0], 0.0) * max(n, d) * eps * 10
            rank = int((lam > tol).sum()) if lam[0] > 0 else 0
            total = float(np.trace(cov))
        else:  # thin SVD of the N x D centred data (cheaper when N <= D)
            _, s, vt = np.linalg.svd(Xc, full_matrices=False)
            lam, vec = s**2 / (n - 1), vt
            tol = s[0] * max(n, d) * eps * 10 if s.size else 0.0
            rank = int((s > tol).sum()) if s.size and s[0] > 0 else 0
            total = float((Xc * Xc).sum() / (n - 1))
        if dim > rank:
            raise UsageError(
                f"PCA to {dim} dimensions needs data of rank >= {dim}, but the {n} training descriptors "
                f"({d}-D) have rank {rank} after centring (at most min(N-1, D) = {min(n - 1, d)}); "
                f"use dim <= {rank} or fit on more, more varied descriptors"
            )
        lam, vec = lam[:dim].copy(), vec[:dim].copy()
        # deterministic signs: the largest-magnitude entry of every component is positive
        flip = np.sign(vec[np.arange(dim), np.abs(vec).argmax(axis=1)])
        vec *= flip[:, None]
        self.mean, self.components, self.eigvals = mean, vec, lam
        self.whiten, self.shrinkage = bool(whiten), float(shrinkage)
        self.mean_eigval = total / d
        if whiten:
            shrunk = (1.0 - self.shrinkage) * lam + self.shrinkage * self.mean_eigval
            self.scale = 1.0 / np.sqrt(shrunk)
        else:
            self.scale = np.ones(dim)
        self.n_fit = n
        self.created = _now()
        return self

    def apply(self, X: Any) -> np.ndarray:
        """Project *X* (``N x D_in``) with the training mean and components -> ``N x dim`` float32."""
        self._require_fitted()
        X = as_descriptors(X)
        if X.shape[1] != self.dim_in:
            raise UsageError(f"this PCA was fitted on {self.dim_in}-D descriptors, got {X.shape[1]}-D ones")
        out = np.empty((X.shape[0], self.dim), dtype=np.float32)
        P = self.components.T * self.scale[None, :]  # type: ignore[union-attr,index]
        for i in range(0, X.shape[0], _APPLY_CHUNK):
            block = X[i : i + _APPLY_CHUNK].astype(np.float64) - self.mean
            out[i : i + _APPLY_CHUNK] = block @ P
        return out

    __call__ = apply

    # -- description and files -----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "dim": self.dim,
            "dim_in": self.dim_in,
            "whiten": self.whiten,
            "shrinkage": self.shrinkage,
            "fitted": self.fitted,
            "fitted_on": self.n_fit,
            "explained_variance": (
                float(self.eigvals.sum() / (self.mean_eigval * self.dim_in))
                if self.fitted and self.mean_eigval > 0 else None
            ),
            "created": self.created,
        }

    def _arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        self._require_fitted()
        return {
            prefix + "mean": self.mean,
            prefix + "components": self.components,
            prefix + "eigvals": self.eigvals,
            prefix + "scale": self.scale,
        }

    @classmethod
    def _from_arrays(cls, arrays: Any, prefix: str, info: dict[str, Any], path: str) -> PCA:
        pca = cls()
        try:
            pca.mean = np.asarray(arrays[prefix + "mean"], dtype=np.float64)
            pca.components = np.asarray(arrays[prefix + "components"], dtype=np.float64)
            pca.eigvals = np.asarray(arrays[prefix + "eigvals"], dtype=np.float64)
            pca.scale = np.asarray(arrays[prefix + "scale"], dtype=np.float64)
        except KeyError as e:
            raise FormatError(f"{path}: missing array {e.args[0]!r}; not a deepfeat PCA file or a damaged one") from None
        d, D = pca.components.shape
        if pca.mean.shape != (D,) or pca.eigvals.shape != (d,) or pca.scale.shape != (d,):
            raise FormatError(f"{path}: PCA arrays have inconsistent shapes")
        pca.whiten = bool(info.get("whiten", False))
        pca.shrinkage = float(info.get("shrinkage", 0.0))
        pca.mean_eigval = float(info.get("mean_eigval", 0.0))
        pca.n_fit = int(info.get("fitted_on", 0))
        pca.created = info.get("created")
        return pca

    def _step_meta(self) -> dict[str, Any]:
        d = self.to_dict()
        d["mean_eigval"] = self.mean_eigval
        return d

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write an ``.npz`` with the arrays and a JSON ``meta`` (kind, dims, fitted-on count, version, time).

        *extra* (JSON-serialisable: model, layer, pooling, ...) is stored under ``meta["extra"]``.
        """
        meta = {
            **self._step_meta(),
            "kind": PCA_FILE_KIND,
            "format_version": FORMAT_VERSION,
            "deepfeat_version": _version(),
            "saved": _now(),
            "extra": extra or {},
        }
        _write_npz(path, self._arrays(), meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PCA:
        arrays, meta = _read_npz(path, PCA_FILE_KIND)
        return cls._from_arrays(arrays, "", meta, str(path))

    def __repr__(self) -> str:
        if not self.fitted:
            return "PCA(unfitted)"
        shrink = f", shrinkage={self.shrinkage:g}" if self.shrinkage else ""
        return f"PCA({self.dim_in} -> {self.dim}, whiten={self.whiten}{shrink}, fitted_on={self.n_fit})"


def _write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    payload = dict(arrays)
    payload["meta"] = np.array(json.dumps(meta, sort_keys=True))
    tmp = path + ".tmp.npz"
    np.savez(tmp, **payload)
    os.replace(tmp, path)


def _read_npz(path: str | os.PathLike, kind: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable .npz file ({e})") from None
    if "meta" not in arrays:
        raise FormatError(f"{path}: no 'meta' entry; not a deepfeat {kind} file")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError as e:
        raise FormatError(f"{path}: 'meta' is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise FormatError(f"{path}: expected a {kind} file, found kind {found!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {meta.get('format_version')} is newer than this deepfeat understands "
            f"({FORMAT_VERSION}); upgrade deepfeat"
        )
    return arrays, meta


# ---------------------------------------------------------------------------
# Chains
# ---------------------------------------------------------------------------

STEP_NAMES = ("l2", "power", "sqrt", "pca", "pca-whiten", "lw")
_ALIASES = {"l2n": "l2", "pow": "power", "ssr": "sqrt", "pcaw": "pca-whiten", "pca_whiten": "pca-whiten",
            "whiten": "pca-whiten"}
CHAIN_GRAMMAR = ("none | step[,step...] with step = l2 | power[:ALPHA] | sqrt | pca:DIM | "
                 "pca-whiten:DIM[:shrink=S] | lw:DIM (learned, from a saved chain file); or the path of a "
                 "saved chain file (.npz)")


class Affine:
    """A learned linear map with bias, ``y = x W^T + b`` (``W``: dim x D): the learned
    whitening of Radenović, Tolias & Chum (TPAMI 2018; cirtorch's ``whiten`` layer),
    trained end to end by ``deepfeat finetune --whiten``. Unlike :class:`PCA` it is not
    fitted from descriptors; it is made from the trained layer's weights."""

    def __init__(self, weight: Any, bias: Any, info: dict[str, Any] | None = None) -> None:
        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise FormatError(f"a learned whitening needs a dim x D weight and a dim bias, got "
                              f"{self.weight.shape} and {self.bias.shape}")
        self.info = dict(info or {})

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim_in(self) -> int:
        return int(self.weight.shape[1])

    def apply(self, X: Any) -> np.ndarray:
        X = as_descriptors(X)
        if X.shape[1] != self.dim_in:
            raise UsageError(f"this learned whitening maps {self.dim_in}-D descriptors, got {X.shape[1]}-D ones")
        out = np.empty((X.shape[0], self.dim), dtype=np.float32)
        Wt = self.weight.T
        for i in range(0, X.shape[0], _APPLY_CHUNK):
            out[i : i + _APPLY_CHUNK] = X[i : i + _APPLY_CHUNK].astype(np.float64) @ Wt + self.bias
        return out

    def _arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {prefix + "weight": self.weight, prefix + "bias": self.bias}

    @classmethod
    def _from_arrays(cls, arrays: Any, prefix: str, info: dict[str, Any], path: str) -> Affine:
        try:
            return cls(arrays[prefix + "weight"], arrays[prefix + "bias"], info.get("learned"))
        except KeyError as e:
            raise FormatError(f"{path}: missing array {e.args[0]!r}; a damaged post-processing file") from None


@dataclass
class _Step:
    kind: str  # "l2", "power", "pca" or "lw"
    alpha: float = 0.5
    dim: int = 0
    whiten: bool = False
    shrinkage: float = 0.0
    pca: PCA | None = None
    affine: Affine | None = None

    @property
    def spec(self) -> str:
        if self.kind == "l2":
            return "l2"
        if self.kind == "power":
            return f"power:{_fmt(self.alpha)}"
        if self.kind == "lw":
            return f"lw:{self.dim}"
        name = "pca-whiten" if self.whiten else "pca"
        shrink = f":shrink={_fmt(self.shrinkage)}" if self.shrinkage else ""
        return f"{name}:{self.dim}{shrink}"

    @property
    def needs_fit(self) -> bool:
        """True for the steps that hold learned arrays (PCA, learned whitening)."""
        return self.kind in ("pca", "lw")

    @property
    def fitted(self) -> bool:
        return self.pca is not None if self.kind == "pca" else self.affine is not None if self.kind == "lw" else True

    def apply(self, X: np.ndarray) -> np.ndarray:
        if self.kind == "l2":
            return l2n(X)
        if self.kind == "power":
            return power_law(X, self.alpha)
        if self.kind == "lw":
            if self.affine is None:
                raise UsageError(f"post-processing step {self.spec!r} is learned by `deepfeat finetune --whiten`; "
                                 "load it from the run's whitening.npz")
            return self.affine.apply(X)
        if self.pca is None:
            raise UsageError(f"post-processing step {self.spec!r} is not fitted")
        return self.pca.apply(X)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"spec": self.spec, "kind": self.kind}
        if self.kind == "power":
            d["alpha"] = self.alpha
        if self.kind == "pca":
            d.update(dim=self.dim, whiten=self.whiten, shrinkage=self.shrinkage,
                     fitted=self.pca is not None)
            if self.pca is not None:
                d.update(self.pca._step_meta())
        if self.kind == "lw":
            d.update(dim=self.dim, fitted=self.affine is not None)
            if self.affine is not None:
                d.update(dim_in=self.affine.dim_in, learned=self.affine.info)
        return d


def _fmt(v: float) -> str:
    return repr(int(v)) if float(v).is_integer() else repr(float(v))


def _number(step: str, what: str, text: str, cast: type) -> Any:
    try:
        return cast(text)
    except ValueError:
        kind = "an integer" if cast is int else "a number"
        raise UsageError(f"post-processing step {step!r}: {what} must be {kind}, got {text!r}") from None


def _parse_step(text: str) -> _Step:
    raw = text.strip()
    name, *args = [p.strip() for p in raw.split(":")]
    name = _ALIASES.get(name.lower(), name.lower())
    if name not in STEP_NAMES:
        raise UsageError(
            f"unknown post-processing step {raw!r}; valid steps: {', '.join(STEP_NAMES)} "
            f"(grammar: {CHAIN_GRAMMAR}).{suggest(name, STEP_NAMES)}"
        )
    keyed: dict[str, str] = {}
    positional: list[str] = []
    for a in args:
        if "=" in a:
            k, _, v = a.partition("=")
            keyed[k.strip().lower()] = v.strip()
        elif a:
            positional.append(a)
    if name in ("l2", "sqrt"):
        if positional or keyed:
            raise UsageError(f"post-processing step {name!r} takes no arguments, got {raw!r}")
        return _Step("l2") if name == "l2" else _Step("power", alpha=0.5)
    if name == "power":
        if len(positional) > 1 or set(keyed) - {"alpha"} or (positional and keyed):
            raise UsageError(f"post-processing step {raw!r}: use power or power:ALPHA (e.g. power:0.5)")
        alpha = _number(raw, "alpha", positional[0] if positional else keyed.get("alpha", "0.5"), float)
        if not alpha > 0:
            raise UsageError(f"post-processing step {raw!r}: alpha must be > 0")
        return _Step("power", alpha=alpha)
    if name == "lw":
        if len(positional) != 1 or keyed:
            raise UsageError(f"post-processing step {raw!r}: use lw:DIM (a whitening learned by deepfeat finetune)")
        dim = _number(raw, "the dimension", positional[0], int)
        if dim < 1:
            raise UsageError(f"post-processing step {raw!r}: the dimension must be >= 1")
        return _Step("lw", dim=dim)
    # pca / pca-whiten
    if "shrinkage" in keyed:
        keyed["shrink"] = keyed.pop("shrinkage")
    unknown = set(keyed) - {"dim", "shrink"}
    if unknown or len(positional) > 1 or (positional and "dim" in keyed):
        raise UsageError(
            f"post-processing step {raw!r} not understood; use {name}:DIM"
            + (" or pca-whiten:DIM:shrink=S" if name == "pca-whiten" else "")
        )
    if not positional and "dim" not in keyed:
        raise UsageError(f"post-processing step {raw!r} needs a dimension, e.g. {name}:128")
    dim = _number(raw, "the dimension", positional[0] if positional else keyed["dim"], int)
    if dim < 1:
        raise UsageError(f"post-processing step {raw!r}: the dimension must be >= 1")
    shrink = 0.0
    if "shrink" in keyed:
        if name != "pca-whiten":
            raise UsageError(f"post-processing step {raw!r}: shrink= applies to pca-whiten only")
        shrink = _number(raw, "shrink", keyed["shrink"], float)
        if not 0.0 <= shrink <= 1.0:
            raise UsageError(f"post-processing step {raw!r}: shrink must be in [0, 1]")
    return _Step("pca", dim=dim, whiten=name == "pca-whiten", shrinkage=shrink)


class PostChain:
    """A parsed, possibly fitted, sequence of post-processing steps.

    Grammar (one command-line argument)::

        chain := none | step ("," step)*
        step  := l2                      unit L2 norm per row (alias l2n)
               | power[:ALPHA]           signed power law, default 0.5 (alias pow)
               | sqrt                    signed square root = power:0.5 (alias ssr)
               | pca:DIM                 PCA to DIM dims (fitted)
               | pca-whiten:DIM[:shrink=S]   PCA-whitening to DIM dims, shrinkage S in [0, 1]

    A step's arguments are separated by ``:``, steps by ``,``; ``key=value`` forms
    (``power:alpha=0.5``, ``pca:dim=128``) are accepted too. ``needs_fit`` says
    whether the chain contains steps that must be learned (PCA); ``fit(X)`` fits
    them in order, each on the output of the steps before it, and returns the
    chain itself; ``fitted`` says whether ``apply`` can run.
    """

    def __init__(self, spec: str = "none"):
        if not isinstance(spec, str):
            raise UsageError(f"a post-processing chain is a string like 'pca-whiten:128,l2', got {spec!r}")
        text = spec.strip()
        self.steps: list[_Step] = []
        if text.lower() not in ("", "none"):
            parts = [p for p in text.split(",")]
            if any(not p.strip() for p in parts):
                raise UsageError(f"post-processing chain {spec!r} has an empty step (grammar: {CHAIN_GRAMMAR})")
            for p in parts:
                if p.strip().lower() == "none":
                    raise UsageError(f"'none' must be the whole post-processing chain, not a step of {spec!r}")
                self.steps.append(_parse_step(p))
        self.dim_in: int | None = None
        self.n_fit = 0
        self.created: str | None = None

    @classmethod
    def parse(cls, spec: str | PostChain) -> PostChain:
        return spec if isinstance(spec, PostChain) else cls(spec)

    @classmethod
    def from_arg(cls, arg: str | os.PathLike | PostChain) -> PostChain:
        """A chain from a command-line value: a spec (``pca-whiten:128,l2``) or the path of a
        saved chain file (``.npz``, e.g. a fine-tuning run's ``whitening.npz``), loaded fitted."""
        if isinstance(arg, PostChain):
            return arg
        text = os.fspath(arg)
        if is_chain_file(text):
            if not os.path.isfile(text):
                raise UsageError(f"post-processing chain file not found: {text}")
            return cls.load(text)
        return cls(text)

    # -- state -----------------------------------------------------------------

    @property
    def spec(self) -> str:
        return ",".join(s.spec for s in self.steps) if self.steps else "none"

    @property
    def needs_fit(self) -> bool:
        """True when the chain has steps (PCA) that must be fitted on training descriptors."""
        return any(s.needs_fit for s in self.steps)

    @property
    def fitted(self) -> bool:
        """True when ``apply`` can run: no step needs fitting, or all have been fitted."""
        return all(s.fitted for s in self.steps)

    @property
    def learned(self) -> bool:
        """True when the chain has learned steps (``lw``) that no ``fit`` can produce."""
        return any(s.kind == "lw" for s in self.steps)

    def output_dim(self, dim_in: int) -> int:
        d = int(dim_in)
        for s in self.steps:
            if s.kind in ("pca", "lw"):
                d = s.dim
        return d

    def __iter__(self) -> Iterator[str]:
        return (s.spec for s in self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    # -- fit / apply -------------------------------------------------------------

    def fit(self, X: Any) -> PostChain:
        """Fit every PCA step on *X* passed through the steps before it; returns ``self``.

        Learned steps (``lw``) are kept as they are; they must be loaded already."""
        X = as_descriptors(X, "training descriptors")
        missing = [s.spec for s in self.steps if s.kind == "lw" and s.affine is None]
        if missing:
            raise UsageError(
                f"post-processing step {missing[0]!r} is a whitening learned by `deepfeat finetune --whiten`, not "
                "fitted from descriptors: give the run's whitening.npz file instead of the spec"
            )
        self.dim_in = int(X.shape[1])
        for step in self.steps:
            if step.kind == "pca":
                if step.dim > X.shape[1]:
                    raise UsageError(
                        f"step {step.spec!r} reduces to {step.dim} dims but receives {X.shape[1]}-D descriptors"
                    )
                step.pca = PCA().fit(X, step.dim, whiten=step.whiten, shrinkage=step.shrinkage)
            X = step.apply(X)
        self.n_fit = int(X.shape[0])
        self.created = _now()
        return self

    def apply(self, X: Any) -> np.ndarray:
        """Run every step on *X*; the result is ``N x output_dim`` float32, C-contiguous."""
        if not self.fitted:
            raise UsageError(
                f"post-processing chain {self.spec!r} must be fitted first: call fit(training descriptors) "
                "or load a fitted chain with PostChain.load(path)"
            )
        X = as_descriptors(X)
        if self.dim_in is not None and self.needs_fit and X.shape[1] != self.dim_in:
            raise UsageError(
                f"post-processing chain {self.spec!r} was fitted on {self.dim_in}-D descriptors, got {X.shape[1]}-D"
            )
        for step in self.steps:
            X = step.apply(X)
        return np.ascontiguousarray(X, dtype=np.float32)

    __call__ = apply

    # -- description and files -----------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "steps": [s.to_dict() for s in self.steps],
            "needs_fit": self.needs_fit,
            "fitted": self.fitted,
            "dim_in": self.dim_in,
            "dim_out": self.output_dim(self.dim_in) if self.dim_in is not None else None,
            "fitted_on": self.n_fit,
            "created": self.created,
        }

    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write the chain (spec, per-step arrays, meta) as a self-describing ``.npz``.

        *extra* (JSON-serialisable: model, layer, pooling, ...) is stored under ``meta["extra"]``.
        """
        if not self.fitted:
            raise UsageError(f"post-processing chain {self.spec!r} is not fitted; fit it before saving")
        arrays: dict[str, np.ndarray] = {}
        for i, s in enumerate(self.steps):
            if s.pca is not None:
                arrays.update(s.pca._arrays(f"step{i}."))
            if s.affine is not None:
                arrays.update(s.affine._arrays(f"step{i}."))
        meta = {
            **self.to_dict(),
            "kind": CHAIN_FILE_KIND,
            "format_version": FORMAT_VERSION,
            "deepfeat_version": _version(),
            "saved": _now(),
            "extra": extra or {},
        }
        _write_npz(path, arrays, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PostChain:
        arrays, meta = _read_npz(path, CHAIN_FILE_KIND)
        try:
            chain = cls(meta["spec"])
            steps_meta = meta["steps"]
        except KeyError as e:
            raise FormatError(f"{path}: meta lacks {e.args[0]!r}") from None
        if len(steps_meta) != len(chain.steps):
            raise FormatError(f"{path}: meta lists {len(steps_meta)} steps but the spec has {len(chain.steps)}")
        for i, (s, info) in enumerate(zip(chain.steps, steps_meta)):
            if s.kind == "pca":
                s.pca = PCA._from_arrays(arrays, f"step{i}.", info, str(path))
                if s.pca.dim != s.dim:
                    raise FormatError(f"{path}: step {i} has {s.pca.dim} components, its spec says {s.dim}")
            elif s.kind == "lw":
                s.affine = Affine._from_arrays(arrays, f"step{i}.", info, str(path))
                if s.affine.dim != s.dim:
                    raise FormatError(f"{path}: step {i} maps to {s.affine.dim} dims, its spec says {s.dim}")
        chain.dim_in = meta.get("dim_in")
        chain.n_fit = int(meta.get("fitted_on", 0))
        chain.created = meta.get("created")
        return chain

    def __repr__(self) -> str:
        state = "" if not self.needs_fit else (", fitted" if self.fitted else ", unfitted")
        return f"PostChain({self.spec!r}{state})"


def learned_whitening_chain(weight: Any, bias: Any, info: dict[str, Any] | None = None) -> PostChain:
    """The fitted chain ``l2,lw:DIM,l2`` of a learned whitening (cirtorch's descriptor:
    L2-normalised pooled vector -> linear whitening -> L2), ready to save."""
    affine = Affine(weight, bias, info)
    chain = PostChain(f"l2,lw:{affine.dim},l2")
    chain.steps[1].affine = affine
    chain.dim_in = affine.dim_in
    chain.n_fit = int((info or {}).get("trained_on", 0))
    chain.created = _now()
    return chain


def is_chain_file(arg: str) -> bool:
    """Whether a ``--post`` value names a saved chain file rather than a spec."""
    return arg.strip().lower().endswith(".npz")


def parse_post(spec: str | PostChain) -> PostChain:
    """Parse a chain string such as ``pca-whiten:128,l2`` (see :class:`PostChain`)."""
    return PostChain.parse(spec)
