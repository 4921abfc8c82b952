"""Which layer, pooling and post-processing work best here? One table answers.

The dataset is decoded and run through the network once: every requested layer is
tapped in the same forward pass and pooled every requested way. Each (layer,
pooling) descriptor is then post-processed every requested way (PCA/whitening fitted
on ``--fit-on`` images, or on the evaluation set itself with a warning, as many
papers do), ranked exactly, and scored with the ground truth. The result is the
table the retrieval literature prints: rows layer x pooling, columns
post-processing, cells mAP, best marked.

The package: the one-pass descriptors (:mod:`deepfeat.tune.sweep.descriptors`), the run and
its scoring (:mod:`deepfeat.tune.sweep.runner`), the result table and its files
(:mod:`deepfeat.tune.sweep.table`).
"""

from __future__ import annotations

from deepfeat.tune.sweep.descriptors import MultiPoolNet, compute_descriptors
from deepfeat.tune.sweep.runner import parse_reranks, sweep
from deepfeat.tune.sweep.table import SweepResult, column_name, write_outputs

__all__ = ["sweep", "SweepResult", "MultiPoolNet", "compute_descriptors", "write_outputs", "column_name",
           "parse_reranks"]
