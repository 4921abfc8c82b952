"""Which layer, pooling and post-processing work best here? One table answers.

The dataset is decoded and run through the network once: every requested layer is
tapped in the same forward pass and pooled every requested way. Each (layer,
pooling) descriptor is then post-processed every requested way (PCA/whitening fitted
on ``--fit-on`` images, or on the evaluation set itself with a warning, as many
papers do), ranked exactly, and scored with the ground truth. The result is the
table the retrieval literature prints: rows layer x pooling, columns
post-processing, cells mAP, best marked.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .errors import DeepfeatError, UsageError
from .images import discover
from .pipeline import decode_batch, default_workers, make_executor, probe_sizes, shard_batches
from .pooling import get_pooling
from .postprocess import PostChain, is_chain_file
from .preprocess import parse_size_policy
from .taps import make_taps

log = logging.getLogger(__name__)


class MultiPoolNet(torch.nn.Module):
    """uint8 batch -> every (layer, pooling) descriptor from one forward pass (one per scale
    with *scales*, combined as :class:`deepfeat.features.FeatureNet` does, so that ``extract
    --scales`` reproduces them)."""

    def __init__(self, model, layers: Sequence[str], poolings: Sequence, scales: Sequence[float] = (1.0,)):
        super().__init__()
        self.normalize = model.normalize
        self.taps = make_taps(model, list(layers))
        self.layers = list(layers)
        self.poolings = torch.nn.ModuleList(poolings)
        self.scales = tuple(float(s) for s in scales)

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        from .pooling import rescale

        x = self.normalize(pixels)
        if self.scales == (1.0,):
            acts = self.taps(x)
            return [p(acts[layer]) for layer in self.layers for p in self.poolings]
        per_scale = [self.taps(rescale(x, s)) for s in self.scales]
        return [p.multiscale([a[layer] for a in per_scale]) for layer in self.layers for p in self.poolings]


def compute_descriptors(paths: Sequence[str], net: MultiPoolNet, model, size: str = "model", batch_size: int = 32,
                        workers: int | None = None, draft: bool = True, device: str = "cpu",
                        crop_boxes: Sequence | None = None) -> tuple[np.ndarray, list[np.ndarray], dict[str, str]]:
    """Run *net* over *paths* with the pipeline's decoders. Returns (ok mask, one N x D array
    per output with zero rows for failed images, errors by path)."""
    from .images import decode_image

    policy = parse_size_policy(size)
    n_out = len(net.layers) * len(net.poolings)
    ok = np.zeros(len(paths), dtype=bool)
    rows: list[dict[int, np.ndarray]] = [{} for _ in range(n_out)]
    errors: dict[str, str] = {}

    def run(idx: list[int], pixels: list[np.ndarray]) -> None:
        with torch.inference_mode():
            outs = net(torch.from_numpy(np.stack(pixels)).to(device))
        for j, o in enumerate(outs):
            o = o.float().cpu().numpy().reshape(len(idx), -1)
            for k, i in enumerate(idx):
                rows[j][i] = o[k]
        ok[idx] = True

    if crop_boxes is not None:  # query regions: one image at a time, cropped first
        for i, (p, box) in enumerate(zip(paths, crop_boxes)):
            try:
                run([i], [decode_image(p, policy, model.data_config, crop_box=box, draft=draft).pixels])
            except DeepfeatError as e:
                errors[p] = str(e)
    else:
        workers = default_workers() if workers is None else workers
        items = list(enumerate(paths))
        with make_executor("processes", workers, (policy, model.data_config, draft, None)) as ex:
            sizes = None
            if not policy.fixed:
                chunk = max(1, math.ceil(len(items) / max(workers, 1)))
                futs = [ex.submit(probe_sizes, list(paths[i: i + chunk])) for i in range(0, len(paths), chunk)]
                sizes = [s for f in futs for s in f.result()]
            batches, bad = shard_batches(items, policy, batch_size, sizes)
            for i, err in bad.items():
                errors[paths[i]] = err
            futures = [ex.submit(decode_batch, b) for b in batches]
            for fut in futures:
                results, _, _ = fut.result()
                good = [r for r in results if r[1] is not None]
                for r in results:
                    if r[1] is None:
                        errors[paths[r[0]]] = r[2]
                if good:
                    run([r[0] for r in good], [r[1] for r in good])
    dims = [next(iter(r.values())).shape[0] if r else 0 for r in rows]
    arrays = []
    for j in range(n_out):
        a = np.zeros((len(paths), dims[j]), np.float32)
        for i, v in rows[j].items():
            a[i] = v
        arrays.append(a)
    return ok, arrays, errors


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


def parse_reranks(reranks: Sequence[str] | None) -> list[str]:
    """``none`` and re-ranking specs (:mod:`deepfeat.rerank`), validated (as written: they name the
    columns; each cell records the full spec)."""
    from .rerank import get_reranker

    out = []
    for r in reranks or ["none"]:
        r = r.strip()
        if r.lower() in ("none", ""):
            r = "none"
        else:
            get_reranker(r)
        out.append(r)
    return out


def sweep(dataset: Sequence[str], gt_spec: str, layers: Sequence[str], pools: Sequence[str], posts: Sequence[str],
          model_spec: str = "efficientnet_lite0", fit_on: Sequence[str] | None = None, size: str = "model",
          batch_size: int = 32, workers: int | None = None, device: str = "cpu", ks=(1, 5, 10),
          reranks: Sequence[str] | None = None, scales: Sequence[float] = (1.0,), keep_descriptors: bool = False,
          verify: str | None = None, local: str = "cnn") -> list[SweepResult]:
    """Run the sweep; one :class:`SweepResult` per ground-truth protocol.

    *reranks* (``none``, ``diffusion``, ``kreciprocal:k1=20``...) re-rank every cell's
    rankings (:mod:`deepfeat.rerank`): each post-processing column is repeated per re-ranking
    (``POST + RERANK``). *scales* extracts multi-scale descriptors (as ``extract --scales``).
    *keep_descriptors* keeps the raw descriptors and fitted chains on each result (for
    :mod:`deepfeat.recipe`).

    With *verify* (``N[:ARGS]``, :func:`deepfeat.verify.parse_verify_spec`) every
    column gets a twin, ``COLUMN +verify N``: the same ranking with its
    top N re-ordered by spatial verification of *local* features (computed once per
    image, :mod:`deepfeat.local_features`)."""
    from .evaluate import parse_gt_spec
    from .models import load_model
    from .pipeline import default_layer

    t0 = time.perf_counter()
    model = load_model(model_spec, device=device)
    layers = [default_layer(model) if layer in ("default", "") else layer for layer in layers]
    poolings = _check_poolings(pools)
    files, posts = _parse_posts(posts)
    verify_params, lx = _parse_verify(verify, local, model)
    reranks = parse_reranks(reranks)
    net = MultiPoolNet(model, layers, poolings, scales).to(device).eval()
    paths = discover(dataset)
    if not paths:
        raise UsageError("no images found in the dataset")
    gts = parse_gt_spec(gt_spec, paths)
    te = time.perf_counter()
    ok, arrays, errors = compute_descriptors(paths, net, model, size, batch_size, workers, device=device)
    if errors:
        log.warning("%d image(s) failed and rank last: %s", len(errors), "; ".join(list(errors)[:3]))
    fit_arrays, fit_source = _fit_descriptors(fit_on, net, model, size, batch_size, workers, device)
    local_feats = _local_features(lx, paths, ok) if verify_params else None
    extract_seconds = time.perf_counter() - te
    run = _Run(net=net, model=model, size=size, device=device,
               combos=[(layer, pool) for layer in layers for pool in [p.spec for p in poolings]],
               arrays=arrays, ok=ok, fit_arrays=fit_arrays, posts=posts, files=files, reranks=reranks, ks=ks,
               verify_params=verify_params, local_feats=local_feats, keep_descriptors=keep_descriptors)
    results = []
    for gt in gts:
        res = _score_gt(run, gt, layers=list(layers), pools=[p.spec for p in poolings], fit_source=fit_source,
                        n_images=len(paths), n_failed=len(errors), model=model.spec, reranks=reranks,
                        scales=tuple(scales))
        res.seconds = time.perf_counter() - t0
        res.extract_seconds = extract_seconds
        results.append(res)
    if not fit_on and any(p not in files and PostChain.parse(p).needs_fit for p in posts):
        log.warning("PCA/whitening was fitted on the evaluation set itself (no --fit-on): optimistic, as in many "
                    "papers")
    return results


def _check_poolings(pools: Sequence[str]) -> list:
    """The parsed poolings; one that learns a codebook is refused."""
    poolings = [get_pooling(p) for p in pools]
    for p in poolings:
        if p.needs_fit:
            raise UsageError(f"pooling {p.spec!r} learns a codebook; the sweep takes poolings without one")
    return poolings


def _parse_posts(posts: Sequence[str]) -> tuple[dict[str, PostChain], list[str]]:
    """(saved chain files by argument, the canonical column names): validates the grammar (and
    loads saved chain files) up front; a file's column is named by its path."""
    files = {p: PostChain.from_arg(p) for p in posts if is_chain_file(p)}
    posts = [p if p in files else PostChain.parse(p).spec for p in posts]
    return files, posts


