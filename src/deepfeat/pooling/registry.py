"""The pooling registry: :data:`POOLINGS` maps a name to a :class:`PoolingKind`
(parameters, one-line summary, citation, the pure function); :data:`POOLING_SPECS`
reads and writes pooling specs with the one grammar of :mod:`deepfeat.specs`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from deepfeat.errors import UsageError
from deepfeat.pooling.common import EPS
from deepfeat.pooling.crow_weighting import crow
from deepfeat.pooling.global_pool import avg_pool, gem, mac, no_pool, spoc, sum_pool
from deepfeat.pooling.tokens import cls_token, reg_mean
from deepfeat.specs import Param, SpecKind


@dataclass(frozen=True)
class PoolingKind:
    """A registered pooling method: its name, parameters, one-line summary and citation."""

    name: str
    summary: str
    citation: str
    params: tuple[Param, ...] = ()
    fn: Callable[..., torch.Tensor] | None = None
    region_pool: Callable[..., Callable[[torch.Tensor], torch.Tensor]] | None = None  # regional kinds
    needs_fit: bool = False
    token_fn: Callable[..., torch.Tensor] | None = None  # reads the prefix tokens, not the map
    aliases: tuple[str, ...] = field(default=())

    @property
    def syntax(self) -> str:
        return POOLING_SPECS.syntax(self)


def _pos(v: Any) -> bool:
    return v > 0


_P_GEM = Param("p", "float", 3.0, "a number > 0", _pos)
_P_EPS = Param("eps", "float", EPS, "a number > 0", _pos, shown=False)
_P_L = Param("L", "int", 3, "an integer >= 1", lambda v: v >= 1)
_P_OVR = Param("overlap", "float", 0.4, "a number in (0, 1)", lambda v: 0 < v < 1, shown=False)

def _no_pool(x):
    """``none``, with the spatial poolings named when a map is refused."""
    try:
        return no_pool(x)
    except UsageError as e:
        raise UsageError(f"{e}: {', '.join(n for n in POOLINGS if n != 'none')}") from None


POOLINGS: dict[str, PoolingKind] = {
    k.name: k
    for k in (
        PoolingKind("none", "no pooling: an already pooled N x D layer (FC, global pool) passes through",
                    "Razavian et al., CNN features off-the-shelf, CVPRW 2014", fn=lambda x: _no_pool(x)),
        PoolingKind("sum", "sum over positions (SUM pooling)",
                    "Babenko & Lempitsky, Aggregating deep convolutional features for image retrieval, ICCV 2015",
                    fn=lambda x: sum_pool(x)),
        PoolingKind("avg", "mean over positions (AVE pooling)",
                    "Babenko & Lempitsky, ICCV 2015", fn=lambda x: avg_pool(x), aliases=("ave", "mean")),
        PoolingKind("spoc", "sum pooling with an optional Gaussian centre prior (SPoC)",
                    "Babenko & Lempitsky, ICCV 2015",
                    (Param("center_prior", "bool", False, "0 or 1", shown=False),),
                    fn=lambda x, center_prior: spoc(x, center_prior)),
        PoolingKind("mac", "max over positions (MAC)",
                    "Tolias, Sicre & Jégou, Particular object retrieval with integral max-pooling of CNN "
                    "activations, ICLR 2016", fn=lambda x: mac(x), aliases=("max",)),
        PoolingKind("gem", "generalised mean (mean x^p)^(1/p); p=1 avg, p->inf MAC (GeM)",
                    "Radenović, Tolias & Chum, Fine-tuning CNN image retrieval with no human annotation, TPAMI 2018",
                    (_P_GEM, _P_EPS), fn=lambda x, p, eps: gem(x, p, eps)),
        PoolingKind("rmac", "MAC of multi-scale square regions, each L2-normalised, summed, L2 (R-MAC)",
                    "Tolias, Sicre & Jégou, ICLR 2016", (_P_L, _P_OVR, _P_EPS),
                    region_pool=lambda **kw: mac, aliases=("r-mac",)),
        PoolingKind("rgem", "R-MAC regions pooled with GeM instead of MAC (regional GeM)",
                    "Radenović, Tolias & Chum, TPAMI 2018 (regions: Tolias et al. 2016)",
                    (_P_GEM, _P_L, _P_OVR, _P_EPS),
                    region_pool=lambda p, eps, **kw: (lambda r: gem(r, p, eps)), aliases=("r-gem",)),
        PoolingKind("crow", "sum pooling with spatial (a, b) and IDF-like channel weights (CroW)",
                    "Kalantidis, Mellina & Osindero, Cross-dimensional weighting for aggregated deep "
                    "convolutional features, ECCVW 2016",
                    (Param("a", "float", 2.0, "a number > 0", _pos), Param("b", "float", 2.0, "a number > 0", _pos)),
                    fn=lambda x, a, b: crow(x, a, b)),
        PoolingKind("cls", "the class token of a transformer tap (ViT, DeiT, DINOv2, EVA, CLIP towers)",
                    "Caron et al., Emerging properties in self-supervised vision transformers (DINO), ICCV 2021",
                    token_fn=cls_token),
        PoolingKind("reg", "the mean of a transformer's register tokens (models with registers)",
                    "Darcet, Oquab, Mairal & Bojanowski, Vision transformers need registers, ICLR 2024",
                    token_fn=reg_mean),
        PoolingKind("mop", "global + VLAD of windows at two scales, PCA per level, concatenated (MOP); needs fit",
                    "Gong, Wang, Guo & Lazebnik, Multi-scale orderless pooling of deep convolutional activation "
                    "features, ECCV 2014",
                    (Param("k", "int", 100, "an integer >= 2", lambda v: v >= 2),
                     Param("local", "int", 128, "an integer >= 0 (0: no local PCA)", lambda v: v >= 0),
                     Param("dim", "int", 256, "an integer >= 0 (0: no level PCA)", lambda v: v >= 0),
                     Param("windows", "ints", (128, 64), "window sizes in input pixels, e.g. 128/64",
                           lambda v: len(v) >= 1 and all(w > 0 for w in v)),
                     Param("step", "float", 32.0, "a number of pixels > 0", _pos),
                     Param("cell", "float", 32.0, "the layer stride in pixels, > 0", _pos),
                     Param("input", "int", 0, "the input side in pixels (0: use cell)", lambda v: v >= 0, shown=False),
                     Param("pool", "choice", "mac", "mac or avg", choices=("mac", "avg")),
                     Param("intra", "bool", False, "0 or 1", shown=False),
                     Param("seed", "int", 0, "an integer", shown=False)),
                    needs_fit=True),
    )
}

#: pooling specs: parts joined by '+', bare values in parameter order (``gem:3``)
POOLING_SPECS = SpecKind("pooling", POOLINGS, joiner="+", positional=True)


def list_poolings() -> list[str]:
    """The registered pooling names, in display order."""
    return list(POOLINGS)


def _canonical(kind: PoolingKind, params: dict[str, Any]) -> str:
    return POOLING_SPECS.canonical(kind, params)


def describe_poolings() -> list[dict[str, str]]:
    """Rows for a table of the registered poolings (name, syntax, summary, citation)."""
    return [{"name": k.name, "syntax": k.syntax, "summary": k.summary, "citation": k.citation}
            for k in POOLINGS.values()]
