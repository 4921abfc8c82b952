"""Re-ranking specs and their registry: ``name[:key=value,...]`` parsed against
:data:`RERANKERS` (every kind, its parameters, their defaults and rules), with errors
that name the valid choices; :func:`get_reranker` turns a spec into a re-ranker."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from deepfeat.errors import UsageError, suggest

if TYPE_CHECKING:
    from deepfeat.rerank.base import Reranker


@dataclass(frozen=True)
class RerankParam:
    """One parameter of a re-ranking spec."""

    name: str
    kind: type  # int, float or str
    default: Any
    rule: str  # what valid values are, for error messages
    check: Callable[[Any], bool]
    doc: str


@dataclass(frozen=True)
class RerankKind:
    name: str
    summary: str
    citation: str
    params: tuple[RerankParam, ...]

    @property
    def syntax(self) -> str:
        return self.name + ":" + ",".join(f"{p.name}={p.default}" for p in self.params if p.default != "")


def _key(name: str) -> str:
    """How a kind's name is looked up: case, '-' and '_' do not matter (k-reciprocal, regional_diffusion)."""
    return name.strip().lower().replace("-", "").replace("_", "")


_INT_GE1 = ("an integer >= 1", lambda v: v >= 1)
_INT_GE0 = ("an integer >= 0", lambda v: v >= 0)

RERANKERS: dict[str, RerankKind] = {
    k.name: k
    for k in (
        RerankKind(
            "diffusion", "diffusion on the mutual k-NN graph of the database, CG solve on the query's shortlist",
            "Iscen, Tolias, Avrithis, Furon & Chum, Efficient diffusion on region manifolds, CVPR 2017",
            (RerankParam("k", int, 50, *_INT_GE1, "neighbours per database item in the offline graph"),
             RerankParam("kq", int, 10, *_INT_GE1, "query neighbours that seed the diffusion (y)"),
             RerankParam("alpha", float, 0.9, "a number in (0, 1)", lambda v: 0 < v < 1, "diffusion weight"),
             RerankParam("gamma", float, 3.0, "a number > 0", lambda v: v > 0, "affinity power max(0,s)^gamma"),
             RerankParam("trunc", int, 1000, *_INT_GE1, "shortlist size: the subgraph diffusion runs on"),
             RerankParam("iters", int, 20, *_INT_GE1, "conjugate-gradient iterations at most"))),
        RerankKind(
            "kreciprocal", "k-reciprocal encoding: expanded reciprocal sets, Jaccard distance blended with the original",
            "Zhong, Zheng, Cao & Li, Re-ranking person re-identification with k-reciprocal encoding, CVPR 2017",
            (RerankParam("k1", int, 20, *_INT_GE1, "size of the k-reciprocal neighbourhoods"),
             RerankParam("k2", int, 6, *_INT_GE1, "neighbours averaged by local query expansion (1: none)"),
             RerankParam("lambda", float, 0.3, "a number in [0, 1]", lambda v: 0 <= v <= 1,
                         "weight of the original distance"),
             RerankParam("trunc", int, 2000, *_INT_GE0,
                         "databases larger than this re-rank each query's top-trunc only (0: always all)"))),
        RerankKind(
            "regional-diffusion", "diffusion on the mutual k-NN graph of the database's image regions (the store's "
            "regional descriptors), region scores pooled per image",
            "Iscen, Tolias, Avrithis, Furon & Chum, Efficient diffusion on region manifolds, CVPR 2017",
            (RerankParam("k", int, 200, *_INT_GE1, "neighbours per database region in the offline graph"),
             RerankParam("kq", int, 200, *_INT_GE1,
                         "nearest regions of each query region, and seeds kept (y)"),
             RerankParam("alpha", float, 0.99, "a number in (0, 1)", lambda v: 0 < v < 1, "diffusion weight"),
             RerankParam("gamma", float, 3.0, "a number > 0", lambda v: v > 0, "affinity power max(0,s)^gamma"),
             RerankParam("trunc", int, 1000, *_INT_GE1,
                         "shortlist size in images: diffusion runs on the graph of their regions"),
             RerankParam("iters", int, 20, *_INT_GE1, "conjugate-gradient iterations at most"),
             RerankParam("pool", str, "gmp", "gmp or sum", lambda v: v in ("gmp", "sum"),
                         "region scores to an image score: generalized-max-pooling weights (the authors' code) "
                         "or a plain sum"),
             RerankParam("section", str, "", "a section name (letters, digits, '-', '_')",
                         lambda v: v.replace("-", "").replace("_", "").isalnum(),
                         "the store's regions section (default: the first)"))),
    )
}
_BY_KEY = {_key(name): kind for name, kind in RERANKERS.items()}


