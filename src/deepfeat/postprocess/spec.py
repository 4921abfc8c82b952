"""The post-processing chain spec: its grammar, the parsed (and possibly fitted) step, and the parser.

``none | step[,step...]``, ``step := l2 | power[:ALPHA] | sqrt | pca:DIM |
pca-whiten:DIM[:shrink=S] | lw:DIM`` (see :class:`~deepfeat.postprocess.PostChain`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from deepfeat.errors import UsageError, suggest
from deepfeat.postprocess.transforms import PCA, Affine, l2n, power_law

STEP_NAMES = ("l2", "power", "sqrt", "pca", "pca-whiten", "lw")
_ALIASES = {"l2n": "l2", "pow": "power", "ssr": "sqrt", "pcaw": "pca-whiten", "pca_whiten": "pca-whiten",
            "whiten": "pca-whiten"}
CHAIN_GRAMMAR = ("none | step[,step...] with step = l2 | power[:ALPHA] | sqrt | pca:DIM | "
                 "pca-whiten:DIM[:shrink=S] | lw:DIM (learned, from a saved chain file); or the path of a "
                 "saved chain file (.npz)")


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
