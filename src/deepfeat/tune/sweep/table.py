"""The sweep's result: one table per ground-truth protocol (rows layer x pooling, columns
post-processing, cells mAP, best marked) and its files, ``sweep_PROTOCOL.{md,csv,json}``."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepfeat.postprocess import PostChain


@dataclass
class SweepResult:
    protocol: str
    layers: list[str]
    pools: list[str]
    posts: list[str]
    cells: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    reranks: list[str] = field(default_factory=lambda: ["none"])
    scales: tuple[float, ...] = (1.0,)
    # with keep_descriptors: (layer, pooling) -> (raw xb, raw xq, ok mask, query rows); (layer, pooling, post) -> chain
    descriptors: dict[tuple[str, str], tuple] = field(default_factory=dict, repr=False)
    chains: dict[tuple[str, str, str], PostChain] = field(default_factory=dict, repr=False)
    fit_source: str = ""
    n_images: int = 0
    n_failed: int = 0
    seconds: float = 0.0
    extract_seconds: float = 0.0
    model: str = ""

    def best(self) -> tuple[str, str, str] | None:
        """The best cell (the first in table order among ties)."""
        best, best_map = None, -1.0
        for k, v in self.cells.items():
            if v.get("map") is not None and v["map"] > best_map:
                best, best_map = k, v["map"]
        return best

    @property
    def columns(self) -> list[str]:
        """The table's columns: each post-processing chain, followed by every re-ranking
        (``POST + RERANK``) and verification (``+verify N``) asked for."""
        return self.posts

    def markdown(self) -> str:
        best = self.best()
        head = "| layer | pooling | " + " | ".join(self.columns) + " |"
        sep = "|---|---|" + "---:|" * len(self.columns)
        lines = [head, sep]
        for layer in self.layers:
            for pool in self.pools:
                cells = []
                for post in self.columns:
                    c = self.cells.get((layer, pool, post), {})
                    if c.get("map") is None:
                        cells.append(c.get("note", "n/a"))
                    else:
                        txt = f"{100 * c['map']:.2f}"
                        cells.append(f"**{txt}**" if (layer, pool, post) == best else txt)
                lines.append(f"| {layer} | {pool} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["protocol", "layer", "pooling", "post", "rerank", "dim", "map", "mp@1", "mp@5", "mp@10",
                    "ns_score", "rerank_ms_per_query", "note", "best"])
        best = self.best()
        for (layer, pool, post), c in self.cells.items():
            w.writerow([self.protocol, layer, pool, post, c.get("rerank", "none"), c.get("dim"),
                        _fmt(c.get("map")), _fmt(c.get("mp1")),
                        _fmt(c.get("mp5")), _fmt(c.get("mp10")), _fmt(c.get("ns")), c.get("rerank_ms", ""),
                        c.get("note", ""),
                        int((layer, pool, post) == best)])
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "model": self.model, "layers": self.layers, "pools": self.pools,
                "posts": self.posts, "reranks": self.reranks, "scales": list(self.scales),
                "fit_source": self.fit_source, "n_images": self.n_images,
                "n_failed": self.n_failed, "seconds": round(self.seconds, 2),
                "extract_seconds": round(self.extract_seconds, 2), "best": list(self.best() or []),
                "cells": [{"layer": k[0], "pooling": k[1], "post": k[2], **v} for k, v in self.cells.items()]}


def _fmt(v) -> str:
    return "" if v is None else f"{v:.6f}"


def column_name(post: str, rerank: str) -> str:
    """The table column of a post-processing chain followed by a re-ranking (``none``: the chain alone)."""
    return post if rerank == "none" else f"{post} + {rerank}"


def _scores(ev) -> dict[str, Any]:
    """A cell's scores from an :class:`~deepfeat.evaluate.EvalResult`."""
    return {"map": ev.map, "mp1": ev.mp_at_k.get(1), "mp5": ev.mp_at_k.get(5), "mp10": ev.mp_at_k.get(10),
            "ns": ev.ns_score}


def _verify_column(post: str, params) -> str:
    return f"{post} +verify {params.top}"


def write_outputs(results: list[SweepResult], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for r in results:
        stem = f"sweep_{r.protocol}"
        (out / f"{stem}.md").write_text(r.markdown() + "\n")
        (out / f"{stem}.csv").write_text(r.csv())
        (out / f"{stem}.json").write_text(json.dumps(r.to_dict(), indent=2) + "\n")
        written += [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.json"]
    return written
