"""The post-processing chain spec: its grammar, the parsed (and possibly fitted) step, and the parser.

``none | step[,step...]``, ``step := l2 | power[:ALPHA] | sqrt | pca:DIM |
pca-whiten:DIM[:shrink=S] | lw:DIM`` (see :class:`~deepfeat.postprocess.PostChain`):
the chain variant of :mod:`deepfeat.specs` (steps joined by ``,``, a step's arguments
by ``:``), read with the same typed parameters (:data:`STEP_SPECS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.postprocess.transforms import PCA, Affine, l2n, power_law
from deepfeat.specs import Param, SpecKind, register_spec_kind

CHAIN_GRAMMAR = ("none | step[,step...] with step = l2 | power[:ALPHA] | sqrt | pca:DIM | "
                 "pca-whiten:DIM[:shrink=S] | lw:DIM (learned, from a saved chain file); or the path of a "
                 "saved chain file (.npz)")


@dataclass(frozen=True)
class StepKind:
    """A post-processing step: its name, aliases and parameters."""

    name: str
    params: tuple[Param, ...] = ()
    aliases: tuple[str, ...] = ()


_DIM = Param("dim", "int", None, "an integer >= 1", lambda v: v >= 1, bare=True, doc="a dimension")
_SHRINK = Param("shrink", "float", 0.0, "a number in [0, 1]", lambda v: 0 <= v <= 1, shown=False,
                aliases=("shrinkage",))
STEPS: dict[str, StepKind] = {k.name: k for k in (
    StepKind("l2", aliases=("l2n",)),
    StepKind("power", (Param("alpha", "float", 0.5, "> 0", lambda v: v > 0, bare=True),), aliases=("pow",)),
    StepKind("sqrt", aliases=("ssr",)),
    StepKind("pca", (_DIM, _SHRINK)),
    StepKind("pca-whiten", (_DIM, _SHRINK), aliases=("pcaw", "whiten")),
    StepKind("lw", (_DIM,)),
)}
STEP_NAMES = tuple(STEPS)
_NOT_UNDERSTOOD = "post-processing step {raw!r} not understood; use {kind}:DIM (or pca-whiten:DIM:shrink=S)"
#: one step of a chain: arguments joined by ':', bare values in parameter order
STEP_SPECS = SpecKind("post-processing step", STEPS, arg_sep=":", positional=True, messages={
    "unknown_name": "unknown post-processing step {raw!r}; valid steps: {names} (grammar: " + CHAIN_GRAMMAR
                    + ").{hint}",
    "no_params": "post-processing step {kind!r} takes no arguments, got {raw!r}",
    "unknown_param": _NOT_UNDERSTOOD, "positional": _NOT_UNDERSTOOD, "twice": _NOT_UNDERSTOOD,
    "bad_value": "post-processing step {raw!r}: {key} must be {rule}, got {value!r}",
})


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
            return STEP_SPECS.canonical(STEPS["power"], {"alpha": self.alpha})
        if self.kind == "lw":
            return STEP_SPECS.canonical(STEPS["lw"], {"dim": self.dim})
        kind = STEPS["pca-whiten" if self.whiten else "pca"]
        return STEP_SPECS.canonical(kind, {"dim": self.dim, "shrink": self.shrinkage})

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


def _parse_step(text: str) -> _Step:
    part = STEP_SPECS.parse_part(text)
    name, params, raw = part.kind.name, part.params, part.text
    if name in ("l2", "sqrt"):
        return _Step("l2") if name == "l2" else _Step("power", alpha=0.5)
    if name == "power":
        return _Step("power", alpha=params["alpha"])
    if params["dim"] is None:
        if name == "lw":
            raise UsageError(f"post-processing step {raw!r}: use lw:DIM (a whitening learned by deepfeat finetune)")
        raise UsageError(f"post-processing step {raw!r} needs a dimension, e.g. {name}:128")
    if name == "lw":
        return _Step("lw", dim=params["dim"])
    if "shrink" in part.given and name != "pca-whiten":
        raise UsageError(f"post-processing step {raw!r}: shrink= applies to pca-whiten only")
    return _Step("pca", dim=params["dim"], whiten=name == "pca-whiten", shrinkage=params["shrink"])


def _canonical_chain(text: str) -> str:
    return ",".join(_parse_step(t).spec for t in text.split(","))


register_spec_kind("postprocess", STEP_SPECS, _canonical_chain)