def _parse_verify(verify: str | None, local: str, model) -> tuple[Any, Any]:
    """(verification parameters, local-feature extractor), both None without *verify*; bad
    verification or local-feature specs fail before any work."""
    verify_params = lx = None
    if verify:
        from .local_features import LocalExtractor
        from .verify import parse_verify_spec

        verify_params = parse_verify_spec(verify)
        lx = LocalExtractor(local, model) if verify_params else None
    return verify_params, lx


def _fit_descriptors(fit_on: Sequence[str] | None, net: MultiPoolNet, model, size: str, batch_size: int,
                     workers: int | None, device: str) -> tuple[list[np.ndarray] | None, str]:
    """The descriptors PCA/whitening is fitted on (None: the evaluation set's), and where they came from."""
    if not fit_on:
        return None, "the evaluation set itself (no --fit-on)"
    fit_paths = discover(fit_on)
    fok, fit_arrays, _ = compute_descriptors(fit_paths, net, model, size, batch_size, workers, device=device)
    return [a[fok] for a in fit_arrays], f"{len(fit_paths)} images from {', '.join(fit_on)}"


def _local_features(lx, paths: Sequence[str], ok: np.ndarray) -> list:
    """Local features of every image (empty for the images that failed), for verification."""
    from .local_features import LocalFeatures, descriptor_dim

    empty = LocalFeatures.empty(descriptor_dim(lx), lx.spec.binary)
    return [lx.extract(p) if ok[i] else empty for i, p in enumerate(paths)]


