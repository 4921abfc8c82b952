"""What a fine-tuning run reports: the run's descriptor and its before/after retrieval
(:class:`RetrievalRecord`, ``retrieval.json``, the warning when only the classifier
learned), and at the end ``model.safetensors`` and ``meta.json`` (the run as the model spec
``finetuned:RUN``) and the :class:`FinetuneResult`."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from deepfeat import __version__
from deepfeat.finetune import data as D
from deepfeat.finetune import retrieval as R
from deepfeat.finetune.config import FinetuneConfig, FinetuneResult
from deepfeat.finetune.network import TrainedNetwork
from deepfeat.finetune.prepared import Loaders, PreparedData
from deepfeat.finetune.progress import TrainingProgress
from deepfeat.finetune.rundir import RunDirectory
from deepfeat.finetune.snapshots import now
from deepfeat.finetune.state import TrainingState
from deepfeat.finetune.whitening import WHITENING_FILE
from deepfeat.models.finetuned import META_FORMAT
from deepfeat.models.heads import HEAD_NAME, head_spec

if TYPE_CHECKING:
    from deepfeat.finetune.metric import MetricLearner
    from deepfeat.finetune.passes import Passes, Retrieval

log = logging.getLogger(__name__)

__all__ = ["ACCURACY_RISE_MIN", "META_FORMAT", "RETRIEVAL_GAIN_MIN", "RetrievalRecord", "final_val_acc", "result",
           "retrieval_warning", "save_model"]

#: --eval-retrieval warns when accuracy rose but the mAP gain is below this (absolute)
RETRIEVAL_GAIN_MIN = 0.01
#: ... "accuracy rose": final validation accuracy at least this far above chance (1/classes)
ACCURACY_RISE_MIN = 0.05


class RetrievalRecord:
    """The run's descriptor and what ``--eval-retrieval`` measured of it: ``results`` (the
    ``before``/``after`` summaries and per-class mAPs, the gain, the warning, in the order
    ``retrieval.json`` lists them) and ``after_eval``, the latest measurement of the trained
    network."""

    def __init__(self, cfg: FinetuneConfig, run: RunDirectory, network: TrainedNetwork,
                 metric: MetricLearner | None, n_queries: int):
        self.cfg = cfg
        self.run = run
        self.network = network
        self.metric = metric
        self.n_queries = n_queries
        self.results: dict[str, Any] = {}
        self.after_eval: Retrieval | None = None

    def descriptor(self) -> dict[str, str]:
        """The run's descriptor: what --eval-retrieval measures and ``extract --model
        finetuned:RUN`` uses without --layer/--pool (recorded in meta.json)."""
        pool = f"gem:p={self.metric.p:.6g}" if self.metric is not None else self.network.pool_spec()
        d = {"layer": self.network.eval_layer, "pooling": pool, "post": "l2",
             "chosen_by": "options" if (self.cfg.eval_layer not in ("default", "") or
                                        self.cfg.eval_pool not in ("default", "")) else "default"}
        if self.metric is not None and self.metric.whiten is not None:
            d["whitening"] = WHITENING_FILE  # applied with extract --post RUN/whitening.npz
        return d

    @property
    def has_before(self) -> bool:
        return "before" in self.results

    def before_numbers(self) -> dict[str, float]:
        """The base model's mAP and mP@10, for the log entries of the head stage (the
        backbone is frozen: its descriptors are the base model's)."""
        b = self.results["before"]
        return {"val_map": b["map"], "val_mp10": b["mp_at_k"]["10"]}

    def reuse_before(self) -> None:
        """--resume: the "before" retrieval of the run's ``retrieval.json``, when it measured
        the same descriptor at the same size."""
        prev = self.run.read_retrieval()
        if prev and prev.get("layer") == self.network.eval_layer and \
                prev.get("pooling_before", prev.get("pooling")) == self.network.pool_spec() and \
                prev.get("image_size") == list(self.network.data_config.input_size) and "before" in prev:
            self.results["before"] = prev["before"]
            self.results["before_per_class"] = prev.get("before_per_class", {})

    def set_before(self, ev: Retrieval) -> None:
        self.results["before"] = R.summary(ev[0])
        self.results["before_per_class"] = ev[1]
        self.write()

    def finish(self, passes: Passes, val_acc: float | None, progress: TrainingProgress) -> None:
        """After training: the "after" mAP (with a metric loss, of the learned pooling and
        whitening), the gain, the warning; written to ``retrieval.json``."""
        if self.metric is not None:
            self._learned(passes)
        if self.after_eval is None and "after" not in self.results:
            v = passes.validate(True)
            self.after_eval = v.retrieval if v is not None else None
        if self.after_eval is not None:
            self.results["after"] = R.summary(self.after_eval[0])
            self.results["after_per_class"] = self.after_eval[1]
        if "before" in self.results and "after" in self.results:
            b, a = self.results["before"], self.results["after"]
            self.results["gain"] = {"map": a["map"] - b["map"],
                                    **{f"mp@{k}": a["mp_at_k"][k] - b["mp_at_k"][k] for k in a["mp_at_k"]}}
            warning = retrieval_warning(val_acc, len(passes.data.classes), b["map"], a["map"], self.descriptor())
            if warning:
                log.warning("%s", warning)
                if self.cfg.progress != "none":
                    progress.line(f"warning: {warning}")
                self.results["warning"] = warning
        self.write()

    def _learned(self, passes: Passes) -> None:
        """The retrieval of the learned pooling (what "after" then reports) and whitening."""
        pool = f"gem:p={self.metric.p:.6g}"
        v = passes.validate(True, pool=pool)
        if v is None or v.retrieval is None:
            return
        self.results["after_learned_pooling"] = {"pooling": pool, **R.summary(v.retrieval[0])}
        self.after_eval = v.retrieval  # the descriptor extract uses (the learned p): what "after" reports
        if self.metric.whiten is not None:
            desc, kept = v.desc
            ev = passes.evaluate(self.metric.describe_np(desc), kept)
            self.results["after_learned_whitening"] = {
                "pooling": pool, "post": self.metric.whitening_chain().spec,
                "file": str(self.run.path / WHITENING_FILE), **R.summary(ev[0])}

    def write(self) -> None:
        d = self.descriptor()
        doc = {"protocol": "every validation image a query; relevant = same class; query excluded",
               "layer": d["layer"], "pooling": d["pooling"], "post": d["post"],
               "pooling_before": self.network.pool_spec(),
               "image_size": list(self.network.data_config.input_size), "n_queries": self.n_queries,
               **self.results}
        if "before" in self.results and "after" in self.results:
            doc["table"] = R.comparison_table(self.results["before"], self.results["after"]).splitlines()
        self.run.write_retrieval(doc)


