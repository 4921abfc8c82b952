"""What a fine-tuning run reports at the end: ``model.safetensors`` and ``meta.json`` (the
run as the model spec ``finetuned:RUN``), the run's descriptor, ``retrieval.json``
(before/after mAP of ``--eval-retrieval``, and its warning when only the classifier
learned), the curves picture, and the :class:`FinetuneResult`."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from deepfeat import __version__
from deepfeat.finetune import data as D
from deepfeat.finetune import heads as H
from deepfeat.finetune import retrieval as R
from deepfeat.finetune.config import FinetuneResult
from deepfeat.finetune.snapshots import now
from deepfeat.finetune.whitening import WHITENING_FILE

log = logging.getLogger(__name__)

META_FORMAT = "deepfeat-finetuned/1"
#: --eval-retrieval warns when accuracy rose but the mAP gain is below this (absolute)
RETRIEVAL_GAIN_MIN = 0.01
#: ... "accuracy rose": final validation accuracy at least this far above chance (1/classes)
ACCURACY_RISE_MIN = 0.05


class ReportMixin:
    """:class:`~deepfeat.finetune.train.Finetuner`'s outputs."""

    def _reuse_before(self) -> None:
        """--resume: the "before" retrieval of the run's ``retrieval.json``, when it measured
        the same descriptor at the same size."""
        cfg = self.cfg
        prev = R.read_json(self.run / "retrieval.json") if cfg.resume else None
        if prev and prev.get("layer") == self.eval_layer and prev.get("pooling_before", prev.get("pooling")) == self._pool_spec() and \
                prev.get("image_size") == list(self.data_config.input_size) and "before" in prev:
            self.retrieval["before"] = prev["before"]
            self.retrieval["before_per_class"] = prev.get("before_per_class", {})

    def _finish_retrieval(self) -> None:
        """--eval-retrieval after training: the "after" mAP (with a metric loss, of the learned
        pooling and whitening), the gain, the warning; written to ``retrieval.json``."""
        if self.metric is not None:
            pool = f"gem:p={self.metric.p:.6g}"
            v = self._val_pass(True, pool=pool)
            if v.get("_eval") is not None:
                self.retrieval["after_learned_pooling"] = {"pooling": pool, **R.summary(v["_eval"][0])}
                # the descriptor extract uses (the learned p): what "after" reports
                self.after_eval = v["_eval"]
                if self.metric.whiten is not None:
                    desc, kept = v["_desc"]
                    ev = self._eval_retrieval(self.metric.describe_np(desc), kept)
                    self.retrieval["after_learned_whitening"] = {
                        "pooling": pool, "post": self.metric.whitening_chain().spec,
                        "file": str(self.run / WHITENING_FILE), **R.summary(ev[0])}
        if self.after_eval is None and "after" not in self.retrieval:
            v = self._val_pass(True)
            self.after_eval = v.get("_eval")
        if self.after_eval is not None:
            self.retrieval["after"] = R.summary(self.after_eval[0])
            self.retrieval["after_per_class"] = self.after_eval[1]
        if "before" in self.retrieval and "after" in self.retrieval:
            b, a = self.retrieval["before"], self.retrieval["after"]
            self.retrieval["gain"] = {"map": a["map"] - b["map"],
                                      **{f"mp@{k}": a["mp_at_k"][k] - b["mp_at_k"][k] for k in a["mp_at_k"]}}
            warning = retrieval_warning(self._final_val_acc(), len(self.classes), b["map"], a["map"],
                                        self._descriptor())
            if warning:
                log.warning("%s", warning)
                if self.cfg.progress != "none":
                    self.progress.line(f"warning: {warning}")
                self.retrieval["warning"] = warning
        self._write_retrieval()

    def _write_retrieval(self) -> None:
        d = self._descriptor()
        doc = {"protocol": "every validation image a query; relevant = same class; query excluded",
               "layer": d["layer"], "pooling": d["pooling"], "post": d["post"], "pooling_before": self._pool_spec(),
               "image_size": list(self.data_config.input_size), "n_queries": len(self.val), **self.retrieval}
        if "before" in self.retrieval and "after" in self.retrieval:
            doc["table"] = R.comparison_table(self.retrieval["before"], self.retrieval["after"]).splitlines()
        R.write_json(self.run / "retrieval.json", doc)

    def _descriptor(self) -> dict[str, str]:
        """The run's descriptor: what --eval-retrieval measures and ``extract --model
        finetuned:RUN`` uses without --layer/--pool (recorded in meta.json)."""
        pool = f"gem:p={self.metric.p:.6g}" if self.metric is not None else self._pool_spec()
        d = {"layer": self.eval_layer, "pooling": pool, "post": "l2",
             "chosen_by": "options" if (self.cfg.eval_layer not in ("default", "") or
                                        self.cfg.eval_pool not in ("default", "")) else "default"}
        if self.metric is not None and self.metric.whiten is not None:
            d["whitening"] = "whitening.npz"  # applied with extract --post RUN/whitening.npz
        return d

    def _final_val_acc(self) -> float | None:
        last_val = next((h for h in reversed(self.history) if h.get("val_acc") is not None), None)
        if self.metric is not None and self.metric.refit.get("val_acc") is not None:
            return self.metric.refit["val_acc"]
        return last_val["val_acc"] if last_val else None

    def _write_curves(self) -> None:
        from deepfeat.finetune.curves import write_curves

        try:
            write_curves(self.run, self.history, f"{self.cfg.model} fine-tuned on {Path(self.root).name}")
        except Exception as e:  # a picture must never stop a run
            log.warning("could not draw %s: %s: %s", self.run / "curves.png", type(e).__name__, e)

    def _pool_spec(self) -> str:
        from deepfeat.pooling import get_pooling

        return get_pooling(self.eval_pool).spec

    def _save_model(self) -> dict:
        from safetensors.torch import save_file

        from deepfeat.models.base import file_sha256

        sd = H.to_checkpoint({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()},
                             self.head_module)
        path = self.run / "model.safetensors"
        tmp = path.with_name(".model.safetensors.tmp")
        save_file(sd, str(tmp), metadata={"format": META_FORMAT, "head": H.HEAD_NAME})
        os.replace(tmp, path)
        final_acc = self._final_val_acc()
        best = max((h for h in self.history if h.get("val_acc") is not None), key=lambda h: h["val_acc"],
                   default=None)
        base_meta = self.base.meta()
        base_meta.pop("data_config", None)
        meta = {
            "format": META_FORMAT,
            "deepfeat_version": __version__,
            "created": self.created,
            "finished": now(),
            "base_model": base_meta,
            "classes": list(self.classes),
            "num_classes": len(self.classes),
            "head": {"name": H.HEAD_NAME, "module": self.head_module, **H.head_spec(self.head)},
            "data_config": self.data_config.to_dict(),
            "default_layer": self.eval_layer,
            "descriptor": self._descriptor(),
            "weights": path.name,
            "weights_sha256": file_sha256(path),
            "training": {**self.cfg.to_dict(), "resume": None, "trainable_units": self.train_units,
                         "augmentation": self.aug.to_dict() if self.aug else None,
                         "head_trained_on_precomputed_features": bool(self.head_is_last),
                         "cached_prefix": [self.prefix.names[0], self.prefix.last] if self.prefix else None},
            "data": {"root": self.root, "n_train": len(self.train), "n_val": len(self.val),
                     "n_samples": len(self.samples), "excluded": len(self.excluded), "odd": len(self.odd),
                     "class_counts": D.balance_counts(self.train, len(self.classes)),
                     "balanced_counts": D.balance_counts(self.samples, len(self.classes))},
            "epochs_done": self.history[-1]["epoch"] if self.history else 0,
            "val_accuracy": final_acc,
            "best_val_accuracy": best["val_acc"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "seconds": round(time.perf_counter() - self.t_start + self._seconds_before, 1),
        }
        if self.metric is not None:
            self.metric.save_files(self.run)
            meta["metric_learning"] = self.metric.meta()
        if self.retrieval.get("after"):
            meta["retrieval"] = {k: self.retrieval[k] for k in ("before", "after", "gain", "warning")
                                 if k in self.retrieval}
        R.write_json(self.run / "meta.json", meta)
        return meta

    def _result(self, meta: dict) -> FinetuneResult:
        cfg = self.cfg
        seconds = time.perf_counter() - self.t_start
        return FinetuneResult(
            run_dir=str(self.run), spec=f"finetuned:{self.run}", classes=list(self.classes), n_train=len(self.train),
            n_val=len(self.val), n_samples=len(self.samples), class_counts=meta["data"]["class_counts"],
            balanced_counts=meta["data"]["balanced_counts"], excluded=self.excluded, odd=self.odd,
            history=self.history, val_accuracy=meta["val_accuracy"], seconds=seconds,
            retrieval=dict(self.retrieval) if cfg.eval_retrieval else None, resumed_from=self.resumed_from,
            failures={**self.loader.failures, **self.val_loader.failures},
            warnings=[self.retrieval["warning"]] if self.retrieval.get("warning") else [],
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
