"""The network a run extracts with: the model, its resolved layers and pooling (a learning
pooling fitted or reloaded), the store's meta for them, and the inference runner
(eager torch, ONNX Runtime with a torch fallback, or padded torch batches) with its threads."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from deepfeat.data.images import decode_image, discover
from deepfeat.data.preprocess import SizePolicy, parse_size_policy
from deepfeat.errors import DeepfeatError, UsageError
from deepfeat.pipeline.config import ExtractConfig

log = logging.getLogger(__name__)


def _resolve_layers(model, layers: Sequence[str]) -> list[str]:
    out = []
    for name in layers:
        if name in ("default", ""):
            out.append(default_layer(model))
        else:
            out.append(name)
    return out


def default_layer(model) -> str:
    """The last spatial feature map before global pooling (timm: ``forward_features`` output)."""
    if model.extra_meta.get("default_layer"):
        return model.extra_meta["default_layer"]
    names = [n for n, _ in model.net.named_modules()]
    for cand in ("conv_head", "bn2", "layer4", "features", "stages", "norm"):
        if cand in names and cand != "":
            if cand == "conv_head" and "bn2" in names:
                return "bn2"  # timm EfficientNet: conv_head -> bn2 (+act) is the final feature map
            return cand
    if model.extra_meta.get("feature_layer") in names:  # timm: the last module of feature_info (RegNet's s4)
        return model.extra_meta["feature_layer"]
    from deepfeat.errors import LayerError

    raise LayerError(f"no default layer known for {model.spec}; pass --layer (see `deepfeat layers`)")


def default_pooling(model) -> str:
    """The pooling ``--pool default`` means: the model's recorded one (``finetuned:RUN``:
    the descriptor the run chose and measured, in its ``meta.json``), else GeM (p = 3)."""
    return model.extra_meta.get("default_pooling") or "gem"


def build_meta(cfg: ExtractConfig, model, layers: list[str], pooling, dims: list[int]) -> dict[str, Any]:
    return {
        "model": model.meta(),
        "layers": layers,
        "pooling": pooling.spec,
        "pooling_params": pooling.to_dict(),
        "post": cfg.post or "none",
        "size": str(parse_size_policy(cfg.size)),
        "scales": list(cfg.scales),
        "scale_combine": cfg.scale_combine,
        "dtype": cfg.dtype,
        "draft_decode": cfg.draft,
        "features": {name: {"dim": d, "dtype": cfg.dtype} for name, d in zip(layers, dims)},
        # relative item paths are relative to this folder (where the extraction ran)
        "root": os.getcwd(),
    }


def load_feature_net(cfg: ExtractConfig, out: Path, device) -> tuple[Any, list[str], Any, Any]:
    """(model, resolved layers, pooling, FeatureNet on *device*) as *cfg* defines them; a pooling
    that learns is taken from --pool-fit or the store's saved codebook, else fitted and returned."""
    from deepfeat.backends.featurenet import FeatureNet
    from deepfeat.models import load_model
    from deepfeat.pooling import get_pooling

    model = load_model(cfg.model, device=str(device), labels=cfg.labels)
    layers = _resolve_layers(model, cfg.layers)
    pooling = get_pooling(default_pooling(model) if cfg.pooling in ("default", "") else cfg.pooling)
    if pooling.needs_fit:
        pooling = _fitted_pooling(cfg, model, layers, pooling, parse_size_policy(cfg.size), out, device)
    fnet = FeatureNet(model, layers, pooling, cfg.scales, cfg.scale_combine).to(device)
    if padding(cfg):  # before the store is made: padded batches of a transformer are refused
        from deepfeat.backends.padding import check_no_attention

        check_no_attention(fnet)
    return model, layers, pooling, fnet


def make_runner(cfg: ExtractConfig, fnet, device, threads: int | None = None
                ) -> Callable[[np.ndarray], list[np.ndarray]]:
    """The inference runner for *cfg*; ONNX Runtime and OpenVINO get *threads* inference threads
    (None: torch's). ``auto`` on the CPU: OpenVINO, falling back to ONNX Runtime and then eager
    torch on a failure in the first batch (:class:`~deepfeat.backends.featurenet.FallbackRunner`)."""
    from deepfeat.backends.prepared import Prepared, PreparedRunner

    if isinstance(fnet, Prepared):  # an earlier run's graph (deepfeat.pipeline.prepared_net): ONNX Runtime only
        return getattr(fnet, "runner", None) or PreparedRunner(fnet, threads)
    import torch

    from deepfeat.backends.featurenet import FallbackRunner, OnnxRunner, TorchRunner

    threads = threads or torch.get_num_threads()
    if padding(cfg):
        from deepfeat.backends.padding import PaddedTorchRunner

        return PaddedTorchRunner(fnet, device, cfg.pad_to, channels_last=cfg.channels_last)
    # one shape: static graphs (fastest per image); many shapes (aspect-preserving policies):
    # one graph with dynamic height and width (docs/benchmarks.md, "ONNX Runtime at retrieval sizes")
    export = "static" if parse_size_policy(cfg.size).fixed else "dynamic"
    batch = cfg.batch_size or 8
    # auto: a network whose dynamic graph fails its check runs in eager torch, not in one exported
    # graph per input shape (an export every few images; docs/benchmarks.md, "auto and R-MAC")
    mismatch = "raise" if cfg.backend == "auto" else "static"
    kw = {"threads": threads, "batch_size": batch, "export": export, "on_mismatch": mismatch}
    if cfg.backend in ("auto", "onnx", "openvino") and fnet.exportable:
        from deepfeat.backends.export_cache import open_cache

        kw["disk_cache"] = open_cache(cfg.graph_cache)
    if cfg.backend == "openvino" or (cfg.backend == "auto" and auto_prefers_openvino(cfg, fnet, device)):
        from deepfeat.backends.openvino_runtime import OpenVinoRunner

        ov = OpenVinoRunner(fnet, precision=cfg.precision, **kw)
        if cfg.backend == "openvino":
            return ov
        if auto_prefers_onnx(cfg, fnet, device):
            safe = FallbackRunner(OnnxRunner(fnet, **kw), TorchRunner(fnet, device))
        else:
            safe = TorchRunner(fnet, device)
        return FallbackRunner(ov, safe)
    if cfg.precision != "f32":
        raise UsageError(f"--precision {cfg.precision} runs on OpenVINO on the CPU only (--backend openvino or auto "
                         f"on the CPU; this run: backend {cfg.backend}, device {device})")
    if cfg.backend == "onnx":
        return OnnxRunner(fnet, **kw)
    if cfg.backend == "auto" and auto_prefers_onnx(cfg, fnet, device):
        return FallbackRunner(OnnxRunner(fnet, **kw), TorchRunner(fnet, device))
    return TorchRunner(fnet, device, channels_last=cfg.channels_last, compile=cfg.compile)