def final_val_acc(state: TrainingState, metric: MetricLearner | None) -> float | None:
    """The run's validation accuracy: of the re-fitted head with a metric loss, else of the
    last validated epoch."""
    if metric is not None and metric.refit.get("val_acc") is not None:
        return metric.refit["val_acc"]
    return state.last_val_acc


def save_model(cfg: FinetuneConfig, run: RunDirectory, network: TrainedNetwork, data: PreparedData,
               state: TrainingState, record: RetrievalRecord, metric: MetricLearner | None,
               seconds: float) -> dict[str, Any]:
    """Write ``model.safetensors`` (and ``whitening.npz``) and ``meta.json``; returns the meta."""
    from deepfeat.models.base import file_sha256

    sd = {k: v.contiguous() for k, v in network.checkpoint().items()}
    path = run.save_weights(sd, {"format": META_FORMAT, "head": HEAD_NAME})
    best = state.best
    base_meta = network.base.meta()
    base_meta.pop("data_config", None)
    meta = {
        "format": META_FORMAT,
        "deepfeat_version": __version__,
        "created": run.created,
        "finished": now(),
        "base_model": base_meta,
        "classes": list(data.classes),
        "num_classes": data.n_classes,
        "head": {"name": HEAD_NAME, "module": network.head_module, **head_spec(network.head)},
        "data_config": network.data_config.to_dict(),
        "default_layer": network.eval_layer,
        "descriptor": record.descriptor(),
        "weights": path.name,
        "weights_sha256": file_sha256(path),
        "training": {**cfg.to_dict(), "resume": None, "trainable_units": network.train_units,
                     "augmentation": data.aug.to_dict() if data.aug else None,
                     "head_trained_on_precomputed_features": bool(network.head_is_last),
                     "cached_prefix": [network.prefix.names[0], network.prefix.last] if network.prefix else None},
        "data": {"root": data.root, "n_train": len(data.train), "n_val": len(data.val),
                 "n_samples": len(data.samples), "excluded": len(data.excluded), "odd": len(data.odd),
                 "class_counts": D.balance_counts(data.train, data.n_classes),
                 "balanced_counts": D.balance_counts(data.samples, data.n_classes)},
        "epochs_done": state.history[-1].epoch if state.history else 0,
        "val_accuracy": final_val_acc(state, metric),
        "best_val_accuracy": best.val_acc if best else None,
        "best_epoch": best.epoch if best else None,
        "seconds": round(seconds + state.seconds_before, 1),
    }
    if metric is not None:
        metric.save_files(run.path)
        meta["metric_learning"] = metric.meta()
    if record.results.get("after"):
        meta["retrieval"] = {k: record.results[k] for k in ("before", "after", "gain", "warning")
                             if k in record.results}
    run.write_meta(meta)
    return meta


