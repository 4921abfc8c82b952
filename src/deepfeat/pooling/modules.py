"""A parsed pooling as an ``nn.Module``: :class:`Pooling` (one method, with its
multi-scale rule) and :class:`ConcatPooling` (``a+b``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from deepfeat.errors import UsageError
from deepfeat.pooling.common import EPS, _check_map, l2_normalize
from deepfeat.pooling.global_pool import gem
from deepfeat.pooling.multiscale import combine_scales
from deepfeat.pooling.regional import regional_sum
from deepfeat.pooling.registry import POOLINGS, PoolingKind, _canonical


class Pooling(torch.nn.Module):
    """A parsed pooling: callable on ``N x C x H x W`` (and ``N x D`` for ``none``).

    ``name`` is the method, ``spec`` the canonical string (``gem:p=3``) that
    :func:`get_pooling` parses back to an equal pooling, ``to_dict()`` a JSON-able
    description, ``needs_fit`` True only for ``mop``, ``output_dim(C)`` the length
    of the descriptor for C channels. Being an ``nn.Module`` it can be placed in a
    network (and an ONNX export) as is.
    """

    def __init__(self, kind: PoolingKind, params: dict[str, Any]):
        super().__init__()
        self.kind = kind
        self.params = dict(params)

    # -- description -------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def spec(self) -> str:
        return _canonical(self.kind, self.params)

    @property
    def needs_fit(self) -> bool:
        return self.kind.needs_fit

    @property
    def fitted(self) -> bool:
        return True

    @property
    def regional(self) -> bool:
        return self.kind.region_pool is not None

    @property
    def l2_normalized(self) -> bool:
        """True when the output rows always have unit L2 norm."""
        return self.regional

    def output_dim(self, channels: int) -> int:
        return int(channels)

    def to_dict(self) -> dict[str, Any]:
        params = {}
        for p in self.kind.params:
            v = self.params.get(p.name)
            params[p.name] = list(v) if isinstance(v, tuple) else v
        return {"name": self.name, "spec": self.spec, "params": params, "needs_fit": self.needs_fit,
                "fitted": self.fitted, "l2_normalized": self.l2_normalized, "citation": self.kind.citation}

    def extra_repr(self) -> str:
        return repr(self.spec)

    def fit(self, batches: Iterable[torch.Tensor]) -> Pooling:
        """Nothing to learn for this method; returns ``self`` (see :class:`MOPPooling`)."""
        return self

    # -- pooling -------------------------------------------------------------------

    def _fn_params(self) -> dict[str, Any]:
        return {p.name: self.params[p.name] for p in self.kind.params}

    def _regional_sum(self, x: torch.Tensor) -> torch.Tensor:
        _check_map(x, self.name)
        kw = self._fn_params()
        region_pool = self.kind.region_pool(**kw)  # type: ignore[misc]
        return regional_sum(x, region_pool, kw["L"], kw["overlap"], kw["eps"])

    def forward(self, x: torch.Tensor, tokens: dict | None = None) -> torch.Tensor:
        """Pool the map *x*; *tokens* are a transformer tap's prefix tokens (:mod:`deepfeat.pooling.tokens`)."""
        if self.kind.token_fn is not None:
            return self.kind.token_fn(tokens, self.name)
        if self.regional:
            return l2_normalize(self._regional_sum(x), self.params["eps"])
        return self.kind.fn(x, **self._fn_params())  # type: ignore[misc]

    def multiscale(self, maps: Sequence[torch.Tensor], mode: str = "sum", p: float = 3.0,
                   tokens: Sequence[dict | None] | None = None) -> torch.Tensor:
        """One L2-normalised descriptor from the maps of several input scales.

        Global poolings: each scale's vector is L2-normalised, then combined
        (:func:`combine_scales`), then L2-normalised (cirtorch's multi-scale).
        Regional poolings (rmac, rgem): the *unnormalised* sums of regional
        vectors of every scale are combined, then L2-normalised, i.e. all regions
        of all scales are summed before the one final L2 (Tolias et al. 2016;
        Gordo et al. 2017).
        """
        if not maps:
            raise UsageError("multiscale pooling needs at least one map")
        tokens = list(tokens) if tokens is not None else [None] * len(maps)
        if self.regional:
            vs = [self._regional_sum(m) for m in maps]
        else:
            vs = [l2_normalize(self(m, t)) for m, t in zip(maps, tokens)]
        return l2_normalize(combine_scales(vs, mode, p))


class ConcatPooling(Pooling):
    """``a+b+...``: the L2-normalised outputs of the parts, concatenated and scaled
    by ``1/sqrt(parts)`` so the result has unit norm and every part equal weight
    (``rmac+mac``: the summed regional vector next to the global MAC)."""

    def __init__(self, members: Sequence[Pooling]):
        super().__init__(PoolingKind("+".join(m.name for m in members), "concatenation", "", ()), {})
        self.members = torch.nn.ModuleList(members)

    @property
    def spec(self) -> str:
        return "+".join(m.spec for m in self.members)

    @property
    def regional(self) -> bool:
        return False

    @property
    def l2_normalized(self) -> bool:
        return True

    def output_dim(self, channels: int) -> int:
        return sum(m.output_dim(channels) for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "spec": self.spec, "parts": [m.to_dict() for m in self.members],
                "needs_fit": False, "fitted": True, "l2_normalized": True,
                "citation": "; ".join(dict.fromkeys(m.kind.citation for m in self.members))}

    def forward(self, x: torch.Tensor, tokens: dict | None = None) -> torch.Tensor:
        parts = [l2_normalize(m(x, tokens)) for m in self.members]
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))

    def multiscale(self, maps: Sequence[torch.Tensor], mode: str = "sum", p: float = 3.0,
                   tokens: Sequence[dict | None] | None = None) -> torch.Tensor:
        parts = [m.multiscale(maps, mode, p, tokens) for m in self.members]
        return torch.cat(parts, dim=1) / math.sqrt(len(parts))


class GeM(torch.nn.Module):
    """GeM pooling with a (by default learnable) power *p*, cirtorch style:
    a thin module around :func:`gem` returning ``N x C``."""

    def __init__(self, p: float = 3.0, eps: float = EPS, learnable: bool = True):
        super().__init__()
        if not p > 0:
            raise UsageError(f"GeM power p must be > 0, got {p}")
        if learnable:
            self.p = torch.nn.Parameter(torch.full((1,), float(p)))
        else:
            self.register_buffer("p", torch.full((1,), float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gem(x, p=self.p, eps=self.eps)

    def to_pooling(self) -> Pooling:
        """The registry :class:`Pooling` with the current (e.g. learned) p."""
        kind = POOLINGS["gem"]
        params = {p.name: p.default for p in kind.params}
        params["p"] = float(f"{float(self.p.detach().reshape(-1)[0]):.6g}")
        return Pooling(kind, params)

    def extra_repr(self) -> str:
        return f"p={float(self.p.detach().reshape(-1)[0]):.4f}, eps={self.eps}"
