"""``deepfeat extract``: images -> feature store, fast, robust and resumable."""

from __future__ import annotations

import json
import sys

from deepfeat.cli.common import add_model_args
from deepfeat.cli.recipe_args import add_recipe_arg, apply_recipe, given
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.pipeline.signals import Terminated, sigterm_interrupts
from deepfeat.specs import parse_scales

RECIPE_FLAGS = {"model": "extract.model", "layer": "extract.layer", "pool": "extract.pooling",
                "scales": "extract.scales", "size": "extract.size", "post": "extract.post"}


def register(sub) -> None:
    p = sub.add_parser(
        "extract", help="extract pooled layer features of many images into a feature store",
        description="Decode images in parallel, run the network, pool the tapped layer(s) and write shards of a "
                    "feature store. Bad images are recorded and skipped. Re-running the same command (or "
                    "--resume) continues an interrupted run; new inputs are appended.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="folders, files, glob patterns or @list.txt")
    p.add_argument("-o", "--output", required=True, metavar="STORE", help="feature store directory")
    add_model_args(p, labels=False)
    p.add_argument("--layer", default="default", metavar="NAME[,NAME...]",
                   help="layer(s) to tap (default: the last feature map; see `deepfeat layers`)")
    p.add_argument("--pool", default="default", metavar="NAME[:ARGS]",
                   help="pooling, e.g. gem:p=3, mac, rmac:L=3, crow (default: the model's own, e.g. the descriptor "
                        "recorded by a finetuned:RUN, else gem)")
    p.add_argument("--post", default="l2", metavar="CHAIN",
                   help="post-processing applied on read, e.g. l2 or pca-whiten:128,l2 (default l2), or a saved "
                        "chain file (.npz, e.g. a fine-tuning run's whitening.npz)")
    p.add_argument("--fit-on", metavar="STORE", help="fit PCA/whitening on this other store's features")
    p.add_argument("--pool-fit", metavar="FILE", help="a fitted codebook for poolings that learn one (mop)")
    p.add_argument("--pool-fit-samples", type=int, default=500, metavar="N",
                   help="else fit the codebook on N of the inputs (default 500)")
    p.add_argument("--size", default="model", metavar="POLICY",
                   help="model | short:S | long:S | warp:S | warp:HxW | native (default model)")
    p.add_argument("--scales", default="1", metavar="S1,S2,...", help="multi-scale factors, e.g. 1,0.707,0.5")
    p.add_argument("--scale-combine", default="sum", choices=["sum", "gem"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "openvino"],
                   help="auto (default): on the CPU OpenVINO where installed for aspect-preserving sizes and "
                        "--scales, else ONNX Runtime; torch on CUDA (docs/onnx.md)")
    p.add_argument("--precision", default="f32", choices=["f32", "bf16"],
                   help="inference precision: f32 (default, the same descriptors as torch), or bf16: OpenVINO on a "
                        "CPU with AMX/AVX512_BF16, faster, descriptors within cosine 0.99 of f32 (docs/onnx.md)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="inference threads (ONNX Runtime intra-op, or torch); default: from the core count, "
                        "see docs/benchmarks.md")
    p.add_argument("--no-cache", dest="graph_cache", action="store_false",
                   help="do not use the user cache folder ($DEEPFEAT_CACHE, else ~/.cache/deepfeat): export the "
                        "ONNX/OpenVINO graph afresh, build the network in PyTorch, and with --sync read again "
                        "the files whose stat changed (docs/startup.md)")
    p.add_argument("--compile", action="store_true",
                   help="torch backend: torch.compile the feature network (for GPUs; falls back to eager if it fails)")
    p.add_argument("--pad-to", type=int, default=None, metavar="M",
                   help="aspect-preserving sizes, torch: batch images of different shapes padded to multiples of M "
                        "(e.g. 32), pooled with a mask (sum/avg/spoc/mac/gem only); for GPUs. Descriptors then "
                        "differ slightly at the image borders (docs/benchmarks.md)")
    p.add_argument("--batch-size", type=int, default=None, metavar="N", help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decode processes (default: cores, inline for 4 images or fewer; 0 = inline); with --engine ray: decode threads per actor "
                        "(default: --cpus-per-actor)")
    p.add_argument("--decode-in", default="processes", choices=["processes", "threads"])
    p.add_argument("--decode-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="seconds one image may take to decode before its worker process is killed and replaced and "
                        "the image reported as failed (default 120; 0 = no limit; decode processes only)")
    p.add_argument("--shard-size", type=int, default=1024, metavar="N", help="images per shard (commit unit)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    p.add_argument("--no-draft", dest="draft", action="store_false", help="always decode JPEGs at full size")
    p.add_argument("--resume", action="store_true",
                   help="continue the store's run with its own settings (inputs and flags may be omitted)")
    p.add_argument("--sync", action="store_true",
                   help="bring an existing store in line with the inputs: new files added, changed ones (size or "
                        "mtime, then content hash) extracted again, deleted ones removed, the index refreshed; a "
                        "report of each; without INPUTs, the folders the store was extracted from (= `deepfeat sync "
                        "STORE`)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N inputs")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "none"])
    g = p.add_argument_group("distributed extraction (pip install 'deepfeat[ray]'; see docs/scaling.md)")
    g.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local (this machine) or ray (an actor pool on a Ray cluster; the store directory must be "
                        "on a file system every node shares)")
    g.add_argument("--ray-address", metavar="auto|HOST:PORT",
                   help="the Ray cluster to join (default: $RAY_ADDRESS, else a new local instance)")
    g.add_argument("--num-actors", type=int, metavar="N",
                   help="model replicas (default: as many as the cluster's CPUs, or GPUs, allow)")
    g.add_argument("--gpus-per-actor", type=float, default=0.0, metavar="G", help="GPUs per actor (default 0)")
    g.add_argument("--cpus-per-actor", type=float, default=1.0, metavar="C",
                   help="CPUs per actor, for its inference threads and decode threads (default 1)")
    p.add_argument("--local-features", metavar="cnn|sift|orb|regions[:ARGS]",
                   help="also cache local features for `search/eval --verify`, or regional descriptors for "
                        "`--rerank regional-diffusion` (see `deepfeat local-features`)")
    p.add_argument("--json", action="store_true", help="print the run report as JSON")
    add_recipe_arg(p, RECIPE_FLAGS)
    p.set_defaults(func=run)


