"""Pictures: every figure renders to a PNG of the expected pixel size that is not blank,
from the Python API and from ``deepfeat visualize``, with no network access."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

import deepfeat
import deepfeat.cli
from deepfeat.errors import LayerError, UsageError
from deepfeat.pooling import crow
from deepfeat.surgery import dense_map, fully_convolutional
from deepfeat.viz import network as viz

from .conftest import SHARED_CAFFE, needs_shared_caffe

CIFAR = SHARED_CAFFE / "cifar10_quick"
LENET = SHARED_CAFFE / "lenet_mnist"
LENET_SPEC = f"caffe:{LENET / 'lenet.prototxt'}@{LENET / 'lenet_iter_10000.caffemodel'}"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def assert_png(path, size: tuple[int, int]) -> np.ndarray:
    """The file exists, is a PNG of *size* (W, H) pixels and is not one flat colour."""
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size
        arr = np.asarray(im.convert("RGB"))
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 50, "the picture is (almost) blank"
    assert arr.std() > 10
    return arr


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


def test_tile_grid_layout_padding_and_normalisation():
    data = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3) - 7.0
    grid = viz.tile_grid(data, pad=1)
    assert grid.shape == (2 * 4 + 1, 3 * 3 + 2)  # 3 columns, 2 rows, 1-pixel padding between tiles
    assert grid.min() == 0.0
    assert np.array_equal(grid[4, :], np.ones(11))  # the padding row is white
    assert np.array_equal(grid[5:9, 8:11], np.ones((4, 3)))  # the unused sixth cell too
    expect = (data - data.min()) / (data.max() - data.min())
    assert np.allclose(grid[:4, :3], expect[0]) and np.allclose(grid[5:9, 4:7], expect[4])
    colour = viz.tile_grid(np.random.default_rng(0).random((10, 2, 2, 3)), pad=2, pad_value=0.0)
    assert colour.shape == (3 * 2 + 2 * 2, 4 * 2 + 3 * 2, 3)  # 4 columns; 3 rows are enough for 10 tiles
    assert viz.tile_grid(np.full((1, 3, 3), 5.0)).max() == 0.0  # a constant map is not divided by zero
    raw = viz.tile_grid(data, pad=0, normalize=False)
    assert raw.shape == (8, 9) and raw[0, 0] == -7.0
    with pytest.raises(UsageError):
        viz.tile_grid(np.zeros((2, 3)))
    with pytest.raises(UsageError):
        viz.tile_grid(np.zeros((0, 3, 3)))


def test_crow_spatial_weights_are_poolings_crow():
    x = torch.relu(torch.randn(2, 16, 5, 7, generator=torch.Generator().manual_seed(0)))
    s = viz.crow_spatial_weights(x)
    assert s.shape == (2, 5, 7) and (s >= 0).all()
    # S' together with CroW's channel weights rebuilds deepfeat.pooling.crow exactly
    q = (x != 0).float().mean(dim=(2, 3))
    beta = torch.where(q > 0, torch.log(q.sum(1, keepdim=True) / q.clamp_min(1e-30)), torch.zeros_like(q))
    assert torch.allclose((x * s[:, None]).sum(dim=(2, 3)) * beta, crow(x), rtol=1e-5, atol=1e-6)
    assert torch.allclose(viz.crow_spatial_weights(x, a=2, b=1).pow(2).sum(dim=(1, 2)), torch.ones(2))
    with pytest.raises(UsageError):
        viz.crow_spatial_weights(x[0])


def test_figures_use_agg_and_save_at_figsize_times_dpi(tmp_path):
    fig = viz._figure(3, 2)
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(np.random.default_rng(0).random((20, 30)))
    out = viz.save_figure(fig, tmp_path / "sub" / "x.png", dpi=40)
    assert_png(tmp_path / "sub" / "x.png", (120, 80))
    assert out.endswith("x.png")
    with pytest.raises(UsageError, match="PNG"):
        viz.save_figure(fig, tmp_path / "x.jpg")
    with pytest.raises(UsageError, match="dpi"):
        viz.save_figure(fig, tmp_path / "y.png", dpi=0)


# ---------------------------------------------------------------------------
# Every picture from the API (the real embedded model on the cat photo)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cat_dense_map(lite0, photos):
    return dense_map(lite0, photos["chelsea"], 288, net=fully_convolutional(lite0))


def test_every_picture_renders(lite0, photos, cat_dense_map, tmp_path):
    cat = photos["chelsea"]
    figures = {
        "filters": (viz.plot_filters(lite0), ["conv_stem", "32 x 3 x 3 x 3"]),
        "activations": (viz.plot_activations(lite0, cat, "blocks.1", n=16), ["blocks.1", "24 x 56 x 56",
                                                                              "chelsea_cat.jpg", "first 16 of 24"]),
        "histogram": (viz.plot_histogram(lite0, cat, "conv_head"), ["conv_head", "1280 x 7 x 7", "positive"]),
        "probabilities": (viz.plot_probabilities(lite0, cat), ["1000 classes", "chelsea_cat.jpg", "cat"]),
        "crow": (viz.plot_crow(lite0, cat, "blocks.5", size="long:320"), ["blocks.5", "CroW", "chelsea_cat.jpg"]),
        "densemap": (viz.plot_densemap(cat_dense_map), ["3 x 3 cells", "chelsea_cat.jpg", "Egyptian cat"]),
    }
    for name, (fig, words) in figures.items():
        assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
        text = " ".join([fig._suptitle.get_text() if fig._suptitle else ""]
                        + [t.get_text() for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]
                        + [t.get_text() for ax in fig.axes for t in ax.texts])
        for w in words:
            assert w in text, f"{name}: {w!r} not in {text!r}"
        w_in, h_in = fig.get_size_inches()
        path = tmp_path / f"{name}.png"
        viz.save_figure(fig, path, dpi=40)
        assert_png(path, (round(w_in * 40), round(h_in * 40)))


@needs_shared_caffe
def test_filters_colour_order_and_gray_tiles():
    caffe = deepfeat.load_model(f"caffe:{CIFAR / 'cifar10_quick_deploy_v2_bvlc.prototxt'}@"
                                f"{CIFAR / 'cifar10_quick_iter_5000.caffemodel'}")
    tiles, name, what = viz.filter_tiles(caffe)
    w = caffe.net.conv1.weight.detach().numpy()
    assert name == "conv1" and tiles.shape == (32, 5, 5, 3) and "RGB" in what
    assert np.array_equal(tiles, w.transpose(0, 2, 3, 1)[..., ::-1])  # BGR filters shown in RGB order
    gray, name2, what2 = viz.filter_tiles(caffe, "conv2", max_tiles=100)
    assert name2 == "conv2" and gray.shape == (100, 5, 5) and "100 of 1024" in what2
    assert np.array_equal(gray[33], caffe.net.conv2.weight.detach().numpy()[1, 1])
    with pytest.raises(LayerError, match="not a convolution"):
        viz.plot_filters(caffe, "pool1")
    with pytest.raises(LayerError, match="not found"):
        viz.plot_filters(caffe, "conv9")


def test_bad_picture_requests_are_clear(lite0, photos):
    with pytest.raises(UsageError, match="histogram"):
        viz.plot_activations(lite0, photos["chelsea"], "classifier")
    with pytest.raises(UsageError, match="N x C x H x W|C x H x W"):
        viz.plot_crow(lite0, photos["chelsea"], "classifier")
    with pytest.raises(UsageError, match="DenseMap"):
        viz.plot_densemap(np.zeros((3, 3)))
    with pytest.raises(UsageError, match="n must be"):
        viz.plot_activations(lite0, photos["chelsea"], "blocks.1", n=0)


# ---------------------------------------------------------------------------
# deepfeat visualize
# ---------------------------------------------------------------------------


def _cli(monkeypatch, argv: list[str]) -> int:
    mine = tuple(m for m in ("cmd_densemap", "cmd_visualize") if m not in deepfeat.cli.COMMAND_MODULES)
    monkeypatch.setattr(deepfeat.cli, "COMMAND_MODULES", deepfeat.cli.COMMAND_MODULES + mine)
    return deepfeat.cli.main(argv)


@pytest.mark.parametrize("kind, extra, size", [
    ("filters", [], (180, 192)),
    ("activations", ["--layer", "blocks.2", "--n", "9"], (180, 192)),
    ("histogram", ["--layer", "classifier"], (240, 180)),
    ("probabilities", [], (240, 120)),
    ("crow", ["--layer", "conv_head", "--size", "long:256"], (300, 138)),
    pytest.param("densemap", ["--size", "56", "--model", LENET_SPEC], (300, 144),  # LeNet: cheap, 8 x 8 cells
                 marks=needs_shared_caffe),
])
def test_cli_visualize(monkeypatch, capsys, photos, tmp_path, kind, extra, size):
    out = tmp_path / f"{kind}.png"
    image = [] if kind == "filters" else [photos["chelsea"]]
    assert _cli(monkeypatch, ["visualize", kind, *image, "--model", "efficientnet_lite0", "-o", str(out),
                              "--dpi", "30", *extra]) == 0
    assert_png(out, size)
    assert f"{size[0]} x {size[1]} px" in capsys.readouterr().err


def test_cli_visualize_usage_errors(monkeypatch, capsys, photos, tmp_path):
    assert _cli(monkeypatch, ["visualize", "crow", photos["chelsea"]]) == 2
    assert "--layer" in capsys.readouterr().err
    assert _cli(monkeypatch, ["visualize", "activations", "--layer", "blocks.1"]) == 2
    assert "needs an IMAGE" in capsys.readouterr().err
    assert _cli(monkeypatch, ["visualize", "filters", photos["chelsea"]]) == 2
    assert "takes no IMAGE" in capsys.readouterr().err
    assert _cli(monkeypatch, ["visualize", "histogram", photos["chelsea"], "--layer", "nope",
                              "-o", str(tmp_path / "h.png")]) == 1
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "h.png").exists()
