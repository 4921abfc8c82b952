"""Pictures of a network: filters, activations, value histograms, class probabilities,
CroW spatial weights and dense class maps.

Every function returns a :class:`matplotlib.figure.Figure` drawn on the Agg canvas
(no GUI backend, no pyplot global state), so it works in scripts, servers and
Jupyter (a returned figure displays inline) alike; :func:`save_figure` writes it as
a PNG of exactly ``figsize * dpi`` pixels. Titles and axis labels say what is shown:
the layer, its shape and the image. The pictures follow the classic Caffe
"filter visualization" notebook (``vis_square``): filters and feature maps tiled in
a square grid, normalised to [0, 1], with white padding between tiles.

Images are given as a path, a :class:`~deepfeat.data.images.DecodedImage` or uint8
``H x W x C`` pixels; *size* chooses the input geometry (``None``: the model's own
resize and centre crop; an int S: warp to S x S; or a size policy such as
``long:512``), as in :func:`deepfeat.surgery.load_pixels`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from deepfeat.errors import LayerError, UsageError
from deepfeat.models.base import Model

__all__ = [
    "crow_spatial_weights",
    "filter_tiles",
    "first_conv_layer",
    "plot_activations",
    "plot_crow",
    "plot_densemap",
    "plot_filters",
    "plot_histogram",
    "plot_probabilities",
    "save_figure",
    "tile_grid",
]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write *fig* as a PNG of ``figsize * dpi`` pixels (no tight cropping, so the size
    is predictable); returns the path. Parent folders are created."""
    if dpi <= 0:
        raise UsageError(f"dpi must be positive, not {dpi}")
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise UsageError(f"pictures are written as PNG; give a .png path, not {path!r}")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def tile_grid(data: np.ndarray, pad: int = 1, pad_value: float = 1.0, normalize: bool = True) -> np.ndarray:
    """Tile ``N x H x W`` (gray) or ``N x H x W x 3`` (colour) arrays in a square grid
    of ``ceil(sqrt(N))`` columns, *pad* pixels of *pad_value* between tiles (Caffe's
    ``vis_square``). With *normalize* the values are first scaled to [0, 1] together
    (min to 0, max to 1; a constant array becomes 0), so tiles stay comparable.
    Returns ``rows*H + (rows-1)*pad`` x ``cols*W + (cols-1)*pad`` (x 3); unused cells
    of the last row are *pad_value*."""
    arr = np.asarray(data, dtype=np.float32)
    if arr.ndim not in (3, 4) or (arr.ndim == 4 and arr.shape[3] != 3):
        raise UsageError(f"tile_grid needs N x H x W or N x H x W x 3, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise UsageError("tile_grid needs at least one tile")
    if pad < 0:
        raise UsageError(f"pad must be >= 0, not {pad}")
    if normalize:
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    n, h, w = arr.shape[:3]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    extra = arr.shape[3:]
    out = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad) + extra, pad_value, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = r * (h + pad), c * (w + pad)
        out[y:y + h, x:x + w] = arr[i]
    return out


def _image(model: Model, image: Any, size: Any) -> tuple[np.ndarray, str]:
    from deepfeat.surgery import load_pixels

    pixels, name = load_pixels(model, image, size)
    return pixels, name or "image"


def layer_map(model: Model, pixels: np.ndarray, layer: str) -> tuple[torch.Tensor, dict | None]:
    """(*layer*'s output for one image of uint8 *pixels*, read by its layout: ``C x H x W`` (a
    transformer's patch tokens, a channels-last map permuted) or a ``D`` vector; its prefix tokens
    ``{"cls": 1 x c x C, "reg": 1 x r x C}`` or None). See :mod:`deepfeat.viz.maps`."""
    from deepfeat.models.layouts import LayoutTaps

    x = model.normalize(torch.from_numpy(np.ascontiguousarray(pixels))[None].to(model.device))
    with torch.inference_mode():
        fmap, prefix = LayoutTaps(model, [layer])(x)[layer]
    return fmap[0].detach().float().cpu(), prefix


def _capture(model: Model, pixels: np.ndarray, layer: str) -> torch.Tensor:
    return layer_map(model, pixels, layer)[0]


def _shape_text(shape: Sequence[int]) -> str:
    return " x ".join(str(int(s)) for s in shape)


def _show_rgb(pixels: np.ndarray) -> tuple[np.ndarray, str | None]:
    if pixels.shape[2] == 1:
        return pixels[:, :, 0], "gray"
    return pixels, None


