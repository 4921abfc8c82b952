"""The :class:`PostChain`: a parsed, possibly fitted, sequence of post-processing steps; its fit,
apply and ``.npz`` file; the chain of a learned whitening."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from deepfeat.errors import FormatError, UsageError
from deepfeat.postprocess.files import CHAIN_FILE_KIND, FORMAT_VERSION, _now, _read_npz, _version, _write_npz
from deepfeat.postprocess.spec import CHAIN_GRAMMAR, _parse_step, _Step
from deepfeat.postprocess.transforms import PCA, Affine, as_descriptors


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