def padding(cfg: ExtractConfig) -> int | None:
    """The multiple images are padded to (``--pad-to``), for aspect-preserving policies on the torch backend."""
    if cfg.pad_to and not parse_size_policy(cfg.size).fixed and cfg.backend not in ("onnx", "openvino"):
        return cfg.pad_to
    return None


def resolve_threads(cfg: ExtractConfig) -> tuple[int, int]:
    """(inference threads, decode workers): ``--threads`` and ``--workers`` where given, else
    :func:`deepfeat.backends.onnx_runtime.default_threads` for this machine's cores and the input size."""
    from deepfeat.backends.onnx_runtime import default_threads, work_pixels

    threads, workers = default_threads(pixels=work_pixels(cfg.size, cfg.scales))
    return (cfg.threads or threads), (cfg.workers if cfg.workers is not None else workers)


def auto_prefers_onnx(cfg: ExtractConfig, fnet, device) -> bool:
    """Whether ``--backend auto`` may use ONNX Runtime: on the CPU (faster than eager PyTorch,
    docs/benchmarks.md), for every size policy (one static graph for one shape, one dynamic graph for
    many) when it is installed; eager torch on CUDA."""
    import importlib.util

    return (device.type == "cpu" and fnet.exportable and not padding(cfg)
            and importlib.util.find_spec("onnxruntime") is not None)


#: ``--backend auto`` prefers OpenVINO float32 to ONNX Runtime for one-shape policies (``--size model``,
#: ``warp:``): not measured faster there
OPENVINO_AUTO_FIXED = False


def auto_prefers_openvino(cfg: ExtractConfig, fnet, device) -> bool:
    """``--backend auto``: OpenVINO on the CPU where it is installed and was measured faster than ONNX
    Runtime, and always for ``--precision bf16``; ONNX Runtime stays the fallback.

    Measured end to end, each engine in its own process (docs/benchmarks.md, "OpenVINO and bf16"):
    OpenVINO f32 is the faster engine at one scale of an aspect-preserving size and the slower one
    with ``--scales``, so auto keeps ONNX Runtime there; one-shape policies: :data:`OPENVINO_AUTO_FIXED`."""
    from deepfeat.backends.openvino_setup import available

    if device.type != "cpu" or not fnet.exportable or padding(cfg):
        return False
    if cfg.precision != "f32":
        return True  # only OpenVINO runs it: require() says why not, if it cannot
    if parse_size_policy(cfg.size).fixed:
        if not OPENVINO_AUTO_FIXED:
            return False
    elif len(cfg.scales) > 1:
        return False
    return available()


POOLING_FILE = "pooling.npz"


def _fitted_pooling(cfg: ExtractConfig, model, layers: list[str], pooling, policy: SizePolicy, out: Path, device):
    """A pooling that learns (MOP's codebooks): from --pool-fit, from the store, or fitted on
    a seeded sample of the inputs and saved into the store so a resumed run reuses it."""
    import torch

    from deepfeat.models.taps import make_taps
    from deepfeat.pooling import load_pooling

    if len(layers) != 1:
        raise UsageError(f"pooling {pooling.spec!r} learns a codebook per layer; tap one layer, not {layers}")
    saved = out / POOLING_FILE
    src = cfg.pool_fit or (str(saved) if saved.is_file() else None)
    if src:
        fitted = load_pooling(src)
        if fitted.spec != pooling.spec:
            raise UsageError(f"codebook {src} is for {fitted.spec!r}, not {pooling.spec!r}")
        return fitted
    paths = discover(cfg.inputs) if cfg.inputs else []
    if not paths:
        raise UsageError(f"pooling {pooling.spec!r} needs a codebook: give inputs to fit on, or --pool-fit FILE")
    rng = np.random.default_rng(0)
    sample = [paths[i] for i in sorted(rng.choice(len(paths), min(len(paths), cfg.pool_fit_samples),
                                                  replace=False))]
    log.warning("fitting %s on %d of the input images", pooling.spec, len(sample))
    taps = make_taps(model, layers)

    def batches():
        for p in sample:
            try:
                px = decode_image(p, policy, model.data_config, draft=cfg.draft).pixels
            except DeepfeatError:
                continue
            with torch.inference_mode():
                yield taps(model.normalize(torch.from_numpy(px)[None].to(device)))[layers[0]].cpu()

    pooling.fit(batches())
    pooling.fit_info = {**getattr(pooling, "fit_info", {}), "fitted_on_images": len(sample)}
    return pooling
