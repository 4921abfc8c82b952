"""``deepfeat finetune``: fine-tune a model on labelled images; the run is a model spec."""

from __future__ import annotations

import argparse
import json
import sys

from deepfeat.models.default import DEFAULT_MODEL

S = argparse.SUPPRESS


def register(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a model on your labelled images (class folders or a path,label CSV)",
        description="Check the images, split them per class (seeded), fill small classes with augmented copies, "
                    "replace the classifier by a new head for your classes, train the head alone and then the "
                    "backbone end to end (snapshots every K epochs, resumable), and write RUN_DIR, usable as the "
                    "model spec finetuned:RUN_DIR by classify, extract and sweep. --eval-retrieval prints the "
                    "retrieval mAP on the validation split before and after. See docs/finetune.md.",
        argument_default=S)
    _positional_args(p)
    _model_args(p.add_argument_group("model"))
    _data_args(p.add_argument_group("data"))
    t = p.add_argument_group("training")
    _training_args(t)
    _loss_args(t)
    _snapshot_args(p.add_argument_group("snapshots and evaluation"))
    p.set_defaults(func=run)


def _positional_args(p) -> None:
    p.add_argument("data", nargs="?", metavar="DATA",
                   help="folder with one sub-folder per class, or a CSV file of path,label rows "
                        "(may be omitted with --resume)")
    p.add_argument("-o", "--output", required=True, metavar="RUN_DIR", help="run directory (created)")


def _model_args(g) -> None:
    g.add_argument("--model", "-m", metavar="SPEC", help=f"base model spec (default {DEFAULT_MODEL})")
    g.add_argument("--device", metavar="auto|cpu|cuda", help="where to train (default auto)")
    g.add_argument("--image-size", type=int, metavar="S", help="train and use the model at S x S (default: the "
                                                               "model's own input size)")
    g.add_argument("--train-blocks", metavar="all|N|UNIT",
                   help="what the full stage trains besides the head: the last N backbone units (default 3), all, "
                        "or a unit name and everything after it (units are listed in the run's first line)")
    g.add_argument("--bn", choices=["frozen", "train"],
                   help="BatchNorm statistics: frozen (default; eval mode, right for small batches) or train")


def _data_args(d) -> None:
    d.add_argument("--val-frac", type=float, metavar="F", help="validation fraction per class (default 0.4)")
    d.add_argument("--seed", type=int, metavar="N", help="seed of the split, order, augmentation, head (default 0)")
    d.add_argument("--per-class", type=int, metavar="N",
                   help="fill classes with fewer than N training images up to N with augmented copies "
                        "(default 0: no filling; large classes are never cut)")
    d.add_argument("--augment", choices=["fill", "all", "none"],
                   help="which samples are augmented in training: fill = only the fill-up copies (default), "
                        "all = every sample every epoch, none")
    d.add_argument("--save-augmented", action="store_true", help="also write the fill-up copies to RUN_DIR/augmented")
    d.add_argument("--exclude-odd", action="store_true",
                   help="also exclude odd but readable images (CMYK, grayscale, 16-bit, EXIF-rotated, tiny...)")
    d.add_argument("--workers", type=int, metavar="N", help="image loading threads (default: cores, max 4)")
    d.add_argument("--cache-images", choices=["auto", "on", "off"],
                   help="keep decoded images in memory (auto: when they fit in 2 GiB)")
    d.add_argument("--cache-prefix", choices=["auto", "off"],
                   help="compute the frozen layers before the first trained unit once per un-augmented image "
                        "and cache them (auto, default; checked for equivalence before use)")


def _training_args(t) -> None:
    """The optimizer and its schedule."""
    t.add_argument("--head-epochs", type=int, metavar="N", help="stage 1, head only (default 10; 0 skips it)")
    t.add_argument("--epochs", type=int, metavar="N", help="stage 2, head + backbone (default 6; 0 skips it)")
    t.add_argument("--iters-per-epoch", type=int, metavar="N", help="iterations per epoch (default: one pass)")
    t.add_argument("--batch-size", type=int, metavar="N", help="default 16")
    t.add_argument("--lr", type=float, metavar="LR", help="backbone learning rate (default 0.01)")
    t.add_argument("--head-stage-lr", type=float, metavar="LR",
                   help="base learning rate of stage 1, multiplied like --lr (default 0.001)")
    t.add_argument("--head-lr-mult", type=float, metavar="X", help="head weight lr = lr x X (default 10)")
    t.add_argument("--head-bias-lr-mult", type=float, metavar="X", help="head bias lr = lr x X (default 20)")
    t.add_argument("--momentum", type=float, metavar="M", help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=float, metavar="WD", help="default 5e-4 (not on biases and BN)")
    t.add_argument("--schedule", choices=["cosine", "step", "constant"], help="per stage (default cosine)")
    t.add_argument("--lr-step", type=int, metavar="E", help="step schedule: epochs per step (default stage/3)")
    t.add_argument("--lr-gamma", type=float, metavar="G", help="step schedule: factor per step (default 0.1)")
    t.add_argument("--warmup-iters", type=int, metavar="N", help="linear warm-up iterations per stage (default 0)")
    t.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm (default 0: off)")
    t.add_argument("--amp", choices=["auto", "on", "off"], help="mixed precision (auto: on with CUDA)")
    t.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")


