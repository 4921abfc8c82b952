"""Operators swapped for exportable equivalents while a network is exported to ONNX.

Two computations that PyTorch runs eagerly have no ONNX (opset 17) form, or a wrong one, when the
input size is dynamic; while exporting, :func:`exportable_ops` replaces them with the same
arithmetic written in plain tensor operators, so the graph computes what eager PyTorch computes at
every input size:

* **timm's TF-style 'SAME' padding** (:func:`integer_same_padding`): computed with integers instead
  of ``ceil`` in floating point, which a bf16 compilation (OpenVINO) rounds;
* **antialiased resampling** (``F.interpolate(..., antialias=True)``, bicubic or bilinear:
  :func:`antialiased_resampling`). timm resamples a vision transformer's position embeddings to
  the input's patch grid this way (``resample_abs_pos_embed``); the exporter has no form for
  ``aten::_upsample_bicubic2d_aa``. The resampling is separable and linear: each axis is one
  ``out x in`` weight matrix, PyTorch's antialiased kernel (Keys' cubic with a = -0.5, or the
  triangle) stretched by the downscale factor and normalised per output row, as
  ``aten/src/ATen/native/cpu/UpSampleKernel.cpp`` computes it. Built from the traced sizes, the
  matrices follow the input size in a dynamic graph; equal to PyTorch's within float rounding
  (about 1e-6 of the values; tests/test_export_ops.py).
"""

from __future__ import annotations

import contextlib

import torch

#: PyTorch's antialiased kernels: half their support (in input pixels at scale 1)
AA_SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}
#: Keys' cubic coefficient of PyTorch's (and PIL's) antialiased bicubic; plain bicubic uses -0.75
AA_CUBIC_A = -0.5


def _aa_filter(x: torch.Tensor, mode: str) -> torch.Tensor:
    x = x.abs()
    if mode == "bilinear":
        return (1.0 - x).clamp(min=0.0)
    a = AA_CUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def aa_weights(in_size, out_size, mode: str) -> torch.Tensor:
    """The ``out_size x in_size`` matrix of PyTorch's antialiased resampling along one axis
    (``align_corners=False``): output i is centred on input ``(i + 0.5) * in/out``; when shrinking, the
    kernel is stretched by ``in/out``; each row sums to 1. *out_size* may be a traced size."""
    out_f = torch.as_tensor(out_size, dtype=torch.float32)
    scale = torch.as_tensor(in_size, dtype=torch.float32) / out_f
    stretch = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    centres = (torch.arange(out_size, dtype=torch.float32) + 0.5) * scale
    inputs = torch.arange(in_size, dtype=torch.float32) + 0.5
    w = _aa_filter((inputs[None, :] - centres[:, None]) * stretch, mode)
    return w / w.sum(1, keepdim=True)


def aa_resize(x: torch.Tensor, size, mode: str) -> torch.Tensor:
    """``F.interpolate(x, size, mode=mode, antialias=True)`` for an ``N x C x H x W`` float tensor, as
    two matrix products (rows, then columns)."""
    wh = aa_weights(x.shape[-2], size[0], mode).to(x.dtype)
    ww = aa_weights(x.shape[-1], size[1], mode).to(x.dtype)
    return torch.matmul(torch.matmul(wh, x), ww.transpose(0, 1))


@contextlib.contextmanager
def antialiased_resampling():
    """While exporting: ``F.interpolate(..., antialias=True)`` (bicubic, bilinear, given a *size*)
    computed by :func:`aa_resize`; every other call goes to PyTorch's own."""
    import torch.nn.functional as F

    original = F.interpolate

    def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                    recompute_scale_factor=None, antialias=False):
        if antialias and mode in AA_SUPPORT and size is not None and not align_corners and input.dim() == 4:
            hw = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
            return aa_resize(input, hw, mode)
        return original(input, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners,
                        recompute_scale_factor=recompute_scale_factor, antialias=antialias)

    F.interpolate = interpolate
    try:
        yield
    finally:
        F.interpolate = original


@contextlib.contextmanager
def no_size_early_outs():
    """While exporting: timm's position-embedding resampling without its early return when the input
    grid is the model's own. Traced at that grid, the return would leave the embeddings out of a
    dynamic graph, which then fails at every other size; timm skips it under ``torch.export`` but not
    under the TorchScript tracer that exports here. At the model's own grid the resampling is the
    identity (within float rounding), so nothing else changes."""
    try:
        from timm.layers import pos_embed
    except ImportError:  # no timm: nothing to patch
        yield
        return
    original = getattr(pos_embed, "is_exporting", None)
    if original is None:  # an older timm without the early-out switch
        yield
        return
    pos_embed.is_exporting = lambda: True
    try:
        yield
    finally:
        pos_embed.is_exporting = original


@contextlib.contextmanager
def integer_same_padding():
    """While exporting: timm's TF-style 'SAME' padding computed with integers.

    timm computes ``ceil(size / stride)`` in floating point; traced with a dynamic input size, that
    is float arithmetic on shapes inside the graph. A bf16 compilation (OpenVINO) rounds it: an odd
    side above 256 is no bf16 number, the padding comes out one pixel off, and descriptors of such
    images were measured at cosine 0.975 (docs/benchmarks.md, "OpenVINO"). ``(size + stride - 1) //
    stride`` is the same number for every positive size, in integers, so nothing else changes."""
    try:
        from timm.layers import padding
    except ImportError:  # no timm: nothing to patch
        yield
        return
    original = padding.get_same_padding

    def get_same_padding(x, kernel_size: int, stride: int, dilation: int):
        if isinstance(x, torch.Tensor):
            return torch.clamp(((x + stride - 1) // stride - 1) * stride + (kernel_size - 1) * dilation + 1 - x,
                               min=0)
        return original(x, kernel_size, stride, dilation)

    padding.get_same_padding = get_same_padding
    try:
        yield
    finally:
        padding.get_same_padding = original


@contextlib.contextmanager
def _no_onnx_log(verbose: bool = False):
    yield None


@contextlib.contextmanager
def quiet_exporter():
    """While exporting: the TorchScript exporter's log off. Its ``setup_onnx_logging`` tests the function
    ``_jit_is_onnx_log_enabled`` instead of calling it (torch 2.7 to 2.9 at least), so the log is always
    on, and an operator without an ONNX form prints the whole traced graph on stdout (156 kB for
    ViT-Ti) before the error; the error itself (which names the operator) is kept."""
    try:
        from torch.onnx._internal.torchscript_exporter import utils
    except ImportError:  # another torch layout: nothing to patch
        utils = None
    original = getattr(utils, "setup_onnx_logging", None)
    enabled = torch._C._jit_is_onnx_log_enabled()
    torch._C._jit_set_onnx_log_enabled(False)
    if original is not None:
        utils.setup_onnx_logging = _no_onnx_log
    try:
        yield
    finally:
        if original is not None:
            utils.setup_onnx_logging = original
        torch._C._jit_set_onnx_log_enabled(enabled)


@contextlib.contextmanager
def exportable_ops():
    """The replacements of the module and a quiet exporter, for the duration of one export."""
    with quiet_exporter(), integer_same_padding(), antialiased_resampling(), no_size_early_outs():
        yield
