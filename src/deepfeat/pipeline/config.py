"""What defines an extraction (:class:`ExtractConfig`, one field per CLI flag, and its
validation) and what a run did (:class:`ExtractReport`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from deepfeat.data.images import DEFAULT_MAX_PIXELS
from deepfeat.data.preprocess import parse_size_policy
from deepfeat.errors import UsageError

BACKENDS = ("auto", "torch", "onnx", "openvino")
PRECISIONS = ("f32", "bf16")
DTYPES = ("float32", "float16")
ENGINES = ("local", "ray")


@dataclass
class ExtractConfig:
    """Everything that defines an extraction (CLI flags map one to one)."""

    inputs: list[str] = field(default_factory=list)
    output: str = ""
    model: str = "efficientnet_lite0"
    layers: list[str] = field(default_factory=lambda: ["default"])
    pooling: str = "default"  # default: the model's own (a fine-tuned run's recorded descriptor), else gem
    post: str = "l2"
    size: str = "model"
    scales: tuple[float, ...] = (1.0,)
    scale_combine: str = "sum"
    backend: str = "auto"  # auto: OpenVINO (else ONNX Runtime) on the CPU, torch on CUDA
    #: inference precision: f32, or bf16 (OpenVINO on a CPU with AMX/AVX512_BF16; docs/onnx.md)
    precision: str = "f32"
    device: str = "auto"
    batch_size: int | None = None  # None: 8 on CPU (measured best for CNNs on few cores), 64 on CUDA
    #: pixels per batch at most, for aspect-preserving policies; None: set by ``extract``
    #: (CPU_BATCH_PIXELS with eager torch on the CPU when --batch-size is not given, else no limit)
    batch_pixels: int | None = None
    workers: int | None = None  # None: onnx_runtime.default_threads() for the core count
    threads: int | None = None  # inference intra-op threads; None: onnx_runtime.default_threads()
    channels_last: bool = True  # torch on CUDA: channels-last memory format (no effect on the CPU)
    compile: bool = False  # torch: torch.compile the feature network (--compile)
    #: ONNX Runtime / OpenVINO: take exported graphs from the on-disk cache and keep new ones there
    #: (deepfeat.backends.export_cache, $DEEPFEAT_CACHE). Off unless asked for in the library, so a
    #: program's runs stay independent; the CLI asks for it (--no-cache: not)
    graph_cache: bool = False
    #: aspect-preserving policies, torch: pad images to shapes rounded up to this multiple and batch
    #: them together, pooling with a mask (deepfeat.backends.padding); None: batch by exact shape only
    pad_to: int | None = None
    decode_in: str = "processes"  # or "threads"
    #: seconds one image may take to decode in a worker process before the worker is killed
    #: and replaced and the image reported (None or 0: no limit; threads cannot be stopped)
    decode_timeout: float | None = 120.0
    resume: bool = False
    #: bring the store in line with its inputs (deepfeat.pipeline.sync): changed files extracted again,
    #: deleted ones removed, new ones added; without inputs, the folders the store records
    sync: bool = False
    limit: int | None = None
    dtype: str = "float32"
    shard_size: int = 1024
    draft: bool = True
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    fit_on: str | None = None
    fit_max: int = 100_000
    pool_fit: str | None = None  # a fitted codebook file for poolings that need one (mop)
    pool_fit_samples: int = 500  # else: fit on this many of the inputs (seeded sample)
    progress: str = "auto"  # auto | bar | lines | none
    labels: str | None = None
    # where the shards are computed: "local" (this process + decode workers) or "ray"
    # (an actor pool on a Ray cluster, see deepfeat.pipeline.ray_engine); the store is the same
    engine: str = "local"
    ray_address: str | None = None  # None: $RAY_ADDRESS or a new local instance; "auto"; "HOST:PORT"
    num_actors: int | None = None  # None: as many as the cluster's CPUs (GPUs) allow
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    #: the store settings (model, layers, pooling, size, scales, scale_combine, dtype, post, draft) the
    #: caller chose; the others are the store's when it exists (deepfeat.pipeline.append). None: those
    #: that differ from these defaults
    given: frozenset[str] | None = None

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend {self.backend!r} unknown; choose {', '.join(BACKENDS)}")
        self.check_precision()
        if self.backend == "openvino":
            from deepfeat.backends.openvino_setup import require

            require(self.precision)
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype {self.dtype!r} unknown; choose {', '.join(DTYPES)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.shard_size < 1:
            raise UsageError(f"--shard-size must be at least 1, not {self.shard_size}")
        if self.workers is not None and self.workers < 0:
            raise UsageError(f"--workers must be 0 or more, not {self.workers}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, not {self.threads}")
        if self.pad_to is not None:
            if self.pad_to < 1:
                raise UsageError(f"--pad-to must be at least 1, not {self.pad_to}")
            if self.backend in ("onnx", "openvino"):
                raise UsageError("--pad-to batches padded images with eager torch; use --backend torch (or auto)")
            from deepfeat.backends.padding import check_maskable
            from deepfeat.pooling import get_pooling

            check_maskable(get_pooling(self.pooling))
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be at least 1, not {self.limit}")
        if self.decode_timeout is not None and self.decode_timeout < 0:
            raise UsageError(f"--decode-timeout must be 0 (none) or more seconds, not {self.decode_timeout}")
        if self.decode_in not in ("processes", "threads"):
            raise UsageError(f"decode_in must be 'processes' or 'threads', not {self.decode_in!r}")
        if not self.output:
            raise UsageError("an output store directory is required (-o STORE)")
        if self.engine not in ENGINES:
            raise UsageError(f"--engine {self.engine!r} unknown; choose {', '.join(ENGINES)}")
        if self.num_actors is not None and self.num_actors < 1:
            raise UsageError(f"--num-actors must be at least 1, not {self.num_actors}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise UsageError(f"--gpus-per-actor must be 0 or more and --cpus-per-actor more than 0, not "
                             f"{self.gpus_per_actor} and {self.cpus_per_actor}")
        parse_size_policy(self.size)
        self.post_chain()  # a bad chain (or a missing chain file) fails now, not after the extraction

    def check_precision(self) -> None:
        """``--precision bf16`` only where it can run: OpenVINO, on a CPU with bf16, not padded."""
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} unknown; choose {', '.join(PRECISIONS)}")
        if self.precision == "f32":
            return
        if self.backend not in ("openvino", "auto"):
            raise UsageError(f"--precision bf16 runs on OpenVINO only (--backend openvino or auto), not --backend "
                             f"{self.backend}")
        if self.device not in ("auto", "cpu") or self.pad_to:
            raise UsageError("--precision bf16 runs on OpenVINO on the CPU: leave out --device and --pad-to")
        from deepfeat.backends.openvino_setup import require

        require(self.precision)

    def post_chain(self):
        """The ``post`` setting as a :class:`~deepfeat.postprocess.PostChain` (a spec, or a saved chain file)."""
        from deepfeat.postprocess import PostChain

        return PostChain.from_arg(self.post or "none")


@dataclass
class ExtractReport:
    """What a run did, for the summary line and for tests."""

    store: str
    planned: int = 0
    skipped_shards: int = 0
    processed: int = 0
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    failures_report: str | None = None
    interrupted: bool = False
    backend: str | None = None  # the runner that did the work (torch or onnx)
    #: time until the first batch was done (model load, worker start, ONNX export, first batch)
    warmup_seconds: float | None = None
    warmup_items: int = 0
    #: a sync's counts (deepfeat.pipeline.sync.SyncPlan.to_dict); its paths in ``sync_paths``, which
    #: ``to_dict`` leaves out (the run is recorded in meta.json, where a million paths do not belong)
    sync: dict[str, Any] | None = None
    sync_paths: dict[str, list[str]] | None = field(default=None, repr=False)
    #: what became of the store's saved index after a sync (deepfeat.index.update.refresh_index)
    index: str | None = None

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """Throughput after the first batch: what a long run achieves."""
        if self.warmup_seconds is None or self.seconds <= self.warmup_seconds:
            return self.images_per_s
        return (self.processed - self.warmup_items) / (self.seconds - self.warmup_seconds)

    def to_dict(self, paths: bool = False) -> dict[str, Any]:
        """The report as JSON-ready values; *paths*: with a sync's paths (``sync.paths``)."""
        d = asdict(self)
        sync_paths = d.pop("sync_paths")
        if paths and d["sync"] is not None:
            d["sync"] = {**d["sync"], "paths": sync_paths}
        d["images_per_s"] = round(self.images_per_s, 2)
        d["steady_images_per_s"] = round(self.steady_images_per_s, 2)
        return d