#: extract's flags (dests) that set a store setting -> the ExtractConfig field (deepfeat.pipeline.append)
SETTING_FLAGS = {"model": "model", "layer": "layers", "pool": "pooling", "post": "post", "size": "size",
                 "scales": "scales", "scale_combine": "scale_combine", "dtype": "dtype", "draft": "draft"}


def _given_settings(args) -> frozenset[str]:
    """The store settings given on the command line (or by --recipe): a flag with a marked default
    counts when it is not that default; the others when they differ from the parser's default."""
    parser_defaults = {"scale_combine": "sum", "dtype": "float32", "draft": True}
    out = set()
    for dest, field in SETTING_FLAGS.items():
        v = getattr(args, dest, None)
        if dest in parser_defaults:
            if v != parser_defaults[dest]:
                out.add(field)
        elif given(v):
            out.add(field)
    return frozenset(out)


def run(args) -> int:
    from deepfeat.errors import UsageError

    if not args.inputs and not args.resume and not args.sync:
        raise UsageError("give INPUT folders/files/globs/@list.txt, or --resume (or --sync) an existing store")
    post_given = given(args.post)
    recipe = apply_recipe(args, "extract")
    if recipe and args.fit_on and not post_given and recipe["extract"]["post"] != recipe["extract"]["post_spec"]:
        raise UsageError(f"--fit-on refits the post-processing, but the recipe's ({recipe['extract']['post_spec']}) "
                         f"is already fitted ({recipe['extract']['post']}); give --post CHAIN with --fit-on to "
                         "refit it, or leave --fit-on out")
    if args.local_features:
        from deepfeat.localfeat.features import parse_local_spec

        parse_local_spec(args.local_features)  # a bad spec fails before extracting
    cfg = ExtractConfig(
        inputs=args.inputs, output=args.output, model=args.model,
        layers=[s for s in args.layer.split(",") if s.strip()], pooling=args.pool, post=args.post,
        size=args.size, scales=parse_scales(args.scales), scale_combine=args.scale_combine,
        backend=args.backend, precision=args.precision, device=args.device, batch_size=args.batch_size,
        workers=args.workers,
        decode_in=args.decode_in, decode_timeout=args.decode_timeout or None, resume=args.resume, limit=args.limit,
        dtype=args.dtype,
        threads=args.threads, compile=args.compile, graph_cache=args.graph_cache, pad_to=args.pad_to,
        shard_size=args.shard_size, draft=args.draft, fit_on=args.fit_on, progress=args.progress,
        pool_fit=args.pool_fit, pool_fit_samples=args.pool_fit_samples, engine=args.engine,
        ray_address=args.ray_address, num_actors=args.num_actors, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, given=_given_settings(args),
    )
    try:
        with sigterm_interrupts():
            if args.sync:
                from deepfeat.collection.sync import sync_store

                rep = sync_store(cfg)
            elif args.resume:  # it may finish an interrupted sync: its index is brought up to date too
                from deepfeat.collection.sync import refresh_saved_index

                rep = extract(cfg, after=refresh_saved_index)
            else:
                rep = extract(cfg)
    except KeyboardInterrupt as e:
        what, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"\n{what}: committed shards are kept in {args.output}; run the same command again "
              "(or `deepfeat extract --resume -o STORE`) to continue", file=sys.stderr)
        return code
    if args.json and not args.local_features:
        print(json.dumps(rep.to_dict(paths=True), indent=2))
    elif not args.json:
        print_sync(rep, verbose=getattr(args, "verbose", 0))
        st = ", ".join(f"{k} {v:.1f}s" for k, v in rep.stage_seconds.items())
        print(f"{rep.processed} images in {rep.seconds:.1f}s ({rep.images_per_s:.1f} img/s, "
              f"{rep.steady_images_per_s:.1f} after the first batch): "
              f"{rep.ok} ok, {rep.failed} failed; {rep.skipped_shards} shard(s) were already done")
        print(f"stages: {st}" + (f"; backend {rep.backend}" if rep.backend else ""))
        print(f"store: {rep.store} ({rep.planned} items planned)")
        _say_rounding(args.output)
        if rep.failures_report:
            print(f"failures: {rep.failures_report}")
    if args.local_features and (rep.ok or rep.skipped_shards):
        from deepfeat.cli.cmd_local_features import print_report
        from deepfeat.localfeat.cache import build_local_features

        try:
            lrep = build_local_features(args.output, args.local_features, device=args.device)
        except KeyboardInterrupt:
            print("\ninterrupted: run the same command again to finish the local features", file=sys.stderr)
            return 130
        if args.json:
            print(json.dumps({**rep.to_dict(paths=True), "local_features": lrep}, indent=2))
        else:
            print_report(lrep, args.output)
    return 0 if rep.ok or rep.skipped_shards else 1


