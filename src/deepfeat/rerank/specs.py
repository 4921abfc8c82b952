"""Re-ranking specs and their registry: ``name[:key=value,...]`` (the grammar of
:mod:`deepfeat.specs`) parsed against :data:`RERANKERS` (every kind, its parameters, their defaults and rules), with errors
that name the valid choices; :func:`deepfeat.rerank.build.get_reranker` turns a spec into a re-ranker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepfeat.specs import Param, SpecKind, format_float_g


@dataclass(frozen=True)
class RerankKind:
    name: str
    summary: str
    citation: str
    params: tuple[Param, ...]

    @property
    def syntax(self) -> str:
        return self.name + ":" + ",".join(f"{p.name}={p.default}" for p in self.params if p.default != "")


def _p(name: str, kind: str, default: Any, rule: str, check, doc: str, **kw: Any) -> Param:
    return Param(name, kind, default, rule, check, doc=doc, **kw)


_INT_GE1 = ("an integer >= 1", lambda v: v >= 1)
_INT_GE0 = ("an integer >= 0", lambda v: v >= 0)

RERANKERS: dict[str, RerankKind] = {
    k.name: k
    for k in (
        RerankKind(
            "diffusion", "diffusion on the mutual k-NN graph of the database, CG solve on the query's shortlist",
            "Iscen, Tolias, Avrithis, Furon & Chum, Efficient diffusion on region manifolds, CVPR 2017",
            (_p("k", "int", 50, *_INT_GE1, "neighbours per database item in the offline graph"),
             _p("kq", "int", 10, *_INT_GE1, "query neighbours that seed the diffusion (y)"),
             _p("alpha", "float", 0.9, "a number in (0, 1)", lambda v: 0 < v < 1, "diffusion weight"),
             _p("gamma", "float", 3.0, "a number > 0", lambda v: v > 0, "affinity power max(0,s)^gamma"),
             _p("trunc", "int", 1000, *_INT_GE1, "shortlist size: the subgraph diffusion runs on"),
             _p("iters", "int", 20, *_INT_GE1, "conjugate-gradient iterations at most"))),
        RerankKind(
            "kreciprocal", "k-reciprocal encoding: expanded reciprocal sets, Jaccard distance blended with the original",
            "Zhong, Zheng, Cao & Li, Re-ranking person re-identification with k-reciprocal encoding, CVPR 2017",
            (_p("k1", "int", 20, *_INT_GE1, "size of the k-reciprocal neighbourhoods"),
             _p("k2", "int", 6, *_INT_GE1, "neighbours averaged by local query expansion (1: none)"),
             _p("lambda", "float", 0.3, "a number in [0, 1]", lambda v: 0 <= v <= 1,
                "weight of the original distance"),
             _p("trunc", "int", 2000, *_INT_GE0,
                "databases larger than this re-rank each query's top-trunc only (0: always all)"))),
        RerankKind(
            "regional-diffusion", "diffusion on the mutual k-NN graph of the database's image regions (the store's "
            "regional descriptors), region scores pooled per image",
            "Iscen, Tolias, Avrithis, Furon & Chum, Efficient diffusion on region manifolds, CVPR 2017",
            (_p("k", "int", 200, *_INT_GE1, "neighbours per database region in the offline graph"),
             _p("kq", "int", 200, *_INT_GE1,
                "nearest regions of each query region, and seeds kept (y)"),
             _p("alpha", "float", 0.99, "a number in (0, 1)", lambda v: 0 < v < 1, "diffusion weight"),
             _p("gamma", "float", 3.0, "a number > 0", lambda v: v > 0, "affinity power max(0,s)^gamma"),
             _p("trunc", "int", 1000, *_INT_GE1,
                "shortlist size in images: diffusion runs on the graph of their regions"),
             _p("iters", "int", 20, *_INT_GE1, "conjugate-gradient iterations at most"),
             _p("pool", "choice", "gmp", "gmp or sum", lambda v: True,
                "region scores to an image score: generalized-max-pooling weights (the authors' code) "
                "or a plain sum", choices=("gmp", "sum")),
             _p("section", "text", "", "a section name (letters, digits, '-', '_')",
                lambda v: v.replace("-", "").replace("_", "").isalnum(),
                "the store's regions section (default: the first)"))),
    )
}
#: re-ranking specs: one part, key=value parameters only
RERANK_SPECS = SpecKind("re-ranking", RERANKERS, float_format=format_float_g, messages={
    "empty": "empty re-ranking spec; valid: {names}",
    "unknown_name": "unknown re-ranking {name!r}; valid: {names} (e.g. " + RERANKERS["diffusion"].syntax + ").{hint}",
})


def list_rerankers() -> list[str]:
    return list(RERANKERS)


def parse_rerank_spec(spec: str) -> tuple[RerankKind, dict[str, Any]]:
    """``name[:k=v,...]`` -> (kind, full parameter dict). Raises :class:`UsageError` listing the choices."""
    part = RERANK_SPECS.parse_part(RERANK_SPECS.split(spec)[0])
    return part.kind, part.params


def canonical_spec(kind: RerankKind, params: dict[str, Any]) -> str:
    """The spec with every parameter written out (what results and meta record; an empty text
    parameter, such as the default regions section, is left out)."""
    return RERANK_SPECS.canonical(kind, params)


def describe_rerankers() -> list[dict[str, str]]:
    return [{"name": k.name, "syntax": k.syntax, "summary": k.summary, "citation": k.citation,
             "params": "; ".join(f"{p.name} ({p.default}): {p.doc}" for p in k.params)} for k in RERANKERS.values()]