@dataclass
class _Run:
    """What scoring a ground truth needs from the sweep's set-up."""

    net: MultiPoolNet
    model: Any
    size: str
    device: str
    combos: list[tuple[str, str]]  # (layer, pooling), in the order of the descriptor arrays
    arrays: list[np.ndarray]
    ok: np.ndarray
    fit_arrays: list[np.ndarray] | None
    posts: list[str]
    files: dict[str, PostChain]
    reranks: list[str]
    ks: Any
    verify_params: Any
    local_feats: list | None
    keep_descriptors: bool


def _score_gt(run: _Run, gt, **fields: Any) -> SweepResult:
    """Every cell of the table of one ground-truth protocol (*fields*: the rest of the :class:`SweepResult`)."""
    # query vectors: stored rows, or cropped regions extracted afresh (Oxford protocol)
    needs_crop = [q for q in gt.queries if q.bbox is not None or q.index is None]
    crop_arrays = None
    if needs_crop:
        qpaths = [q.path for q in needs_crop]
        if any(p is None for p in qpaths):
            raise UsageError("some query images of the ground truth are not in the dataset")
        _, crop_arrays, _ = compute_descriptors(qpaths, run.net, run.model, run.size, device=run.device,
                                                crop_boxes=[q.bbox for q in needs_crop])
    columns = [column_name(p, rr) for p in run.posts for rr in run.reranks]
    if run.verify_params:
        columns = [c for col in columns for c in (col, _verify_column(col, run.verify_params))]
    res = SweepResult(protocol=gt.protocol, posts=columns, **fields)
    # a whole-image query that is a database image is its own row (k-reciprocal counts it once)
    query_rows = [q.index if q.bbox is None else None for q in gt.queries]
    for j, (layer, pool) in enumerate(run.combos):
        xb_raw = run.arrays[j]
        qrows, k_crop = [], 0
        for q in gt.queries:
            if q.bbox is not None or q.index is None:
                qrows.append(crop_arrays[j][k_crop])
                k_crop += 1
            else:
                qrows.append(xb_raw[q.index])
        xq_raw = np.stack(qrows).astype(np.float32)
        if run.keep_descriptors:
            res.descriptors[(layer, pool)] = (xb_raw, xq_raw, run.ok, query_rows)
        for post in run.posts:
            _score_post(run, gt, res, j, (layer, pool, post), xb_raw, xq_raw, query_rows)
    return res