def _loss_args(t) -> None:
    """The loss, the head and the metric-learning options."""
    t.add_argument("--loss", choices=["ce", "contrastive", "triplet"],
                   help="stage 2 loss: ce (classification, default), contrastive or triplet (metric learning with "
                        "hard negatives and learned GeM, Radenovic et al.)")
    t.add_argument("--head", choices=["auto", "linear", "cosine"],
                   help="the new classifier: cosine (scale x cosine of the L2-normalised features and class "
                        "weights, no bias: clusters the descriptor by class) or linear (Caffe-style); auto "
                        "(default): cosine where the classifier is a Linear layer, else linear")
    t.add_argument("--head-scale", type=float, metavar="S", help="--head cosine: the logit scale (default 16)")
    t.add_argument("--margin", type=float, metavar="M", help="metric-learning margin (default 0.7 contrastive, "
                                                             "0.1 triplet)")
    t.add_argument("--neg-num", type=int, metavar="N", help="hard negatives per query (default 5)")
    t.add_argument("--tuples", type=int, metavar="N", help="queries per metric-learning epoch (default: all)")
    t.add_argument("--whiten", type=int, metavar="DIM",
                   help="contrastive/triplet: learn a DIM-d whitening after GeM end to end (saved as RUN/whitening.npz, "
                        "for extract --post)")


def _snapshot_args(s) -> None:
    s.add_argument("--snapshot-every", type=int, metavar="K", help="snapshot every K epochs (default 1; and at "
                                                                   "the end of each stage)")
    s.add_argument("--keep-snapshots", type=int, metavar="N", help="keep only the last N snapshots (default all)")
    s.add_argument("--val-every", type=int, metavar="K", help="validate every K epochs (default 1)")
    s.add_argument("--resume", nargs="?", const=True, metavar="SNAPSHOT",
                   help="continue the run in RUN_DIR from its latest snapshot (or SNAPSHOT); its data and model "
                        "settings are kept, other options may be changed")
    s.add_argument("--eval-retrieval", action="store_true",
                   help="retrieval mAP / mP@10 on the validation split before and after, side by side")
    s.add_argument("--eval-layer", metavar="NAME", help="the run's descriptor layer: measured by --eval-retrieval, recorded in meta.json, "
                        "used by extract --model finetuned:RUN (default: the last feature map)")
    s.add_argument("--eval-pool", metavar="SPEC", help="the run's descriptor pooling, as --eval-layer (default: avg; metric losses: GeM with "
                        "the learned p)")
    s.add_argument("--progress", choices=["auto", "bar", "lines", "none"])
    s.add_argument("--json", action="store_true", help="print the result as JSON")


def build_config(args: argparse.Namespace):
    """The :class:`FinetuneConfig` of the given options (defaults for the others; with
    --resume, the run's saved settings for the others)."""
    from pathlib import Path

    from deepfeat.finetune.config import FinetuneConfig

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "verbose", "json")}
    cfg = FinetuneConfig()
    if given.get("resume"):
        saved = Path(given["output"]) / "config.json"
        if saved.is_file():
            old = json.loads(saved.read_text(encoding="utf-8"))["config"]
            for k, v in old.items():
                if hasattr(cfg, k) and k != "resume":
                    setattr(cfg, k, v)
    for k, v in given.items():
        setattr(cfg, k, v)
    if cfg.data is None:
        cfg.data = ""
    return cfg


def run(args) -> int:
    from deepfeat.finetune.retrieval import comparison_table
    from deepfeat.finetune.train import finetune

    cfg = build_config(args)
    try:
        res = finetune(cfg)
    except KeyboardInterrupt:
        print(f"\ninterrupted: snapshots are kept in {cfg.output}/snapshots; continue with "
              f"`deepfeat finetune -o {cfg.output} --resume`", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(res.to_dict(), indent=2, default=str))
        return 0
    for e in res.excluded:
        print(f"EXCLUDED {e['path']}: {e['reason']}")
    for e in res.odd:
        print(f"ODD      {e['path']}: {e['reason']} (kept)")
    print(f"{len(res.classes)} classes, {res.n_train} train / {res.n_val} val images, {len(res.excluded)} excluded; "
          f"{res.n_samples} samples per epoch after balancing")
    if res.val_accuracy is not None:
        print(f"validation accuracy: {100 * res.val_accuracy:.2f}%")
    if res.retrieval and "before" in res.retrieval and "after" in res.retrieval:
        from deepfeat.finetune.retrieval import read_json

        doc = read_json(f"{res.run_dir}/retrieval.json") or {}
        pb = doc.get("pooling_before")
        print(f"\nretrieval on the validation split ({doc.get('n_queries')} queries; the descriptor extract "
              f"--model {res.spec} uses: layer {doc.get('layer')}, pooling {doc.get('pooling')}, L2"
              + (f"; off-the-shelf with {pb}" if pb and pb != doc.get("pooling") else "") + "):")
        print(comparison_table(res.retrieval["before"], res.retrieval["after"]))
        for key, what in (("after_learned_pooling", "learned pooling {pooling}"),
                          ("after_learned_whitening", "learned pooling {pooling} + whitening {file}")):
            r = res.retrieval.get(key)
            if r:
                print(f"fine-tuned with {what.format(**r)}: mAP {100 * r['map']:.2f}, "
                      f"mP@10 {100 * r['mp_at_k']['10']:.2f}")
    for w in res.warnings:
        print(f"WARNING: {w}", file=sys.stderr)
    if res.failures:
        print(f"{len(res.failures)} image(s) failed to decode during training and were skipped", file=sys.stderr)
    print(f"\nrun time {res.seconds:.0f}s; model: {res.spec} (RUN_DIR/meta.json, model.safetensors)")
    return 0

