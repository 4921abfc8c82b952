"""From a re-ranking spec to a re-ranker: :func:`get_reranker` (the spec table is
:mod:`deepfeat.rerank.specs`, below the re-rankers it describes)."""

from __future__ import annotations

from deepfeat.rerank.base import Reranker
from deepfeat.rerank.diffusion import Diffusion
from deepfeat.rerank.kreciprocal import KReciprocal
from deepfeat.rerank.regional import RegionalDiffusion
from deepfeat.rerank.specs import RERANK_SPECS, parse_rerank_spec
from deepfeat.specs import register_spec_kind


def get_reranker(spec: str | Reranker) -> Reranker:
    """Parse a spec into a :class:`Diffusion`, :class:`KReciprocal` or :class:`RegionalDiffusion`
    (a reranker passes through)."""
    if isinstance(spec, Reranker):
        return spec
    kind, params = parse_rerank_spec(spec)
    if kind.name == "diffusion":
        return Diffusion(**params)
    if kind.name == "regional-diffusion":
        return RegionalDiffusion(**params)
    return KReciprocal(k1=params["k1"], k2=params["k2"], lam=params["lambda"], trunc=params["trunc"])


register_spec_kind("rerank", RERANK_SPECS, lambda s: get_reranker(s).spec)
