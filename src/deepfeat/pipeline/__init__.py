"""Extraction pipeline: reader -> decoder -> batcher -> runner -> writer.

The work is planned before it is done: every input gets a stable id and a shard
(``plan.parquet``), and a shard's batches are formed deterministically from the
shard's items (consecutive for fixed-size policies; grouped by exact output shape,
from image headers, for aspect-preserving ones). Decoding runs in worker processes
(or threads) ahead of inference, by at most 256 MB of decoded pixels
(:data:`.local_engine.DECODE_AHEAD_BYTES`); inference runs in the main process on the chosen
backend; a shard is written and committed as soon as its last batch is done.

Because the plan and the batches do not depend on timing, an interrupted run
(Ctrl-C, ``kill -9``, power loss) continued later produces exactly the same store,
byte for byte, as an uninterrupted one: committed shards are skipped, the shard in
progress is redone.

How one shard is computed (batches -> decode -> FeatureNet -> items + arrays -> commit)
lives in :class:`ShardProcessor`, shared by the two engines: the local one
(``engine="local"``: decode processes feeding inference in this process, several
shards in flight) and the Ray one in :mod:`deepfeat.pipeline.ray_engine` (``engine="ray"``:
one shard per actor call, on many machines). Both write the same store.

The parts, each a module of this package (the API, :func:`extract` and :class:`ExtractConfig`, is re-exported here):

* :mod:`.config`: :class:`ExtractConfig` (one field per CLI flag) and its validation,
  :class:`ExtractReport`;
* :mod:`.plan`: ids and shards (``plan.parquet``), the uncommitted shards of a resumed
  run, a shard's deterministic batches (:func:`shard_batches`);
* :mod:`.decode`: the decode workers (header probes, decoding) and their executors;
* :mod:`.network`: the model, layers, pooling, meta and the inference runner;
* :mod:`.shard`: :class:`ShardProcessor`, one shard from items to a committed shard;
* :mod:`.local_engine`: the local engine; :mod:`.ray_engine`: the Ray engine; :mod:`.run`: :func:`extract`, setup, plan, engine, finish;
* :mod:`.progress`: the progress bar or lines; :mod:`.post`: fitting or installing the
  post-processing chain.
"""

from __future__ import annotations

from deepfeat.pipeline.config import BACKENDS, DTYPES, ENGINES, PRECISIONS, ExtractConfig, ExtractReport
from deepfeat.pipeline.network import default_layer, default_pooling
from deepfeat.pipeline.plan import CPU_BATCH_PIXELS, shard_batches
from deepfeat.pipeline.post import fit_post, install_post, set_post
from deepfeat.pipeline.run import extract

__all__ = [
    "BACKENDS", "CPU_BATCH_PIXELS", "DTYPES", "ENGINES", "PRECISIONS", "ExtractConfig", "ExtractReport",
    "default_layer", "default_pooling", "extract", "fit_post", "install_post", "set_post", "shard_batches",
]
