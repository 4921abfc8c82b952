"""The transforms of a post-processing chain, numpy in, numpy out on ``N x D`` float32:
L2 normalisation, the signed power law, :class:`PCA` (optionally whitened, with shrinkage;
fitted on descriptors) and :class:`Affine` (a learned whitening; made from trained weights).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from deepfeat.errors import FormatError, UsageError
from deepfeat.postprocess.files import FORMAT_VERSION, PCA_FILE_KIND, _now, _read_npz, _version, _write_npz

_APPLY_CHUNK = 65536  # rows per float64 block when applying a PCA


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