def result(cfg: FinetuneConfig, run: RunDirectory, data: PreparedData, loaders: Loaders, state: TrainingState,
           record: RetrievalRecord, meta: dict[str, Any], t_start: float) -> FinetuneResult:
    return FinetuneResult(
        run_dir=str(run.path), spec=f"finetuned:{run.path}", classes=list(data.classes), n_train=len(data.train),
        n_val=len(data.val), n_samples=len(data.samples), class_counts=meta["data"]["class_counts"],
        balanced_counts=meta["data"]["balanced_counts"], excluded=data.excluded, odd=data.odd,
        history=state.history_dicts(), val_accuracy=meta["val_accuracy"], seconds=time.perf_counter() - t_start,
        retrieval=dict(record.results) if cfg.eval_retrieval else None, resumed_from=run.resumed_from,
        failures=loaders.failures,
        warnings=[record.results["warning"]] if record.results.get("warning") else [],
    )


def retrieval_warning(val_acc: float | None, n_classes: int, map_before: float, map_after: float,
                      descriptor: dict[str, str] | None = None) -> str | None:
    """The warning of ``--eval-retrieval`` when the classifier learned (final validation
    accuracy at least :data:`ACCURACY_RISE_MIN` above chance, ``1 / n_classes``) but the
    retrieval mAP of the run's descriptor gained less than :data:`RETRIEVAL_GAIN_MIN`;
    None otherwise."""
    if val_acc is None or n_classes < 2:
        return None
    chance = 1.0 / n_classes
    gain = map_after - map_before
    if val_acc - chance < ACCURACY_RISE_MIN or gain >= RETRIEVAL_GAIN_MIN:
        return None
    what = f" ({descriptor['layer']} + {descriptor['pooling']})" if descriptor else ""
    return (f"validation accuracy rose to {100 * val_acc:.1f}% (chance {100 * chance:.1f}%) but retrieval did not: "
            f"the mAP of the descriptor extract uses{what} went from {100 * map_before:.2f} to "
            f"{100 * map_after:.2f} ({100 * gain:+.2f}); the fine-tuning moved the classifier, not the "
            "descriptors (the head separated the training classes before the backbone had to change). Train more "
            "of the backbone at a higher rate (--train-blocks, --lr), train the descriptor itself (--loss "
            "contrastive), or see docs/finetune.md \"Where the gain goes\"")
