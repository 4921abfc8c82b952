"""A clustering as files: a JSON-ready dict, a ``path,cluster`` CSV, folders of links, a gallery."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepfeat.collection.clusters import Clustering
from deepfeat.collection.pages import Group, Tile, write_gallery
from deepfeat.errors import UsageError


def clusters_dict(c: Clustering, paths: Sequence[str]) -> dict[str, Any]:
    """``{"k", "how", "clusters": [{"cluster", "size", "members": [paths], "representatives": [paths]}]}``;
    clusters by size, largest first (their numbers are those of the CSV)."""
    order = sorted(range(c.k), key=lambda i: (-int(c.sizes()[i]), i))
    return {"k": c.k, "how": c.how, "scores": {str(k): v for k, v in c.scores.items()},
            "clusters": [{"cluster": i, "size": int(c.sizes()[i]),
                          "members": [paths[r] for r in c.members(i)],
                          "representatives": [paths[r] for r in c.representatives[i]]} for i in order]}


def write_csv(c: Clustering, paths: Sequence[str], out: str | os.PathLike) -> None:
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "cluster"])
        w.writerows((p, int(lab)) for p, lab in zip(paths, c.labels))


def export_links(c: Clustering, paths: Sequence[str], out: str | os.PathLike) -> int:
    """``OUT/cluster_NNN/`` folders of symbolic links to the members (absolute targets); returns
    the number of links. An existing non-empty OUT is refused."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty; give a new folder to --export")
    n = 0
    width = max(3, len(str(c.k)))
    for i in range(c.k):
        d = out / f"cluster_{i:0{width}d}"
        d.mkdir(parents=True, exist_ok=True)
        for r in c.members(i):
            src = Path(paths[r]).resolve()
            name = f"{r:06d}_{src.name}"  # the row keeps two equal file names apart
            os.symlink(src, d / name)
            n += 1
    return n


def clusters_gallery(c: Clustering, paths: Sequence[str], out: str | os.PathLike, per_cluster: int = 12) -> None:
    """A page with, per cluster (largest first), its representatives then other members."""
    groups = []
    for entry in clusters_dict(c, paths)["clusters"]:
        reps = entry["representatives"]
        rest = [p for p in entry["members"] if p not in set(reps)]
        tiles = [Tile(p, "representative") for p in reps] + [Tile(p) for p in rest]
        groups.append(Group(f"cluster {entry['cluster']}", f"{entry['size']} images",
                            tiles[:max(per_cluster, len(reps))]))
    write_gallery(out, "clusters", f"{len(paths)} images, {c.how}", groups)
