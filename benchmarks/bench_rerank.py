"""Re-ranking and spatial verification on UKBench and an instance set, side by side in one run.

    python scripts/make_instance_set.py --out bench-out/instance-set
    python benchmarks/bench_rerank.py --work bench-out/rerank --instance bench-out/instance-set

Stores (made once in ``--work`` if missing, with the same settings for all: the
embedded EfficientNet-Lite0, its last feature map, GeM, L2, ``--size long:512``):

* ``db``: all of Flowers 17 (1360 images): the instance set's database, the 200
  originals among the distractors;
* ``q``: the instance set's 600 queries (edited copies, ``scripts/make_instance_set.py``),
  kept out of the database so that nothing done to the database (DBA, diffusion's
  graph) ever sees them;
* ``uk``: ``ukbench56`` (every image a query, its group of 4 relevant, N-S score);

each with cached local features (``deepfeat local-features``: ``cnn`` and ``sift``).

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
from deepfeat.local_store import LocalFeatureCache, build_local_features
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.search import SearchEngine
from deepfeat.store import FeatureStore
from deepfeat.verify import parse_verify_spec, verify_rankings

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
    ap.add_argument("--out", default="bench-out/rerank.json")
    return ap.parse_args(argv)


def ensure_store(out: Path, inputs: list[str], size: str, locals_: list[str]) -> FeatureStore:
    if not (out / "meta.json").is_file() or not (out / "items.parquet").is_file():
        extract(ExtractConfig(inputs=inputs, output=str(out), size=size, progress="none"))
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
    """One relevant database image per query (its original); queries are not database items."""
    rows = {os.path.normpath(p): i for i, p in enumerate(db.paths)}
    root = Path(db.meta.get("root", "."))
    by_q = {}
    with open(instance / "queries.csv") as f:
        for r in csv.DictReader(f):
            by_q[Path(r["query"]).name] = (r["original"], r["edit"])
    queries, edits = [], []
    for p in q.paths:
        orig, edit = by_q[Path(p).name]
        want = os.path.normpath(orig)
        hit = [i for k, i in rows.items() if k == want or k.endswith(os.sep + want)]
        if len(hit) != 1:
            raise SystemExit(f"original {orig} of {p} not found once in {db.path} (root {root})")
        queries.append(Query(name=Path(p).stem, image=p, index=None, path=None, relevant=frozenset(hit)))
        edits.append(edit)
    return GroundTruth("instance", tuple(queries), len(db), source=str(instance)), edits


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
    qe, dba = int(args.qe), int(args.dba)
    m = [("global", {}), (f"+ QE (alpha-QE {qe}, alpha {args.alpha:g})", {"qe": qe, "alpha": args.alpha}),
         (f"+ DBA ({dba}, alpha {args.alpha:g})", {"dba": dba, "alpha": args.alpha}),
         ("+ QE + DBA", {"qe": qe, "dba": dba, "alpha": args.alpha})]
    if HAVE_RERANK:
        m += [(f"+ diffusion ({args.diffusion})", {"rerank": args.diffusion}),
              (f"+ k-reciprocal ({args.kreciprocal})", {"rerank": args.kreciprocal})]
    for loc in locals_:
        m.append((f"+ verification ({loc}, top {args.verify})", {"verify": loc}))
    if locals_:
        m.append((f"+ QE + DBA + verification ({locals_[0]})", {"qe": qe, "dba": dba, "alpha": args.alpha,
                                                                 "verify": locals_[0]}))
    if HAVE_RERANK:
        m += [(f"+ diffusion + verification ({loc})", {"rerank": args.diffusion, "verify": loc}) for loc in locals_]
        m += [(f"+ k-reciprocal + verification ({loc})", {"rerank": args.kreciprocal, "verify": loc})
              for loc in locals_]
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
    db = ensure_store(work / "db", [args.flowers], args.size, locals_)
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
                     + f" | {u.get('ns', float('nan')):.3f} | {100 * u.get('map', float('nan')):.2f} | "
                       f"{r['ms_added']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
