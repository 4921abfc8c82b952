"""The sweep itself: the model, layers, poolings, post-processing chains, re-rankings and
verification parsed up front; the descriptors computed once (:mod:`.descriptors`); then,
per ground-truth protocol, every cell scored (:func:`sweep`) into a :class:`~.table.SweepResult`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from deepfeat.data.images import discover
from deepfeat.errors import UsageError
from deepfeat.pooling import get_pooling
from deepfeat.postprocess import PostChain, is_chain_file
from deepfeat.search.evaluation import ArrayEvaluation, queries_to_embed, query_rows, stack_queries
from deepfeat.search.options import SearchOptions
from deepfeat.tune.sweep.descriptors import MultiPoolNet, compute_descriptors
from deepfeat.tune.sweep.table import SweepResult, _scores, _verify_column, column_name

log = logging.getLogger(__name__)


def parse_reranks(reranks: Sequence[str] | None) -> list[str]:
    """``none`` and re-ranking specs (:mod:`deepfeat.rerank`), validated (as written: they name the
    columns; each cell records the full spec)."""
    from deepfeat.rerank import get_reranker

    out = []
    for r in reranks or ["none"]:
        r = r.strip()
        if r.lower() in ("none", ""):
            r = "none"
        elif getattr(get_reranker(r), "needs_regions", False):
            raise UsageError(f"--rerank {r}: regional diffusion needs a store's regional descriptors, which a sweep "
                             "does not make; measure it with `deepfeat eval STORE --rerank ...` after `deepfeat "
                             "local-features STORE --extractor regions`")
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
    :mod:`deepfeat.tune.recipe`).

    With *verify* (``N[:ARGS]``, :func:`deepfeat.localfeat.verify.parse_verify_spec`) every
    column gets a twin, ``COLUMN +verify N``: the same ranking with its
    top N re-ordered by spatial verification of *local* features (computed once per
    image, :mod:`deepfeat.localfeat.features`)."""
    from deepfeat.evaluate import parse_gt_spec
    from deepfeat.models import load_model
    from deepfeat.pipeline import default_layer

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
        from deepfeat.localfeat.features import LocalExtractor
        from deepfeat.localfeat.verify import parse_verify_spec

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
    from deepfeat.localfeat.features import LocalFeatures, descriptor_dim

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
    needs_crop = queries_to_embed(gt, missing="some query images of the ground truth are not in the dataset")
    crop_arrays = None
    if needs_crop:
        _, crop_arrays, _ = compute_descriptors([q.path for q in needs_crop], run.net, run.model, run.size,
                                                device=run.device, crop_boxes=[q.bbox for q in needs_crop])
    columns = [column_name(p, rr) for p in run.posts for rr in run.reranks]
    if run.verify_params:
        columns = [c for col in columns for c in (col, _verify_column(col, run.verify_params))]
    res = SweepResult(protocol=gt.protocol, posts=columns, **fields)
    rows = query_rows(gt)
    for j, (layer, pool) in enumerate(run.combos):
        xb_raw = run.arrays[j]
        xq_raw = stack_queries(gt, xb_raw, crop_arrays[j] if crop_arrays is not None else xb_raw[:0])
        if run.keep_descriptors:
            res.descriptors[(layer, pool)] = (xb_raw, xq_raw, run.ok, rows)
        for post in run.posts:
            _score_post(run, gt, res, j, (layer, pool, post), xb_raw, xq_raw)
    return res


def _score_post(run: _Run, gt, res: SweepResult, j: int, key: tuple[str, str, str], xb_raw: np.ndarray,
                xq_raw: np.ndarray) -> None:
    """The cells of one (layer, pooling, post-processing): the chain fitted and applied, the
    exact ranking, then every re-ranking (and its verified twin), by the shared protocol
    (:class:`deepfeat.search.evaluation.ArrayEvaluation`)."""
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
    protocol = ArrayEvaluation(xq, xb, gt, run.ks, run.local_feats)
    for rr in run.reranks:
        col = column_name(post, rr)
        cell: dict[str, Any] = {"chain": post, "rerank": rr}
        ev = protocol.evaluate(SearchOptions(rerank=None if rr == "none" else rr))
        if ev.rerank is not None:
            cell.update(rerank_spec=ev.rerank["rerank"], rerank_ms=ev.rerank["ms_per_query"],
                        rerank_offline_s=ev.rerank["offline_seconds"])
        res.cells[(layer, pool, col)] = {**cell, "dim": int(xb.shape[1]), **_scores(ev.result)}
        if run.verify_params:
            vev = protocol.verified(ev, run.verify_params)
            res.cells[(layer, pool, _verify_column(col, run.verify_params))] = {
                **cell, "dim": int(xb.shape[1]), **_scores(vev.result), "verify_ms_per_query": round(vev.verify_ms, 2)}
