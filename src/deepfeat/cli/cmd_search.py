"""``deepfeat index``, ``deepfeat search``, ``deepfeat eval``: a store as a search engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deepfeat.cli.common import print_json
from deepfeat.cli.recipe_args import add_recipe_arg, apply_recipe
from deepfeat.errors import UsageError
from deepfeat.localfeat.verify import parse_verify_spec
from deepfeat.search import SearchEngine, SearchOptions, build_index, parse_bbox

RERANK_HELP = ("re-rank the shortlist: diffusion | kreciprocal | regional-diffusion, with optional parameters, "
               "e.g. diffusion:k=50,alpha=0.99,gamma=3,trunc=1000, kreciprocal:k1=20,k2=6,lambda=0.3 or "
               "regional-diffusion:k=50,kq=50 (needs the store's regional descriptors: `deepfeat local-features "
               "STORE --extractor regions`)")


RECIPE_FLAGS = {"qe": "search.qe", "alpha": "search.alpha", "dba": "search.dba", "rerank": "search.rerank"}


def search_options(args, command: str) -> None:
    """Apply --recipe (search options), refuse a bad --rerank before any work; ``none`` = no re-ranking."""
    recipe = apply_recipe(args, command)
    if args.rerank and args.rerank.strip().lower() == "none":
        args.rerank = None
    if args.rerank:
        from deepfeat.rerank import get_reranker

        get_reranker(args.rerank)
    if recipe:
        from deepfeat.store import FeatureStore
        from deepfeat.tune.recipe import store_differences

        diffs = store_differences(recipe, FeatureStore(args.store).meta)
        if diffs:
            print(f"deepfeat {command}: the store was not made as the recipe says ({'; '.join(diffs)}): its search "
                  f"options were chosen for the recipe's descriptor (make the store with `deepfeat extract "
                  f"--recipe {args.recipe}`)", file=sys.stderr)


def options_of(args) -> SearchOptions:
    """The search options of the command line (after --recipe)."""
    return SearchOptions(qe=args.qe, alpha=args.alpha, dba=args.dba, rerank=args.rerank)


def _rerank_line(engine: SearchEngine) -> str:
    return "; ".join(f"re-ranking {s['rerank']}: offline {s['offline_seconds']:.2f}s, {s['ms_per_query']:.2f} ms/query"
                     for s in engine.rerank_stats() if s["queries"])


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
    p.add_argument("--max-memory", metavar="SIZE",
                   help="build an ivf/ivfpq index with its inverted lists on disk, memory-mapped at search time, "
                        "in shards that fit SIZE (e.g. 2G) with --workers processes (docs/scaling.md)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="with --max-memory: shards built at once")
    p.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="with --max-memory: fill the shards in local processes or as Ray tasks on a cluster "
                        "(pip install 'deepfeat[ray]'; the store on a file system every node sees)")
    p.add_argument("--ray-address", metavar="auto|HOST:PORT",
                   help="with --engine ray: the cluster to join (default $RAY_ADDRESS, else a local instance)")
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
    s.add_argument("--rerank", metavar="SPEC", help=RERANK_HELP)
    s.add_argument("--bbox", metavar="X1,Y1,X2,Y2", help="query region (crop before extraction)")
    _add_verify_args(s)
    s.add_argument("--grid", metavar="OUT.png", help="draw the query and its results")
    s.add_argument("--gt", metavar="SPEC", help="ground truth to colour the grid (e.g. folders)")
    s.add_argument("--feature", metavar="LAYER")
    s.add_argument("--device", default="cpu")
    s.add_argument("--no-cache", dest="graph_cache", action="store_false",
                   help="embed image queries in PyTorch, without the descriptor graph an extraction left in the "
                        "graph cache ($DEEPFEAT_CACHE, else ~/.cache/deepfeat; docs/startup.md)")
    s.add_argument("--json", action="store_true")
    add_recipe_arg(s, RECIPE_FLAGS)
    s.set_defaults(func=run_search)

    e = sub.add_parser("eval", help="retrieval mAP of a store against a ground truth",
                       description="SPEC: folders | groups:FILE.csv | ukbench | oxford:GT_DIR | revisited:GND.json. "
                                   "Prints mAP, mP@k and the per-query table.")
    e.add_argument("store", metavar="STORE")
    e.add_argument("--gt", required=True, metavar="SPEC")
    e.add_argument("--qe", type=int, default=0, metavar="N")
    e.add_argument("--alpha", type=float, default=0.0, metavar="A")
    e.add_argument("--dba", type=int, default=0, metavar="N")
    _add_verify_args(e)
    e.add_argument("--rerank", metavar="SPEC", help=RERANK_HELP)
    e.add_argument("--ks", default="1,5,10", metavar="K1,K2", help="precision cut-offs (default 1,5,10)")
    e.add_argument("--feature", metavar="LAYER")
    e.add_argument("--per-query", action="store_true", help="print the per-query table")
    e.add_argument("--json", metavar="OUT.json", help="write the full result as JSON")
    e.add_argument("--device", default="cpu")
    add_recipe_arg(e, RECIPE_FLAGS)
    e.set_defaults(func=run_eval)


def _add_verify_args(p) -> None:
    p.add_argument("--verify", metavar="N[:ARGS]",
                   help="re-rank the top N by spatial verification of cached local features (see `deepfeat "
                        "local-features`); ARGS: weight=W,cap=C,min_inliers=M,ransac=R,ratio=T,model=similarity|"
                        "affine|homography")
    p.add_argument("--local", metavar="NAME", help="which cached local features to verify with (default: the first)")


def _run_index_ondisk(args, store, plan) -> int:
    from deepfeat.index.ondisk import StoreSource, build_ondisk, describe_ondisk, parse_bytes
    from deepfeat.index.plan import plan_index
    from deepfeat.index.update import save_rows
    from deepfeat.search.store_index import INDEX_DIR, index_source_meta

    max_memory = parse_bytes(args.max_memory)
    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: give at least 1")
    if plan.kind not in ("ivf", "ivfpq"):
        plan = plan_index(plan.n, plan.d, "ivf" if args.kind == "auto" else args.kind, args.metric)
    print(describe_ondisk(plan, max_memory, args.workers, args.engine))
    feature = store.feature_name(args.feature)
    index = build_ondisk(StoreSource(store.path, feature), store.path / INDEX_DIR, kind=plan.kind, metric=args.metric,
                         max_memory=max_memory, workers=args.workers, source_meta=index_source_meta(store, feature),
                         engine=args.engine, ray_address=args.ray_address)
    save_rows(store.path / INDEX_DIR, store.ids, index._meta)  # the item id of each row: removals update it in place
    index.save(store.path / INDEX_DIR)
    m = index.meta
    print(f"built {m['kind']} index with on-disk lists in {m['build_seconds']:.2f}s ({m['storage']['shards']} "
          f"shard(s)) -> {store.path / INDEX_DIR}")
    return 0


def run_index(args) -> int:
    from deepfeat.index import plan_index
    from deepfeat.store import FeatureStore

    store = FeatureStore(args.store)
    n, d = len(store), store.post.output_dim(store.dim)
    plan = plan_index(n, d, args.kind, args.metric)
    print(f"{n} vectors x {d} dims: {plan}")
    if args.max_memory:
        return _run_index_ondisk(args, store, plan)
    if args.engine != "local" or args.ray_address:
        raise UsageError("--engine and --ray-address build an on-disk index: give --max-memory SIZE too")
    if plan.kind in ("ivf", "ivfpq"):
        from deepfeat.index.ondisk import describe_ondisk

        print(f"  or, with --max-memory SIZE: {describe_ondisk(plan)}")
    index = build_index(store, kind=args.kind, metric=args.metric, feature=args.feature, threads=args.threads)
    m = index.meta
    print(f"built {m.get('kind')} index in {m.get('build_seconds', 0):.2f}s -> {store.path / 'index'}")
    return 0


def run_search(args) -> int:
    from deepfeat.search.request import SearchRequest, answer, hit_verdicts, query_image

    search_options(args, "search")
    engine = SearchEngine(args.store, feature=args.feature, device=args.device, graph_cache=args.graph_cache)
    bbox = parse_bbox(args.bbox)
    verify = parse_verify_spec(args.verify)
    res = answer(engine, SearchRequest(args.queries, args.top, options_of(args), bbox, verify, args.local))
    if args.rerank:
        print(_rerank_line(engine), file=sys.stderr)
    if res.regions_ms is not None:
        print(f"query regions: {res.regions_ms:.0f} ms per query", file=sys.stderr)
    if res.verify:
        v = res.verify
        print(f"verified the top {verify.top} ({v.spec}): query local features "
              f"{v.local_ms:.0f} ms, matching + RANSAC {v.verify_ms:.0f} ms per query", file=sys.stderr)
    if args.grid:
        if len(res.hits) != 1:
            raise UsageError("--grid draws one query; give a single QUERY")
        from dataclasses import replace

        from deepfeat.viz.grid import search_grid

        shown = [replace(h, path=engine.store.resolve_path(h.path)) for h in res.hits[0]]
        search_grid(query_image(engine, args.queries[0], res.rows[0]), res.labels[0], shown, args.grid,
                    hit_verdicts(engine, args.gt, res.rows[0], res.hits[0]), query_bbox=bbox)
    if args.json:
        print_json([{"query": lab, "hits": [h.to_dict() for h in hits]} for lab, hits in zip(res.labels, res.hits)])
        return 0
    for lab, hits in zip(res.labels, res.hits):
        print(f"query: {lab}")
        for h in hits:
            inl = "" if h.inliers is None else f"  {h.inliers:4d} inliers"
            print(f"  {h.rank:3d}  {h.score:.4f}{inl}  {h.path}")
    if args.grid:
        print(f"grid: {args.grid}", file=sys.stderr)
    return 0


def run_eval(args) -> int:
    from deepfeat.evaluate import parse_gt_spec
    from deepfeat.search.evaluation import StoreEvaluation

    try:
        ks = tuple(int(k) for k in args.ks.split(","))
    except ValueError:
        raise UsageError(f"--ks {args.ks!r}: give comma-separated integers") from None
    search_options(args, "eval")
    engine = SearchEngine(args.store, feature=args.feature, device=args.device, use_index=False)
    verify = parse_verify_spec(args.verify)
    protocol = StoreEvaluation(engine, options_of(args), ks, verify, args.local)
    results = []
    for gt in parse_gt_spec(args.gt, engine.paths):
        ev = protocol.evaluate(gt)
        if verify:
            print(f"verified the top {verify.top} in {ev.verify_ms:.0f} ms/query ({engine.local_cache(args.local).spec})",
                  file=sys.stderr)
        results.append(ev.result)
        print(ev.result.table() if args.per_query else ev.result.summary())
    if args.rerank:
        print(_rerank_line(engine))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "store": str(engine.store.path), "gt": args.gt, "qe": args.qe, "alpha": args.alpha, "dba": args.dba,
            "verify": verify.to_dict() if verify else None,
            "rerank": engine.rerank_stats()[0] if args.rerank else None,
            "results": [r.to_dict() for r in results]}, indent=2) + "\n")
    return 0
