"""The two classifiers of :mod:`deepfeat.collection.classifier` as plain arrays: a multinomial
logistic regression (scikit-learn's, folded into one ``W``, ``b``) and a cosine k-NN vote
(FAISS), both giving logits that a temperature turns into calibrated probabilities (Guo et al.,
On calibration of modern neural networks, ICML 2017)."""

from __future__ import annotations

from typing import Any

import numpy as np

from deepfeat.errors import UsageError

#: rows per step when scoring many vectors, so that memory stays bounded
CHUNK = 65536


def require_sklearn() -> Any:
    try:
        import sklearn
    except ImportError:
        raise UsageError("this needs scikit-learn: pip install 'deepfeat[explore]'") from None
    return sklearn


def l2_rows(X: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return np.ascontiguousarray(X / np.maximum(n, 1e-12), dtype=np.float32)


def fit_logreg(X: np.ndarray, y: np.ndarray, n_classes: int, C: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Fit an L2-regularised multinomial logistic regression (C = inverse regularisation strength)
    on the L2-normalised rows of *X*: logits = l2(X) W^T + b. No per-feature standardisation: it
    gives near-constant channels the weight of informative ones and cost 2-3 points of few-shot
    accuracy on Flowers 17 (docs/explore.md)."""
    require_sklearn()
    from sklearn.linear_model import LogisticRegression

    Z = l2_rows(X)
    lr = LogisticRegression(C=C, max_iter=2000, random_state=seed)  # default tol: 1e-3 stopped short at large C
    lr.fit(Z, y)
    W = np.zeros((n_classes, X.shape[1]), np.float64)
    b = np.zeros(n_classes, np.float64)
    coef, icpt = lr.coef_, lr.intercept_
    if len(lr.classes_) == 2 and coef.shape[0] == 1:  # scikit-learn's binary form: one row for class 1
        coef, icpt = np.vstack([-coef / 2, coef / 2]), np.array([-icpt[0] / 2, icpt[0] / 2])
    for row, c in enumerate(lr.classes_):
        W[c] = coef[row]
        b[c] = icpt[row]
    missing = np.setdiff1d(np.arange(n_classes), lr.classes_)
    b[missing] = -1e4  # a class absent from a training fold can never win
    return {"weight": W.astype(np.float32), "bias": b.astype(np.float32)}


def nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits)."""
    z = logits - logits.max(axis=1, keepdims=True)
    return float(-(z[np.arange(len(y)), y] - np.log(np.exp(z).sum(axis=1))).mean())


def logreg_logits(arrays: dict[str, np.ndarray], X: np.ndarray, rows: str = "l2") -> np.ndarray:
    """*rows*: ``l2`` (the weights were fitted on L2-normalised rows, format 2) or ``as-is``
    (format 1: standardisation folded into the weights)."""
    Z = l2_rows(X) if rows == "l2" else X
    return Z @ arrays["weight"].T + arrays["bias"]


def knn_logits(arrays: dict[str, np.ndarray], X: np.ndarray, k: int, n_classes: int,
               exclude_self: bool = False) -> np.ndarray:
    """Cosine k-NN votes, each neighbour weighted by its similarity, smoothed and logged:
    logit_c = log((votes_c + 1/C) / (sum of votes + 1)). *exclude_self*: the queries are the
    training rows themselves (leave-one-out)."""
    from deepfeat.index import Index

    xb = l2_rows(arrays["vectors"])
    yb = arrays["labels"]
    index = Index.build(xb, kind="flat", metric="ip")
    kk = min(len(xb), k + int(exclude_self))
    out = np.empty((len(X), n_classes), np.float32)
    for s in range(0, len(X), CHUNK):
        xq = l2_rows(X[s:s + CHUNK])
        D, I = index.search(xq, kk)
        if exclude_self:
            D, I = D[:, 1:], I[:, 1:]
        w = np.clip(D, 0.0, None) + 1e-6
        votes = np.zeros((len(xq), n_classes), np.float64)
        rows = np.repeat(np.arange(len(xq)), I.shape[1])
        np.add.at(votes, (rows, yb[I.ravel()]), w.ravel())
        votes = (votes + 1.0 / n_classes) / (votes.sum(axis=1, keepdims=True) + 1.0)
        out[s:s + CHUNK] = np.log(votes)
    return out


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) on held-out
    predictions (a 1-D bounded search over log T)."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda log_t: nll(logits / np.exp(log_t), y), bounds=(np.log(0.01), np.log(100.0)), method="bounded")
    return float(np.exp(res.x))