def list_rerankers() -> list[str]:
    return list(RERANKERS)


def _parse_value(kind: RerankKind, p: RerankParam, text: str) -> Any:
    bad = UsageError(f"re-ranking {kind.name!r}: {p.name} must be {p.rule}, got {text!r}")
    if p.kind is str:
        if not p.check(text):
            raise bad
        return text
    try:
        f = float(text)
    except ValueError:
        raise bad from None
    if not math.isfinite(f) or (p.kind is int and not f.is_integer()):
        raise bad
    v = int(f) if p.kind is int else f
    if not p.check(v):
        raise bad
    return v


def parse_rerank_spec(spec: str) -> tuple[RerankKind, dict[str, Any]]:
    """``name[:k=v,...]`` -> (kind, full parameter dict). Raises :class:`UsageError` listing the choices."""
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(f"empty re-ranking spec; valid: {', '.join(RERANKERS)}")
    name, sep, argstr = spec.strip().partition(":")
    key = _key(name)
    if key not in _BY_KEY:
        raise UsageError(f"unknown re-ranking {name.strip()!r}; valid: {', '.join(RERANKERS)} "
                         f"(e.g. {RERANKERS['diffusion'].syntax}).{suggest(name.strip().lower(), RERANKERS)}")
    kind = _BY_KEY[key]
    params = {p.name: p.default for p in kind.params}
    by_name = {p.name.lower(): p for p in kind.params}
    if sep:
        for arg in argstr.split(","):
            k, eq, v = arg.partition("=")
            if not eq or not k.strip() or not v.strip():
                raise UsageError(f"re-ranking spec {spec!r}: write parameters as name=value, e.g. {kind.syntax}")
            p = by_name.get(k.strip().lower())
            if p is None:
                raise UsageError(f"re-ranking {kind.name!r} has no parameter {k.strip()!r}; its parameters are: "
                                 f"{', '.join(q.name for q in kind.params)}{suggest(k.strip(), by_name)}")
            params[p.name] = _parse_value(kind, p, v.strip())
    return kind, params


def canonical_spec(kind: RerankKind, params: dict[str, Any]) -> str:
    """The spec with every parameter written out (what results and meta record; an empty text
    parameter, such as the default regions section, is left out)."""
    return kind.name + ":" + ",".join(f"{p.name}={params[p.name]:g}" if p.kind is float else
                                      f"{p.name}={params[p.name]}" for p in kind.params if params[p.name] != "")


def get_reranker(spec: str | Reranker) -> Reranker:
    """Parse a spec into a :class:`Diffusion`, :class:`KReciprocal` or :class:`RegionalDiffusion`
    (a reranker passes through)."""
    from deepfeat.rerank.base import Reranker
    from deepfeat.rerank.diffusion import Diffusion
    from deepfeat.rerank.kreciprocal import KReciprocal
    from deepfeat.rerank.regional import RegionalDiffusion

    if isinstance(spec, Reranker):
        return spec
    kind, params = parse_rerank_spec(spec)
    if kind.name == "diffusion":
        return Diffusion(**params)
    if kind.name == "regional-diffusion":
        return RegionalDiffusion(**params)
    return KReciprocal(k1=params["k1"], k2=params["k2"], lam=params["lambda"], trunc=params["trunc"])


def describe_rerankers() -> list[dict[str, str]]:
    return [{"name": k.name, "syntax": k.syntax, "summary": k.summary, "citation": k.citation,
             "params": "; ".join(f"{p.name} ({p.default}): {p.doc}" for p in k.params)} for k in RERANKERS.values()]

