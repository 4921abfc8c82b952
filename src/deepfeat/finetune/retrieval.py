"""Retrieval before and after fine-tuning, on the held-out split, with one protocol.

Every validation image is a query; the relevant images are the other validation
images of its class; the query itself is removed from its ranking (the class-folder
protocol of :func:`deepfeat.evaluate.class_folder_gt`, with classes taken from the
labels so that CSV-labelled sets work too). Descriptors: the same layer and pooling
for both models, L2-normalised, ranked by cosine similarity.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat.evaluate import EvalResult, GroundTruth, Query, evaluate_ranks, rank_by_similarity

KS = (1, 5, 10)


def label_gt(labels: Sequence[int], paths: Sequence[str], classes: Sequence[str]) -> GroundTruth:
    """Every image a query, relevant = the other images with the same label, query excluded."""
    members: dict[int, set[int]] = {}
    for i, lab in enumerate(labels):
        members.setdefault(int(lab), set()).add(i)
    queries = tuple(
        Query(name=f"{classes[lab]}/{Path(p).name}", image=str(p), index=i, path=str(p),
              relevant=frozenset(members[int(lab)] - {i}))
        for i, (lab, p) in enumerate(zip(labels, paths))
    )
    return GroundTruth("folders", queries, len(paths), exclude_query=True, source="labels")


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def evaluate_descriptors(x: np.ndarray, labels: Sequence[int], paths: Sequence[str],
                         classes: Sequence[str]) -> EvalResult:
    """mAP and mP@1/5/10 of the L2-normalised descriptors *x* (one row per image)."""
    x = l2n(x)
    ranks = rank_by_similarity(x, x, exclude_self=True)
    return evaluate_ranks(ranks, label_gt(labels, paths, classes), ks=KS)


def per_class_map(res: EvalResult, labels: Sequence[int], classes: Sequence[str]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for q, lab in zip(res.queries, labels):
        if q.n_relevant:
            out.setdefault(classes[int(lab)], []).append(q.ap)
    return {c: round(float(np.mean(v)), 6) for c, v in out.items()}


def summary(res: EvalResult) -> dict[str, Any]:
    d = res.to_dict()
    d.pop("queries", None)
    return d


def comparison_table(before: dict, after: dict) -> str:
    """The before/after table in percent, with the gain row, from two :func:`summary`
    dicts (``map`` and ``mp_at_k`` keyed by the string k, as in ``retrieval.json``)."""
    ks = [str(k) for k in KS if str(k) in before["mp_at_k"] and str(k) in after["mp_at_k"]]
    heads = ["", "mAP", *(f"mP@{k}" for k in ks)]

    def vals(d: dict) -> list[float]:
        return [d["map"], *(d["mp_at_k"][k] for k in ks)]

    rows = [["off-the-shelf", *(f"{100 * v:.2f}" for v in vals(before))],
            ["fine-tuned", *(f"{100 * v:.2f}" for v in vals(after))],
            ["gain", *(f"{100 * (a - b):+.2f}" for a, b in zip(vals(after), vals(before)))]]
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(heads), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def write_json(path: str | Path, obj: dict) -> None:
    from deepfeat.store import atomic_write_json

    atomic_write_json(Path(path), obj)


def read_json(path: str | Path) -> dict | None:
    p = Path(path)
    if not p.is_file():
        return None
    return json.loads(p.read_text(encoding="utf-8"))
