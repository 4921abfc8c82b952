"""Net surgery: classifiers cast as convolutions give dense class maps.

Checked against the original classifiers: at the native input size the one cell
equals the classifier's output; larger inputs give the classic number of cells
(CaffeNet: 451 -> 8 x 8); LeNet's cells equal LeNet run on each window; the real
embedded model sees a cat everywhere in the cat photo.
"""

from __future__ import annotations

import io
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import deepfeat
import deepfeat.cli
from deepfeat.data.images import decode_image
from deepfeat.data.preprocess import DataConfig, SizePolicy
from deepfeat.errors import ModelError, UsageError
from deepfeat.models.base import Model
from deepfeat.models.classify import probabilities
from deepfeat.surgery import DenseClassifier, DenseMap, dense_map, fc_to_conv_weight, fully_convolutional

from .conftest import CAT_CLASSES, SHARED_CAFFE, needs_shared_caffe

CAFFENET = SHARED_CAFFE / "reference_prototxts" / "bvlc_reference_caffenet" / "deploy.prototxt"
LENET = SHARED_CAFFE / "lenet_mnist"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _classifier_probs(model: Model, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return probabilities(model, model.forward_uint8(torch.from_numpy(pixels)[None]))[0].numpy()


# ---------------------------------------------------------------------------
# FC weights as convolution weights
# ---------------------------------------------------------------------------


def test_fc_to_conv_weight_is_the_same_map():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(4 * 3 * 3, 10)
    x = torch.randn(2, 4, 3, 3, generator=g)
    w = fc_to_conv_weight(lin.weight.detach(), 4, 3)
    assert w.shape == (10, 4, 3, 3)
    ref = lin(x.flatten(1))
    got = torch.nn.functional.conv2d(x, w, lin.bias)
    assert got.shape == (2, 10, 1, 1)
    assert torch.allclose(got[:, :, 0, 0], ref, atol=1e-6)
    # on a larger map every output cell is the FC layer applied to one window
    big = torch.randn(1, 4, 5, 6, generator=g)
    dense = torch.nn.functional.conv2d(big, w, lin.bias)
    assert dense.shape == (1, 10, 3, 4)
    for i, j in ((0, 0), (2, 3), (1, 2)):
        assert torch.allclose(dense[0, :, i, j], lin(big[:, :, i:i + 3, j:j + 3].flatten(1))[0], atol=1e-6)
    # numpy in, numpy out; rectangular kernels
    wn = fc_to_conv_weight(np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(2, 24), 3, (2, 4))
    assert isinstance(wn, np.ndarray) and wn.shape == (2, 3, 2, 4) and wn[1, 2, 1, 3] == 47


def test_fc_to_conv_weight_refuses_wrong_shapes():
    with pytest.raises(UsageError, match="36 inputs"):
        fc_to_conv_weight(torch.zeros(10, 37), 4, 3)
    with pytest.raises(UsageError, match="2-D"):
        fc_to_conv_weight(torch.zeros(10, 4, 3, 3), 4, 3)
    with pytest.raises(UsageError, match="positive"):
        fc_to_conv_weight(torch.zeros(10, 36), 0, 3)


# ---------------------------------------------------------------------------
# The classic example: CaffeNet, 451 x 451 -> 8 x 8
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caffenet():
    model = deepfeat.load_model(f"caffe:{CAFFENET}@random")
    return model, fully_convolutional(model)


@needs_shared_caffe
def test_caffenet_fc_layers_become_convolutions(caffenet):
    model, dense = caffenet
    assert isinstance(dense, DenseClassifier) and dense.kind == "fc" and dense.window == (6, 6)
    body = dense.trunk
    assert isinstance(body.fc6, nn.Conv2d) and tuple(body.fc6.weight.shape) == (4096, 256, 6, 6)
    assert isinstance(body.fc7, nn.Conv2d) and tuple(body.fc7.weight.shape) == (4096, 4096, 1, 1)
    assert isinstance(body.fc8, nn.Conv2d) and tuple(body.fc8.weight.shape) == (1000, 4096, 1, 1)
    # the weights are the FC weights, reshaped (C, H, W order)
    fc6 = model.net.fc6.weight.detach()
    assert torch.equal(body.fc6.weight.detach().reshape(4096, -1), fc6)
    # the original model is untouched
    assert isinstance(model.net.fc6, nn.Linear)


@needs_shared_caffe
def test_caffenet_451_gives_8x8_and_native_equals_classifier(caffenet, photos):
    model, dense = caffenet
    dm = dense_map(model, photos["chelsea"], 451, net=dense)
    assert dm.shape == (8, 8) == ((451 - 227) // 32 + 1,) * 2
    assert dm.probs.shape == (1000, 8, 8)
    assert np.allclose(dm.probs.sum(axis=0), 1.0, atol=1e-4)
    assert dm.argmax.shape == (8, 8) and dm.top_prob.shape == (8, 8)
    assert np.array_equal(dm.top_prob, dm.probs.max(axis=0))
    native = dense_map(model, photos["chelsea"], net=dense)
    assert native.shape == (1, 1) and native.input_size == (227, 227)
    px = decode_image(photos["chelsea"], SizePolicy("model"), model.data_config).pixels
    ref = _classifier_probs(model, px)
    assert np.abs(native.probs[:, 0, 0] - ref).max() < 1e-5


@needs_shared_caffe
def test_lenet_cells_are_lenet_on_each_window():
    """Real trained weights, no padding anywhere: each cell of a 56 x 56 input is exactly
    LeNet on the 28 x 28 window at 4-pixel steps."""
    model = deepfeat.load_model(f"caffe:{LENET / 'lenet.prototxt'}@{LENET / 'lenet_iter_10000.caffemodel'}")
    dense = fully_convolutional(model)
    assert dense.window == (4, 4) and dense.output_kind == "probs"
    rng = np.random.default_rng(0)
    digitish = np.zeros((56, 56, 1), np.uint8)
    digitish[10:46, 20:28] = 255  # a bright stroke on black, as MNIST digits are
    digitish = np.clip(digitish.astype(int) + rng.integers(0, 30, digitish.shape), 0, 255).astype(np.uint8)
    dm = dense_map(model, digitish, net=dense)
    assert dm.shape == (8, 8) == ((56 - 28) // 4 + 1,) * 2
    for i, j in ((0, 0), (3, 5), (7, 7), (2, 1)):
        crop = np.ascontiguousarray(digitish[4 * i:4 * i + 28, 4 * j:4 * j + 28])
        assert np.abs(dm.probs[:, i, j] - _classifier_probs(model, crop)).max() < 1e-5


# ---------------------------------------------------------------------------
# torchvision and timm heads
# ---------------------------------------------------------------------------


def _native_equivalence(model: Model, dense: DenseClassifier, seed: int = 0) -> float:
    """Max difference at the native size between the dense map's one cell and the classifier,
    in probabilities and (more telling for random weights, whose probabilities are all
    ~1/1000) in logits relative to their largest magnitude."""
    h, w = model.data_config.input_size
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model.net(x)
        got = dense(x)
        dense.softmax = False
        try:
            got_logits = dense(x)
        finally:
            dense.softmax = True
    assert got.shape == got_logits.shape == (1, logits.shape[1], 1, 1)
    dp = float((got[:, :, 0, 0] - logits.softmax(-1)).abs().max())
    # relative to the logits' own scale (random-init torchvision nets give tiny logits, ~1e-9 for MobileNet v2)
    dl = float((got_logits[:, :, 0, 0] - logits).abs().max()) / max(float(logits.abs().max()), 1e-30)
    return max(dp, dl)


def test_torchvision_alexnet_fc_head_and_saving(tmp_path):
    torch.manual_seed(0)
    model = deepfeat.load_model("torchvision:alexnet@random")
    dense = fully_convolutional(model)
    assert dense.kind == "fc" and dense.window == (6, 6)
    convs = [m for m in dense.head if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(4096, 256, 6, 6), (4096, 4096, 1, 1), (1000, 4096, 1, 1)]
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in dense.modules())  # the 6x6 adaptive pool is gone
    assert _native_equivalence(model, dense) < 1e-5
    with pytest.raises(UsageError, match="window"):
        fully_convolutional(model, window=2)
    # a real module: saved whole and as a state dict, reloaded, same output
    x = torch.randn(1, 3, 256, 288)  # features 7 x 8 -> 2 x 3 windows of 6 x 6
    with torch.no_grad():
        before = dense(x)
    path = tmp_path / "alexnet_dense.pt"
    torch.save(dense, path)
    again = torch.load(path, weights_only=False)
    buf = io.BytesIO()
    torch.save(dense.state_dict(), buf)
    buf.seek(0)
    other = fully_convolutional(model, check=False)
    other.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(again(x), before)
        assert torch.equal(other(x), before)
    assert before.shape == (1, 1000, 2, 3)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_global_pool_heads(arch):
    torch.manual_seed(1)
    model = deepfeat.load_model(f"torchvision:{arch}@random")
    dense = fully_convolutional(model)
    assert dense.kind == "global-pool" and dense.window == (7, 7)
    assert _native_equivalence(model, dense) < 1e-5
    with torch.no_grad():  # stride 32: (288 - 224) / 32 + 1 = 3 cells a side, (320 - 224) / 32 + 1 = 4
        assert dense(torch.randn(1, 3, 288, 320)).shape == (1, 1000, 3, 4)
    if arch != "resnet18":
        return
    # window=1: the linear layer as a 1x1 convolution on the un-pooled map; for average
    # pooling the mean of those logits is the classifier's logits
    cells = fully_convolutional(model, window=1, softmax=False)
    assert cells.output_kind == "logits"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = cells(x)
        ref = model.net(x)
    assert logits.shape == (1, 1000, 7, 7)
    assert float((logits.mean(dim=(2, 3)) - ref).abs().max()) < 1e-4


def test_embedded_model_on_the_cat(lite0, photos):
    dense = fully_convolutional(lite0)
    assert dense.window == (7, 7)
    native = dense_map(lite0, photos["chelsea"], net=dense)
    px = decode_image(photos["chelsea"], SizePolicy("model"), lite0.data_config).pixels
    ref = _classifier_probs(lite0, px)
    assert native.shape == (1, 1)
    assert np.abs(native.probs[:, 0, 0] - ref).max() < 1e-5
    assert int(native.argmax[0, 0]) in CAT_CLASSES
    big = dense_map(lite0, photos["chelsea"], 448, net=dense)
    assert big.shape == (8, 8)
    cat_cells = np.isin(big.argmax, list(CAT_CLASSES)).mean()
    assert cat_cells >= 0.9, big.grid_text()
    # the report: JSON-friendly dict and the text grid with label names
    d = json.loads(json.dumps(big.to_dict()))
    assert d["map_shape"] == [8, 8] and d["input_size"] == [448, 448] and d["native_size"] == [224, 224]
    assert np.array_equal(np.array(d["argmax"]), big.argmax)
    assert sum(c["cells"] for c in d["classes"]) == 64
    assert d["classes"][0]["index"] in CAT_CLASSES and "cat" in d["classes"][0]["label"]
    text = big.grid_text()
    assert "8 x 8 dense map from a 448 x 448 input" in text
    assert any(str(c) in text.splitlines()[2] for c in CAT_CLASSES)
    assert "cat" in big.grid_text(names=True).splitlines()[2]
    # the same map from pixels instead of a path, with any size policy
    px = decode_image(photos["chelsea"], SizePolicy("short", 256), lite0.data_config).pixels
    from_pixels = dense_map(lite0, px, net=dense)
    assert from_pixels.shape == (2, 7) and from_pixels.input_size == (256, 385)
    assert np.allclose(dense_map(lite0, photos["chelsea"], "short:256", net=dense).probs, from_pixels.probs,
                       atol=1e-6)
    with pytest.raises(UsageError, match="native input size"):
        dense_map(lite0, photos["chelsea"], 160, net=dense)


class _PlainLeNet(nn.Module):
    """A hand-written net in the old style: functional pooling and ``x.view(x.size(0), -1)``."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.f1, self.f2 = nn.Linear(16 * 4 * 4, 50), nn.Linear(50, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.f2(torch.relu(self.f1(x)))


def test_any_traceable_net_with_a_flattening_head():
    torch.manual_seed(3)
    model = Model(spec="plain", source="test", arch="PlainLeNet", net=_PlainLeNet(),
                  data_config=DataConfig(input_size=(28, 28), channel_order="L", mean=(0.5,), std=(0.5,)))
    dense = fully_convolutional(model, softmax=False)
    assert dense.kind == "fc" and dense.window == (4, 4) and dense.output_kind == "logits"
    x = torch.randn(1, 1, 40, 44)
    with torch.no_grad():
        y = dense(x)
        assert y.shape == (1, 10, 4, 5)  # stride 4: (40 - 28) / 4 + 1, (44 - 28) / 4 + 1
        for i, j in ((0, 0), (3, 4), (1, 2)):
            ref = model.net(x[:, :, 4 * i:4 * i + 28, 4 * j:4 * j + 28])
            assert float((y[0, :, i, j] - ref[0]).abs().max()) < 1e-5


# ---------------------------------------------------------------------------
# Heads without a convolutional form
# ---------------------------------------------------------------------------


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU())
        self.fc = nn.Linear(8, 5)
        self.gate = nn.Linear(8, 5)

    def forward(self, x):
        v = self.features(x).mean((2, 3))
        return self.fc(v) * torch.sigmoid(self.gate(v))


class _TokensOnly(nn.Module):
    """timm-like, but its features are tokens (N x L x D), as a ViT's."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 8, stride=8)
        self.head = nn.Linear(8, 5)

    def forward_features(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)

    def forward_head(self, x):
        return self.head(x.mean(1))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _toy(net: nn.Module) -> Model:
    return Model(spec="toy", source="test", arch=type(net).__name__, net=net,
                 data_config=DataConfig(input_size=(32, 32)))


def test_unconvertible_heads_say_why():
    with pytest.raises(ModelError, match="combines several values|no global pooling"):
        fully_convolutional(_toy(_TwoHeads()))
    with pytest.raises(ModelError, match="not an N x C x H x W map"):
        fully_convolutional(_toy(_TokensOnly()))
    with pytest.raises(UsageError, match="window"):
        fully_convolutional(_toy(_TwoHeads()), window=0)
    with pytest.raises(UsageError, match="deepfeat Model"):
        fully_convolutional(nn.Linear(3, 3))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def _cli(monkeypatch, argv: list[str]) -> int:
    mine = tuple(m for m in ("cmd_densemap", "cmd_visualize") if m not in deepfeat.cli.COMMAND_MODULES)
    monkeypatch.setattr(deepfeat.cli, "COMMAND_MODULES", deepfeat.cli.COMMAND_MODULES + mine)
    return deepfeat.cli.main(argv)


def test_cli_densemap(monkeypatch, capsys, photos, tmp_path):
    out = tmp_path / "dense.png"
    net_path = tmp_path / "dense.pt"
    assert _cli(monkeypatch, ["densemap", photos["chelsea"], "--size", "288", "-o", str(out), "--json",
                              "--dpi", "50", "--save-net", str(net_path)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["map_shape"] == [3, 3] and d["kind"] == "global-pool" and d["window"] == [7, 7]
    assert d["classes"][0]["index"] in CAT_CLASSES
    with Image.open(out) as im:
        assert im.size == (500, 240)
    saved = torch.load(net_path, weights_only=False)
    assert isinstance(saved, DenseClassifier) and saved.native_size == (224, 224)

    assert _cli(monkeypatch, ["densemap", photos["chelsea"], "--window", "zero"]) == 2
    assert "--window" in capsys.readouterr().err
    assert _cli(monkeypatch, ["densemap", photos["chelsea"], "--dpi", "0"]) == 2


@needs_shared_caffe
def test_cli_densemap_caffe_lenet(monkeypatch, capsys, photos):
    lenet = f"caffe:{LENET / 'lenet.prototxt'}@{LENET / 'lenet_iter_10000.caffemodel'}"
    assert _cli(monkeypatch, ["densemap", photos["chelsea"], "--model", lenet, "--size", "40", "--top-labels"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "chelsea_cat.jpg: 4 x 4 dense map from a 40 x 40 input (native 28 x 28), LeNet"
    assert len(text[2].split()) == 8 and text[2].split()[0] == "class"  # 4 cells named 'class N' (no labels file)


def test_densemap_value_type():
    dm = DenseMap(probs=np.array([[[0.7, 0.2]], [[0.3, 0.8]]], np.float32), labels=["tench, Tinca tinca", "goldfish"],
                  input_size=(10, 20), native_size=(10, 10), model="toy")
    assert dm.shape == (1, 2)
    assert dm.argmax.tolist() == [[0, 1]]
    assert dm.class_counts() == [(0, 1), (1, 1)]
    assert dm.label(5) == "class 5"
    names = dm.grid_text(names=True)
    assert names.splitlines()[2].split() == ["tench", "goldfish"]
    assert "(1 cell, max 0.700)" in names
