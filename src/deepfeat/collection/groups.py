"""Duplicate groups: connected components of confirmed pairs, and which member to keep.

A chain a ~ b ~ c is one group even when a and c were never compared (or do not
match): duplicates of duplicates are kept together for review. The keeper of a group
is chosen by a stated policy, a comma-separated list of criteria applied in order
(ties go to the next criterion, then to the stored path):

* ``pixels``: the largest pixel count (width x height, after EXIF orientation);
* ``bytes``: the largest file;
* ``oldest`` / ``newest``: the earliest / latest modification time;
* ``path``: the first stored path in sort order.

The default ``pixels,bytes,oldest`` keeps the highest-resolution, least-compressed,
original-looking copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from deepfeat.errors import UsageError

KEEP_CRITERIA = ("pixels", "bytes", "oldest", "newest", "path")
DEFAULT_KEEP = "pixels,bytes,oldest"


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    """Groups of 2 or more of the rows 0..n-1 joined by the pairs (a[i], b[i]), each group
    sorted, groups ordered by their first row (union-find with path halving)."""
    parent = np.arange(n, dtype=np.int64)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return int(x)

    for x, y in zip(np.asarray(a, np.int64).tolist(), np.asarray(b, np.int64).tolist()):
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    members: dict[int, list[int]] = {}
    for x in sorted(set(np.asarray(a).tolist()) | set(np.asarray(b).tolist())):
        members.setdefault(find(x), []).append(int(x))
    return [m for _, m in sorted(members.items()) if len(m) > 1]


def parse_keep(policy: str | Sequence[str]) -> tuple[str, ...]:
    """``pixels,bytes,oldest`` -> its criteria, checked (see the module docstring)."""
    items = [p.strip().lower() for p in (policy.split(",") if isinstance(policy, str) else policy) if p.strip()]
    if not items:
        raise UsageError(f"--keep needs at least one of {', '.join(KEEP_CRITERIA)}")
    bad = [p for p in items if p not in KEEP_CRITERIA]
    if bad:
        raise UsageError(f"--keep {','.join(items)}: unknown {', '.join(bad)}; choose from {', '.join(KEEP_CRITERIA)}")
    if "oldest" in items and "newest" in items:
        raise UsageError("--keep: oldest and newest contradict each other; give one")
    return tuple(items)


@dataclass(frozen=True)
class FileFacts:
    """What the keeper policy (and the safe actions) know of a member's file."""

    path: str  # as stored
    pixels: int
    bytes: int
    mtime_ns: int


def _sort_key(f: FileFacts, criteria: Iterable[str]) -> tuple:
    key: list = []
    for c in criteria:
        key.append({"pixels": -f.pixels, "bytes": -f.bytes, "oldest": f.mtime_ns, "newest": -f.mtime_ns,
                    "path": f.path}[c])
    return (*key, f.path)


def choose_keeper(facts: Sequence[FileFacts], criteria: Sequence[str]) -> int:
    """The position in *facts* of the member to keep under *criteria* (:func:`parse_keep`)."""
    return min(range(len(facts)), key=lambda i: _sort_key(facts[i], criteria))
