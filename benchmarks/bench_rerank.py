"""Re-ranking and spatial verification on UKBench and an instance set, side by side in one run.

    python scripts/make_instance_set.py --out bench-out/instance-set
    python benchmarks/bench_rerank.py --work bench-out/rerank --instance bench-out/instance-set

Stores (made once in ``--work`` if missing, with the same settings for all: the
embedded EfficientNet-Lite0, its last feature map, GeM, L2, ``--size long:512``):

* ``db``: the instance set's database (``OUT/database.txt``: the originals among the
  Flowers 17 distractors, and with ``make_instance_set.py --views V`` the V-1 extra edited
  views of every original, so that a query has V relevant images);
* ``q``: the instance set's queries (edited copies, ``scripts/make_instance_set.py``),
  kept out of the database so that nothing done to the database (DBA, diffusion's
  graph) ever sees them;
* ``uk``: ``ukbench56`` (every image a query, its group of 4 relevant, N-S score);

each with cached local features (``deepfeat local-features``: ``cnn`` and ``sift``).
With ``--baseline-ms`` also the instance-retrieval baseline of the literature: R-MAC over
three scales (1, 1/sqrt 2, 1/2) with PCA-whitening learned on a separate set (Flowers 17
images that are not in the instance database), in stores ``db_ms``, ``q_ms``, ``fit_ms``.

Every method ranks the same queries in the same process: the global descriptor
alone, + alpha-QE, + DBA, + diffusion, + k-reciprocal (when :mod:`deepfeat.rerank`
is available), + spatial verification of the top N, and combinations. Reported per
method: mAP (and N-S for UKBench), the mAP per edit for the instance set, and the
milliseconds each adds per query over the global ranking (verification: with the
query's local features cached; the time to compute a new query image's local
features is reported separately). Writes JSON (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from deepfeat.evaluate import GroundTruth, Query, evaluate_ranks, parse_gt_spec
from deepfeat.localfeat.cache import LocalFeatureCache, build_local_features
from deepfeat.localfeat.verify import parse_verify_spec, verify_rankings
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.search import SearchEngine
from deepfeat.store import FeatureStore

HAVE_RERANK = "rerank" in inspect.signature(SearchEngine.rank_all).parameters


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="bench-out/rerank", help="folder for the stores (reused when present)")
    ap.add_argument("--instance", default="bench-out/instance-set", help="made by scripts/make_instance_set.py")
    ap.add_argument("--flowers", default="../shared/data/flowers17")
    ap.add_argument("--ukbench", default="../shared/data/ukbench56")
    ap.add_argument("--size", default="long:512", help="size policy of the global descriptors")
    ap.add_argument("--local", default="cnn,sift", help="local-feature extractors to cache and compare")
    ap.add_argument("--qe", default="2", help="alpha-QE neighbours (the + QE rows)")
    ap.add_argument("--alpha", type=float, default=3.0, help="alpha of alpha-QE / DBA")
    ap.add_argument("--dba", default="2", help="DBA neighbours (the + DBA rows)")
    ap.add_argument("--verify", default="20", help="--verify N[:ARGS] of the verification rows")
    ap.add_argument("--diffusion", default="diffusion", help="re-rank spec of the diffusion rows")
    ap.add_argument("--kreciprocal", default="kreciprocal", help="re-rank spec of the k-reciprocal rows")
    ap.add_argument("--sets", default="instance,ukbench56", help="which sets to run")
    ap.add_argument("--query-subset", type=int, default=0, metavar="N",
                    help="instance set: only every k-th query, N in all (0: all); query local features that are "
                         "not cached in the query store are then computed on the fly")
    ap.add_argument("--baseline-ms", default="", metavar="POST",
                    help="also rank with multi-scale R-MAC (scales 1,0.707,0.5) post-processed by each ';'-separated "
                         "POST (e.g. 'l2;pca-whiten:256,l2'), fitted on Flowers 17 images outside the database "
                         "(the baseline rows of the literature)")
    ap.add_argument("--fit-n", type=int, default=400, help="images of the separate set the baseline is fitted on")
    ap.add_argument("--out", default="bench-out/rerank.json")
    return ap.parse_args(argv)


def ensure_store(out: Path, inputs: list[str], size: str, locals_: list[str], **cfg) -> FeatureStore:
    if not (out / "meta.json").is_file() or not (out / "items.parquet").is_file():
        extract(ExtractConfig(inputs=inputs, output=str(out), size=size, progress="none", **cfg))
    st = FeatureStore(out)
    for spec in locals_:
        build_local_features(st, spec)
    return FeatureStore(out)


def query_local_ms(engine: SearchEngine, paths: list[str], local: str) -> float:
    """Milliseconds to compute the local features of a new query image (not cached)."""
    engine.query_local_features(image=paths[0], name=local)  # load the model once
    t0 = time.perf_counter()
    for p in paths:
        engine.query_local_features(image=p, name=local)
    return (time.perf_counter() - t0) * 1000 / len(paths)


def instance_gt(db: FeatureStore, q: FeatureStore, instance: Path) -> tuple[GroundTruth, list[str]]:
    """The relevant database images of each query: its original, and with ``--views V`` sets the
    V-1 other views of it (``queries.csv``'s ``relevant`` column); queries are not database items."""
    rows = {os.path.normpath(db.resolve_path(p)): i for i, p in enumerate(db.paths)}
    by_q = {}
    with open(instance / "queries.csv") as f:
        for r in csv.DictReader(f):
            by_q[Path(r["query"]).name] = ((r.get("relevant") or r["original"]).split(";"), r["edit"])
    queries, edits = [], []
    for p in q.paths:
        names, edit = by_q[Path(p).name]
        hit = []
        for name in names:
            want = os.sep + os.path.normpath(name)
            found = [i for k, i in rows.items() if k.endswith(want)]
            if len(found) != 1:
                raise SystemExit(f"relevant image {name} of {p} not found once in {db.path}")
            hit += found
        queries.append(Query(name=Path(p).stem, image=p, index=None, path=None, relevant=frozenset(hit)))
        edits.append(edit)
    return GroundTruth("instance", tuple(queries), len(db), source=str(instance)), edits


def baseline_ms(work: Path, inst: Path, flowers: Path, size: str, fit_n: int,
                pick: np.ndarray) -> tuple[FeatureStore, np.ndarray, np.ndarray]:
    """Multi-scale R-MAC (scales 1, 0.707, 0.5; no post-processing) of the database, the queries and
    *fit_n* Flowers 17 images outside the database (the separate set a PCA-whitening is learned on,
    drawn with seed 7). Returns (database store, query vectors, separate-set vectors)."""
    in_db = {Path(line).resolve() for line in (inst / "database.txt").read_text().split()}
    rest = sorted(p.resolve() for p in flowers.glob("*/*.jpg") if p.resolve() not in in_db)
    if len(rest) < fit_n:
        raise SystemExit(f"only {len(rest)} Flowers 17 images are outside the database; lower --fit-n")
    sep = [str(rest[i]) for i in sorted(np.random.default_rng(7).choice(len(rest), fit_n, replace=False))]
    listing = work / "fit_ms.txt"
    listing.write_text("".join(p + "\n" for p in sep))
    # torch: R-MAC's region grid is fixed when a graph is traced, so ONNX Runtime would export one
    # graph per image shape (seconds each, hundreds of shapes at long:512)
    ms = {"pooling": "rmac", "scales": (1.0, 0.707, 0.5), "post": "none", "backend": "torch"}
    fit = ensure_store(work / "fit_ms", [f"@{listing}"], size, [], **ms)
    db = ensure_store(work / "db_ms", [f"@{inst / 'database.txt'}"], size, [], **ms)
    qs = ensure_store(work / "q_ms", [str(inst / "queries")], size, [], **ms)
    return db, qs.vectors()[pick], fit.vectors()


def baseline_rows(args, work: Path, inst: Path, eng: SearchEngine, gt: GroundTruth, edits: list[str],
                  pick: np.ndarray) -> list[dict]:
    """One row per post-processing chain in ``--baseline-ms`` (';'-separated), fitted on the separate set."""
    from deepfeat.postprocess import PostChain

    db_ms, xq_raw, xfit = baseline_ms(work, inst, Path(args.flowers), args.size, args.fit_n, pick)
    if [os.path.normpath(db_ms.resolve_path(p)) for p in db_ms.paths] != \
            [os.path.normpath(eng.store.resolve_path(p)) for p in eng.store.paths]:
        raise SystemExit(f"{db_ms.path} does not list the database in the order of {eng.store.path}")
    rows = []
    for post in [p for p in args.baseline_ms.split(";") if p]:
        chain = PostChain.parse(post)
        if chain.needs_fit:
            chain.fit(xfit)
        xb, xq = chain.apply(db_ms.vectors()), chain.apply(xq_raw)
        t0 = time.perf_counter()
        ranks = np.argsort(-(xq @ xb.T), axis=1, kind="stable")
        ms = (time.perf_counter() - t0) * 1000 / len(xq)
        res = evaluate_ranks(ranks, gt, ks=(1, 10))
        aps = np.array([q.ap for q in res.queries])
        rows.append({"set": "instance", "method": f"baseline: R-MAC x 3 scales, {post} (fitted on {args.fit_n} "
                     "other images)", "step": {"baseline_ms": post}, "map": res.map, "p@1": res.mp_at_k[1],
                     "ns": None, "ms_rank": ms, "ms_verify": 0.0, "ms_added": float("nan"), "dims": int(xb.shape[1]),
                     "map_by_edit": {e: float(aps[[i for i, x in enumerate(edits) if x == e]].mean())
                                     for e in sorted(set(edits))}})
        print(f"[instance] {rows[-1]['method']}: mAP {100 * res.map:.2f}", flush=True)
    return rows


def rank(engine: SearchEngine, xq: np.ndarray, step: dict, query_rows) -> tuple[np.ndarray, float]:
    kw = {k: step[k] for k in ("qe", "alpha", "dba") if k in step}
    if step.get("rerank"):
        kw["rerank"] = step["rerank"]
        kw["query_rows"] = query_rows
    t0 = time.perf_counter()
    ranks = engine.rank_all(xq, **kw)
    return ranks, (time.perf_counter() - t0) * 1000 / len(xq)


def verify(engine: SearchEngine, ranks: np.ndarray, qcache, local: str, spec: str) -> tuple[np.ndarray, float]:
    return verify_rankings(ranks, qcache.__getitem__, engine.local_cache(local).__getitem__, parse_verify_spec(spec))


def methods(args, locals_: list[str]) -> list[tuple[str, dict]]:
    """The rows: each global-side step alone, QE + DBA and QE + k-reciprocal, then spatial verification
    of the top N alone and on top of each of them (the first local extractor; every extractor alone)."""
    qe, dba, a = int(args.qe), int(args.dba), args.alpha
    steps = [("", {}), (f" + QE ({qe}, alpha {a:g})", {"qe": qe, "alpha": a}),
             (f" + DBA ({dba}, alpha {a:g})", {"dba": dba, "alpha": a}),
             (" + QE + DBA", {"qe": qe, "dba": dba, "alpha": a})]
    if HAVE_RERANK:
        steps += [(f" + diffusion ({args.diffusion})", {"rerank": args.diffusion}),
                  (f" + k-reciprocal ({args.kreciprocal})", {"rerank": args.kreciprocal}),
                  (" + QE + k-reciprocal", {"qe": qe, "alpha": a, "rerank": args.kreciprocal})]
    m = [(("global" + label) if label else "global", step) for label, step in steps]
    for loc in locals_:
        m.append((f"global + verification ({loc}, top {args.verify})", {"verify": loc}))
    if locals_:
        m += [(f"global{label} + verification ({locals_[0]})", dict(step, verify=locals_[0]))
              for label, step in steps[3:]]  # QE + DBA, diffusion, k-reciprocal, QE + k-reciprocal
    return m


def run_set(name: str, engine: SearchEngine, xq: np.ndarray, gt: GroundTruth, qcache_of, query_rows, args,
            locals_: list[str], edits: list[str] | None = None) -> list[dict]:
    rows = []
    base_ms = None
    t0 = time.perf_counter()
    for loc in locals_:  # query local features first (cached, or computed now), outside the timings
        qc = qcache_of(loc)
        for i in range(len(gt.queries)):
            qc[i]
    print(f"[{name}] query local features ready in {time.perf_counter() - t0:.0f}s", flush=True)
    for label, step in methods(args, locals_):
        ranks, ms = rank(engine, xq, step, query_rows)
        vms = 0.0
        if step.get("verify"):
            ranks, vms = verify(engine, ranks, qcache_of(step["verify"]), step["verify"], args.verify)
        res = evaluate_ranks(ranks, gt, ks=(1, 10))
        if base_ms is None:
            base_ms = ms
        row = {"set": name, "method": label, "step": step, "map": res.map, "p@1": res.mp_at_k[1],
               "ns": res.ns_score, "ms_rank": ms, "ms_verify": vms, "ms_added": ms - base_ms + vms}
        if edits is not None:
            aps = np.array([q.ap for q in res.queries])
            row["map_by_edit"] = {e: float(aps[[i for i, x in enumerate(edits) if x == e]].mean())
                                  for e in sorted(set(edits))}
        rows.append(row)
        extra = f" N-S {res.ns_score:.3f}" if res.ns_score is not None else ""
        print(f"[{name}] {label}: mAP {100 * res.map:.2f}{extra}  (+{row['ms_added']:.1f} ms/query)", flush=True)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    locals_ = [s for s in args.local.split(",") if s]  # "" : no verification rows
    work, inst = Path(args.work), Path(args.instance)
    if not (inst / "queries.csv").is_file():
        raise SystemExit(f"{inst} has no queries.csv; run scripts/make_instance_set.py --out {inst} first")
    t0 = time.perf_counter()
    sets = args.sets.split(",")
    db = ensure_store(work / "db", [f"@{inst / 'database.txt'}"], args.size, locals_)
    qs = ensure_store(work / "q", [str(inst / "queries")], args.size, [] if args.query_subset else locals_)
    uk = ensure_store(work / "uk", [args.ukbench], args.size, locals_) if "ukbench56" in sets else None
    print(f"stores ready in {time.perf_counter() - t0:.0f}s", flush=True)
    out = []
    # instance set: queries from their own store
    eng = SearchEngine(db, use_index=False)
    if "instance" in sets:
        gt, edits = instance_gt(db, qs, inst)
        pick = np.arange(len(gt.queries))
        if args.query_subset:
            pick = pick[:: max(1, len(pick) // args.query_subset)][: args.query_subset]
            gt = GroundTruth(gt.protocol, tuple(gt.queries[i] for i in pick), gt.n_db, source=gt.source)
            edits = [edits[i] for i in pick]
        qpaths_all = [qs.resolve_path(qs.paths[i]) for i in pick]
        have = set((qs.meta.get("local_features") or {}))
        qcaches = {loc: (_Rows(LocalFeatureCache(qs, loc), pick) if loc in have
                         else _OnTheFly(eng, qpaths_all, loc)) for loc in locals_}
        out += run_set("instance", eng, qs.vectors()[pick], gt, qcaches.__getitem__, None, args, locals_, edits)
        if args.baseline_ms:
            out += baseline_rows(args, work, inst, eng, gt, edits, pick)
    if uk is not None:  # UKBench: every image a query, its own row
        eng_uk = SearchEngine(uk, use_index=False)
        gt_uk = parse_gt_spec("ukbench", eng_uk.paths)[0]
        rows_uk = [q.index for q in gt_uk.queries]
        ukc = {loc: eng_uk.local_cache(loc) for loc in locals_}
        out += run_set("ukbench56", eng_uk, eng_uk.xb[rows_uk], gt_uk, lambda loc: _Rows(ukc[loc], rows_uk),
                       rows_uk, args, locals_)
    qpaths = [qs.resolve_path(p) for p in qs.paths[:: max(1, len(qs) // 10)]]
    local_ms = {loc: query_local_ms(eng, qpaths, loc) for loc in locals_}
    doc = {"config": vars(args), "rerank_available": HAVE_RERANK, "machine": platform.platform(),
           "cpus": os.cpu_count(), "query_local_features_ms": local_ms, "rows": out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print(table(out))
    print("\nlocal features of a new query image (not cached), ms: "
          + ", ".join(f"{k} {v:.0f}" for k, v in local_ms.items()))
    print(f"written {args.out}")
    return 0


class _OnTheFly:
    """Query i -> local features computed from its file (once), like the cached ones."""

    def __init__(self, engine, paths, local):
        self.engine, self.paths, self.local, self.memo = engine, paths, local, {}

    def __getitem__(self, i):
        if i not in self.memo:
            self.memo[i] = self.engine.query_local_features(image=self.paths[i], name=self.local)
        return self.memo[i]


class _Rows:
    """Query i -> the cached local features of store row rows[i]."""

    def __init__(self, cache, rows):
        self.cache, self.rows = cache, rows

    def __getitem__(self, i):
        return self.cache[self.rows[i]]


def _num(v, fmt: str, scale: float = 1.0) -> str:
    return "-" if v is None or v != v else format(scale * v, fmt)


def table(rows: list[dict]) -> str:
    inst = [r for r in rows if r["set"] == "instance"]
    uk = {r["method"]: r for r in rows if r["set"] == "ukbench56"}
    edits = sorted(inst[0]["map_by_edit"]) if inst else []
    g = inst[0]["map"] if inst else float("nan")
    head = ("| method | instance mAP | gap closed | " + " | ".join(edits) + " | UKBench N-S | UKBench mAP "
            "| ms/query added (instance) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in inst:
        u = uk.get(r["method"], {})
        closed = (r["map"] - g) / (1 - g) if g < 1 else float("nan")
        lines.append(f"| {r['method']} | {100 * r['map']:.2f} | {100 * closed:+.0f}% | "
                     + " | ".join(f"{100 * r['map_by_edit'][e]:.2f}" for e in edits)
                     + f" | {_num(u.get('ns'), '.3f')} | {_num(u.get('map'), '.2f', 100)} | "
                       f"{_num(r['ms_added'], '.1f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
