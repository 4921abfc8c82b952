"""How a search ranks: :class:`SearchOptions` (alpha-QE, DBA, a re-ranking), the values that
``search``, ``eval``, ``serve``, a recipe's ``search`` section and the sweep share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchOptions:
    """alpha-QE with the top *qe*, DBA with *dba* neighbours (both weighted by *alpha*, see
    :mod:`deepfeat.index`), then *rerank* (a :mod:`deepfeat.rerank` spec, None for none)."""

    qe: int = 0
    alpha: float = 0.0
    dba: int = 0
    rerank: str | None = None