def _score_post(run: _Run, gt, res: SweepResult, j: int, key: tuple[str, str, str], xb_raw: np.ndarray,
                xq_raw: np.ndarray, query_rows: list) -> None:
    """The cells of one (layer, pooling, post-processing): the chain fitted and applied, the
    exact ranking, then every re-ranking (and its verified twin)."""
    from .evaluate import evaluate_ranks, rank_by_similarity
    from .rerank import get_reranker, rerank_ranks

    layer, pool, post = key
    chain = run.files.get(post) or PostChain.parse(post)
    try:
        if chain.needs_fit and post not in run.files:
            chain.fit(run.fit_arrays[j] if run.fit_arrays is not None else xb_raw[run.ok])
        xb, xq = chain.apply(xb_raw), chain.apply(xq_raw)
        if run.keep_descriptors:
            res.chains[(layer, pool, post)] = chain
    except UsageError as e:
        for col in [c for c in res.posts if c == post or c.startswith(post + " +")]:
            res.cells[(layer, pool, col)] = {"chain": post, "map": None, "note": "n/a", "reason": str(e)}
        return
    xb[~run.ok] = 0.0  # failed images have no descriptor: they rank last
    xb, xq = np.ascontiguousarray(xb, dtype=np.float32), np.ascontiguousarray(xq, dtype=np.float32)
    ranks = rank_by_similarity(xq, xb)
    for rr in run.reranks:
        col = column_name(post, rr)
        cell: dict[str, Any] = {"chain": post, "rerank": rr}
        ranked = ranks
        if rr != "none":
            r = get_reranker(rr)
            ranked = rerank_ranks(r, xq, xb, ranks, query_rows)
            cell.update(rerank_spec=r.spec, rerank_ms=r.stats["ms_per_query"],
                        rerank_offline_s=r.stats["offline_seconds"])
        ev = evaluate_ranks(ranked, gt, run.ks)
        res.cells[(layer, pool, col)] = {**cell, "dim": int(xb.shape[1]), **_scores(ev)}
        if run.verify_params:
            from .verify import verify_rankings

            vranks, ms = verify_rankings(
                ranked, lambda qi: run.local_feats[gt.queries[qi].index].within(gt.queries[qi].bbox),
                run.local_feats.__getitem__, run.verify_params)
            ev = evaluate_ranks(vranks, gt, run.ks)
            res.cells[(layer, pool, _verify_column(col, run.verify_params))] = {
                **cell, "dim": int(xb.shape[1]), **_scores(ev), "verify_ms_per_query": round(ms, 2)}


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


__all__ = ["sweep", "SweepResult", "MultiPoolNet", "compute_descriptors", "write_outputs", "column_name",
           "parse_reranks"]
