"""One search result: rank, feature row, store id and path, score (and inliers when verified)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Hit:
    rank: int
    row: int
    id: int
    path: str
    score: float
    inliers: int | None = None  # spatial verification inliers, for verified hits

    def to_dict(self) -> dict[str, Any]:
        d = {"rank": self.rank, "id": self.id, "path": self.path, "score": round(self.score, 6)}
        if self.inliers is not None:
            d["inliers"] = self.inliers
        return d