def first_conv_layer(model: Model) -> str:
    """Name of the first 2-D convolution of the network (in module order)."""
    for name, m in model.net.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            return name
    raise LayerError(f"{model.arch} has no convolution layer to show filters of")


# ---------------------------------------------------------------------------
# Filters and activations
# ---------------------------------------------------------------------------


def filter_tiles(model: Model, layer: str | None = None, max_tiles: int = 256) -> tuple[np.ndarray, str, str]:
    """The tiles :func:`plot_filters` draws: ``(tiles, layer name, description)``.

    Filters with 3 input channels become ``N x kh x kw x 3`` colour tiles in RGB order
    (a Caffe model's BGR filters are flipped so that colours look right); others
    ``N x kh x kw`` gray tiles, one per input channel of each filter, at most
    *max_tiles*."""
    from deepfeat.models.taps import resolve_layers

    if max_tiles < 1:
        raise UsageError(f"max_tiles must be at least 1, not {max_tiles}")
    if getattr(model, "tapper", None) is not None or not isinstance(model.net, torch.nn.Module):
        raise UsageError(f"{model.spec}: the {model.source} model's weights are not PyTorch layers; show the "
                         "filters of the same network loaded from a PyTorch or Caffe source")
    name = first_conv_layer(model) if layer is None else resolve_layers(model.net, [layer], model.layer_aliases)[0]
    if name.endswith(":in") or name == "output":
        raise LayerError(f"{layer!r} is not a layer with weights; filters are shown for convolution layers")
    module = model.net.get_submodule(name)
    if not isinstance(module, torch.nn.Conv2d):
        raise LayerError(f"layer {name!r} is a {type(module).__name__}, not a convolution; filters are shown for "
                         f"convolution layers (the first is {first_conv_layer(model)!r})")
    w = module.weight.detach().float().cpu().numpy()  # out x in x kh x kw
    out_c, in_c, kh, kw = w.shape
    if in_c == 3:
        tiles = w.transpose(0, 2, 3, 1)
        if model.data_config.channel_order == "BGR":
            tiles = tiles[..., ::-1]
        tiles = np.ascontiguousarray(tiles[:max_tiles])
        what = f"{len(tiles)} of {out_c} filters in colour (RGB)" if len(tiles) < out_c else \
            f"{len(tiles)} filters in colour (RGB)"
    else:
        tiles = w.reshape(out_c * in_c, kh, kw)[:max_tiles]
        total = out_c * in_c
        what = (f"{len(tiles)} of {total} filter channels" if len(tiles) < total else f"{len(tiles)} filter channels") \
            + (" (one gray tile per input channel)" if in_c > 1 else ", gray")
    return tiles, name, what


def plot_filters(model: Model, layer: str | None = None, *, max_tiles: int = 256) -> Figure:
    """The filters of a convolution layer (default: the first one) tiled in a square
    grid, scaled to [0, 1] together (see :func:`filter_tiles`)."""
    tiles, name, what = filter_tiles(model, layer, max_tiles)
    shape = tuple(model.net.get_submodule(name).weight.shape)
    grid = tile_grid(tiles, pad=1)
    fig = _figure(6, 6.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, cmap="gray" if tiles.ndim == 3 else None, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{model.arch}: layer {name} weights, {_shape_text(shape)}\n{what}, scaled to [0, 1]",
                 fontsize=10)
    fig.subplots_adjust(left=0.03, right=0.97, bottom=0.03, top=0.9)
    return fig


