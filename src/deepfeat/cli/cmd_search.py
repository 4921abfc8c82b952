"""``deepfeat index``, ``deepfeat search``, ``deepfeat eval``: a store as a search engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import UsageError
from ..search import SearchEngine, build_index, parse_bbox
from .common import print_json


def register(sub) -> None:
    p = sub.add_parser("index", help="build a FAISS index next to a feature store",
                       description="Index the store's vectors (post-processing applied). auto picks exact search "
                                   "for small stores and compressed/approximate indexes for large ones, and "
                                   "reports the expected memory.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--kind", default="auto", metavar="auto|flat|ivf|ivfpq|hnsw")
    p.add_argument("--metric", default="ip", choices=["ip", "l2"])
    p.add_argument("--feature", metavar="LAYER")
    p.add_argument("--threads", type=int, metavar="N")
    p.set_defaults(func=run_index)

    s = sub.add_parser("search", help="search a store by image, stored path/id, or vector",
                       description="Queries are image files (embedded with the store's own model, layer, pooling "
                                   "and post-processing), paths or ids already in the store, or .npy vectors.")
    s.add_argument("store", metavar="STORE")
    s.add_argument("queries", nargs="+", metavar="QUERY")
    s.add_argument("--top", "-k", type=int, default=10, metavar="K")
    s.add_argument("--qe", type=int, default=0, metavar="N", help="query expansion with the top N")
    s.add_argument("--alpha", type=float, default=0.0, metavar="A", help="alpha-QE/DBA weight power (0 = average)")
    s.add_argument("--dba", type=int, default=0, metavar="N", help="database-side augmentation with N neighbours")
    s.add_argument("--bbox", metavar="X1,Y1,X2,Y2", help="query region (crop before extraction)")
    s.add_argument("--grid", metavar="OUT.png", help="draw the query and its results")
    s.add_argument("--gt", metavar="SPEC", help="ground truth to colour the grid (e.g. folders)")
    s.add_argument("--feature", metavar="LAYER")
    s.add_argument("--device", default="cpu")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_search)

    e = sub.add_parser("eval", help="retrieval mAP of a store against a ground truth",
                       description="SPEC: folders | groups:FILE.csv | ukbench | oxford:GT_DIR | revisited:GND.json. "
                                   "Prints mAP, mP@k and the per-query table.")
    e.add_argument("store", metavar="STORE")
    e.add_argument("--gt", required=True, metavar="SPEC")
    e.add_argument("--qe", type=int, default=0, metavar="N")
    e.add_argument("--alpha", type=float, default=0.0, metavar="A")
    e.add_argument("--dba", type=int, default=0, metavar="N")
    e.add_argument("--ks", default="1,5,10", metavar="K1,K2", help="precision cut-offs (default 1,5,10)")
    e.add_argument("--feature", metavar="LAYER")
    e.add_argument("--per-query", action="store_true", help="print the per-query table")
    e.add_argument("--json", metavar="OUT.json", help="write the full result as JSON")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=run_eval)


def run_index(args) -> int:
    from ..index import plan_index
    from ..store import FeatureStore

    store = FeatureStore(args.store)
    n, d = len(store), store.post.output_dim(store.dim)
    plan = plan_index(n, d, args.kind, args.metric)
    print(f"{n} vectors x {d} dims: {plan}")
    index = build_index(store, kind=args.kind, metric=args.metric, feature=args.feature, threads=args.threads)
    m = index.meta
    print(f"built {m.get('kind')} index in {m.get('build_seconds', 0):.2f}s -> {store.path / 'index'}")
    return 0


def _verdicts(engine: SearchEngine, gt_spec: str | None, qrow, hits):
    if not gt_spec:
        return None
    from ..evaluate import parse_gt_spec

    gts = parse_gt_spec(gt_spec, engine.paths)
    gt = gts[0]
    q = next((q for q in gt.queries if q.index == qrow), None) if qrow is not None else None
    if q is None:
        return None
    return ["relevant" if h.row in q.relevant else "junk" if h.row in q.junk else "irrelevant" for h in hits]


def run_search(args) -> int:
    engine = SearchEngine(args.store, feature=args.feature, device=args.device)
    bbox = parse_bbox(args.bbox)
    xq, labels, rows = engine.resolve_queries(args.queries, bbox)
    results = engine.search(xq, k=args.top, qe=args.qe, alpha=args.alpha, dba=args.dba, exclude_rows=rows)
    if args.grid:
        if len(results) != 1:
            raise UsageError("--grid draws one query; give a single QUERY")
        q = args.queries[0]
        if Path(q).is_file() and not q.endswith(".npy"):
            query_img = q
        else:
            query_img = engine.store.resolve_path(engine.paths[rows[0]]) if rows[0] is not None else None
        from dataclasses import replace

        from ..grid import search_grid

        shown = [replace(h, path=engine.store.resolve_path(h.path)) for h in results[0]]
        search_grid(query_img, labels[0], shown, args.grid, _verdicts(engine, args.gt, rows[0], results[0]),
                    query_bbox=bbox)
    if args.json:
        print_json([{"query": lab, "hits": [h.to_dict() for h in hits]} for lab, hits in zip(labels, results)])
        return 0
    for lab, hits in zip(labels, results):
        print(f"query: {lab}")
        for h in hits:
            print(f"  {h.rank:3d}  {h.score:.4f}  {h.path}")
    if args.grid:
        print(f"grid: {args.grid}", file=sys.stderr)
    return 0


def run_eval(args) -> int:
    from ..evaluate import evaluate_ranks, parse_gt_spec

    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        raise UsageError(f"--ks {args.ks!r}: give comma-separated integers") from None
    engine = SearchEngine(args.store, feature=args.feature, device=args.device, use_index=False)
    results = []
    for gt in parse_gt_spec(args.gt, engine.paths):
        xq = query_vectors(engine, gt)
        ranks = engine.rank_all(xq, qe=args.qe, alpha=args.alpha, dba=args.dba)
        res = evaluate_ranks(ranks, gt, ks)
        results.append(res)
        if args.per_query:
            print(res.table())
        else:
            print(res.summary())
    if args.json:
        Path(args.json).write_text(json.dumps({
            "store": str(engine.store.path), "gt": args.gt, "qe": args.qe, "alpha": args.alpha, "dba": args.dba,
            "results": [r.to_dict() for r in results]}, indent=2) + "\n")
    return 0


def query_vectors(engine: SearchEngine, gt):
    """Query descriptors: the stored vector of whole-image queries, a fresh (cropped)
    extraction for queries with a region, as the Oxford protocol requires."""
    import numpy as np

    out = []
    for q in gt.queries:
        if q.bbox is not None or q.index is None:
            if q.path is None:
                raise UsageError(f"query {q.name}: its image {q.image} is not in the store; extract it too")
            out.append(engine.embed_images([engine.store.resolve_path(q.path)], [q.bbox]))
        else:
            out.append(engine.xb[q.index: q.index + 1])
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