def print_sync(rep, verbose: int = 0) -> None:
    """A sync's lines: the counts (``sync: 1 added, 1 changed, ...``), with ``-v`` the paths of each
    change, and what became of the index."""
    if rep.sync is None:
        return
    counts = rep.sync["counts"]
    line = ", ".join(f"{counts[k]} {k}" for k in ("added", "changed", "deleted", "unchanged", "failed"))
    extra = [f"{counts[k]} {k}" for k in ("retried", "pending") if counts.get(k)]
    if rep.sync.get("unchecked"):
        extra.append(f"{rep.sync['unchecked']} could not be checked (extracted before deepfeat recorded its files; "
                     "taken as unchanged while they exist)")
    print("sync: " + ", ".join([line, *extra]))
    if verbose and rep.sync_paths:
        for k in ("added", "changed", "deleted", "retried"):
            for path in rep.sync_paths[k]:
                print(f"  {k}: {path}")
    if rep.index:
        print(f"index: {rep.index}")


def _say_rounding(store: str) -> None:
    """Transformers: say that aspect-preserving sizes were rounded to the patch stride."""
    from deepfeat.store import FeatureStore

    dc = FeatureStore(store).meta.get("model", {}).get("data_config", {})
    if int(dc.get("size_multiple", 1) or 1) > 1:
        print(f"sizes: rounded to multiples of {dc['size_multiple']} pixels (the network's patch stride)")