def plot_activations(model: Model, image: Any, layer: str, n: int = 36, *, size: Any = None) -> Figure:
    """The first *n* channels of *layer*'s output for *image*, tiled in a square grid
    (values scaled to [0, 1] together, so bright means large across all tiles)."""
    if n < 1:
        raise UsageError(f"n must be at least 1, not {n}")
    pixels, name = _image(model, image, size)
    a = _capture(model, pixels, layer)
    if a.dim() != 3:
        raise UsageError(f"layer {layer!r} gives a {_shape_text(a.shape)} vector, not a C x H x W map; show it "
                         "with the histogram picture instead")
    c = int(a.shape[0])
    grid = tile_grid(a[:n].numpy(), pad=1)
    fig = _figure(6, 6.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(grid, cmap="gray", interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(f"{model.arch}: layer {layer} output {_shape_text(a.shape)} for {name}\n"
                 f"first {min(n, c)} of {c} channels, scaled to [0, 1]", fontsize=10)
    fig.subplots_adjust(left=0.03, right=0.97, bottom=0.03, top=0.9)
    return fig


def plot_histogram(model: Model, image: Any, layer: str, *, bins: int = 100, size: Any = None) -> Figure:
    """*layer*'s output for *image*: every value in order (top) and the histogram of the
    positive ones (bottom), as the classic notebook shows ``fc6``/``fc7``."""
    pixels, name = _image(model, image, size)
    a = _capture(model, pixels, layer)
    flat = a.flatten().numpy()
    pos = flat[flat > 0]
    fig = _figure(8, 6)
    ax1 = fig.add_subplot(2, 1, 1)
    ax1.plot(flat, linewidth=0.6)
    ax1.set_xlim(0, max(1, flat.size - 1))
    ax1.set_xlabel("value index (flattened C, H, W)")
    ax1.set_ylabel("value")
    ax1.set_title(f"{model.arch}: layer {layer} output {_shape_text(a.shape)} for {name}", fontsize=10)
    ax2 = fig.add_subplot(2, 1, 2)
    if pos.size:
        ax2.hist(pos, bins=bins)
    else:
        ax2.text(0.5, 0.5, "no positive values", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_xlabel("value")
    ax2.set_ylabel("count")
    ax2.set_title(f"histogram of the {pos.size} positive values of {flat.size} "
                  f"({100.0 * pos.size / max(1, flat.size):.1f}%)", fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.09, top=0.93, hspace=0.45)
    return fig


def plot_probabilities(model: Model, image: Any, *, top: int = 5, size: Any = None) -> Figure:
    """The classifier's probability vector for *image* (probability against class
    index), with the *top* classes labelled."""
    from deepfeat.models.classify import probabilities

    pixels, name = _image(model, image, size)
    x = torch.from_numpy(np.ascontiguousarray(pixels))[None]
    with torch.inference_mode():
        p = probabilities(model, model.forward_uint8(x))[0].float().cpu().numpy()
    order = np.argsort(-p)[:max(0, top)]
    fig = _figure(8, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(p, linewidth=0.8)
    ax.set_xlim(0, max(1, p.size - 1))
    ax.set_ylim(0, max(1e-6, float(p.max())) * 1.15)
    ax.set_xlabel("class index")
    ax.set_ylabel("probability")
    lines = []
    for i in order:
        label = model.labels[i].split(",")[0] if model.labels and i < len(model.labels) else f"class {i}"
        lines.append(f"{i:>4}  {label}  {p[i]:.3f}")
        ax.annotate(str(int(i)), (i, p[i]), xytext=(3, 2), textcoords="offset points", fontsize=7)
    if len(order):
        ax.plot(order, p[order], "o", markersize=3, color="C3")
        ax.text(0.99, 0.97, "top classes:\n" + "\n".join(lines), transform=ax.transAxes, ha="right", va="top",
                fontsize=8, family="monospace", bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})
    ax.set_title(f"{model.arch}: class probabilities ({p.size} classes) for {name}", fontsize=10)
    fig.subplots_adjust(left=0.09, right=0.97, bottom=0.13, top=0.9)
    return fig


# ---------------------------------------------------------------------------
# CroW and dense maps
# ---------------------------------------------------------------------------


def crow_spatial_weights(x: torch.Tensor, a: float = 2.0, b: float = 2.0) -> torch.Tensor:
    """CroW's spatial weight map ``S' = (S / ||S||_a)^(1/b)`` of an ``N x C x H x W``
    map, S being the (clamped non-negative) channel sum at every position, exactly as
    :func:`deepfeat.pooling.crow` computes it (Kalantidis et al., ECCV-W 2016).
    Returns ``N x H x W``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise UsageError(f"CroW spatial weights need an N x C x H x W map, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    tiny = torch.finfo(x.dtype).tiny
    s = x.sum(dim=1).clamp(min=0.0)
    z = s.pow(a).sum(dim=(1, 2), keepdim=True).pow(1.0 / a).clamp_min(tiny)
    s = s / z
    return s.pow(1.0 / b) if b != 1 else s


def _upsample(m: np.ndarray, h: int, w: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()


def overlay_figure(pixels: np.ndarray, grid: np.ndarray, cmap_name: str, alpha: float, title: str):
    """The two-panel picture of a per-position map: *grid* upsampled over the image (left, titled
    *title*) and one cell per position (right, integer ticks). Returns (figure, right axes, image)
    for the caller's own title and colour bar."""
    h, w = pixels.shape[:2]
    img, cmap = _show_rgb(pixels)
    fig = _figure(10, 4.6)
    ax1 = fig.add_subplot(1, 2, 1)
    ax1.imshow(img, cmap=cmap)
    ax1.imshow(_upsample(grid, h, w), cmap=cmap_name, alpha=alpha, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    ax1.set_axis_off()
    ax1.set_title(title, fontsize=10)
    ax2 = fig.add_subplot(1, 2, 2)
    im = ax2.imshow(grid, cmap=cmap_name, interpolation="nearest")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax2, im


def plot_crow(model: Model, image: Any, layer: str, *, a: float = 2.0, b: float = 2.0, size: Any = None,
              alpha: float = 0.5) -> Figure:
    """CroW spatial weights of *layer* for *image*: upsampled and overlaid as a heatmap
    on the image (left), and the weight map itself, one cell per position (right)."""
    pixels, name = _image(model, image, size)
    fmap = _capture(model, pixels, layer)
    if fmap.dim() != 3:
        raise UsageError(f"CroW needs a convolutional layer (C x H x W); {layer!r} gives {_shape_text(fmap.shape)}")
    s = crow_spatial_weights(fmap[None], a, b)[0].numpy()
    h, w = pixels.shape[:2]
    fig, ax2, im = overlay_figure(pixels, s, "jet", alpha, f"{name} ({w} x {h}) with CroW weights")
    ax2.set_xlabel("x (feature cells)")
    ax2.set_ylabel("y (feature cells)")
    ax2.set_title(f"spatial weights S' of {layer} ({_shape_text(fmap.shape)}), a={a:g}, b={b:g}", fontsize=10)
    fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.04)
    fig.suptitle(f"{model.arch}: CroW spatial weighting", fontsize=11)
    fig.subplots_adjust(left=0.02, right=0.94, bottom=0.1, top=0.86, wspace=0.15)
    return fig


def plot_densemap(dense_map, image: Any = None, *, annotate: bool | None = None) -> Figure:
    """The image the dense map was computed on (left) and its top-class probability
    per cell (right), each cell labelled with its top class index when the grid is
    small enough (*annotate*), plus the most frequent classes in the title."""
    from deepfeat.surgery import DenseMap

    if not isinstance(dense_map, DenseMap):
        raise UsageError(f"plot_densemap needs a DenseMap (from deepfeat.surgery.dense_map), "
                         f"got {type(dense_map).__name__}")
    if image is None:
        pixels = dense_map.pixels
        if pixels is None:
            raise UsageError("this DenseMap carries no pixels; pass the image")
    elif isinstance(image, np.ndarray):
        pixels = image
    else:
        from deepfeat.data.images import DecodedImage, decode_image

        pixels = image.pixels if isinstance(image, DecodedImage) else decode_image(image).pixels
    gh, gw = dense_map.shape
    top, am = dense_map.top_prob, dense_map.argmax
    if annotate is None:
        annotate = gh * gw <= 256
    img, cmap = _show_rgb(pixels)
    fig = _figure(10, 4.8)
    ax1 = fig.add_subplot(1, 2, 1)
    ax1.imshow(img, cmap=cmap)
    ax1.set_axis_off()
    ax1.set_title(f"{dense_map.image or 'image'}, input {dense_map.input_size[1]} x {dense_map.input_size[0]}",
                  fontsize=10)
    ax2 = fig.add_subplot(1, 2, 2)
    im = ax2.imshow(top, cmap="viridis", vmin=0.0, vmax=max(1e-6, float(top.max())), interpolation="nearest")
    if annotate:
        fs = max(4, min(9, int(80 / max(gh, gw))))
        thresh = 0.6 * float(top.max())
        for y in range(gh):
            for x in range(gw):
                ax2.text(x, y, str(int(am[y, x])), ha="center", va="center", fontsize=fs,
                         color="black" if top[y, x] > thresh else "white")
    ax2.set_xlabel("x (cells)")
    ax2.set_ylabel("y (cells)")
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_title(f"top-class probability, {gh} x {gw} cells" + (" (numbers: top class)" if annotate else ""),
                  fontsize=10)
    fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.04)
    legend = ", ".join(f"{c} {dense_map.label(c).split(',')[0]} ({n})" for c, n in dense_map.class_counts()[:4])
    fig.suptitle(f"dense classification, {dense_map.arch or dense_map.model}\n"
                 f"most cells: {legend}", fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.94, bottom=0.1, top=0.84, wspace=0.15)
    return fig
