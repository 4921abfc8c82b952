"""The ``onnx:`` source: the embedded model exported to ONNX must classify, tap, list and
extract exactly like the PyTorch model it came from; tiny exported graphs cover NHWC
layouts, static batch sizes, uint8 inputs and the errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfeat.backends.featurenet import FeatureNet
from deepfeat.cli import main
from deepfeat.data.images import decode_image
from deepfeat.data.preprocess import SizePolicy
from deepfeat.errors import FormatError, LayerError, ModelError, UsageError
from deepfeat.models import load_model
from deepfeat.models.classify import classify, classify_images, probabilities
from deepfeat.models.taps import Taps, make_taps, model_layer_table
from deepfeat.pipeline import ExtractConfig, default_layer, extract
from deepfeat.pooling import get_pooling
from deepfeat.store import FeatureStore

from .conftest import CAT_CLASSES, ESPRESSO

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

B5 = "/blocks/blocks.5/"  # the ONNX name scope of timm's module blocks.5


def _export(net: torch.nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = True,
            output: str = "out") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape constants are expected
        torch.onnx.export(
            net.eval(), (example,), str(path), input_names=["image"], output_names=[output],
            dynamic_axes={"image": {0: "batch"}, output: {0: "batch"}} if dynamic_batch else None,
            opset_version=17, dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def lite0_onnx(tmp_path_factory, lite0) -> tuple[Path, str]:
    """The embedded model as an NCHW ONNX file with a dynamic batch, and its spec with the
    preprocessing read off the PyTorch model's data config."""
    path = _export(lite0.net, torch.zeros(1, 3, 224, 224), tmp_path_factory.mktemp("onnx") / "lite0.onnx",
                   output="logits")
    dc = lite0.data_config
    query = "&".join([
        "mean=" + ",".join(str(v) for v in dc.mean), "std=" + ",".join(str(v) for v in dc.std), "scale=1/255",
        f"input_size={dc.input_size[0]}x{dc.input_size[1]}", f"interpolation={dc.interpolation}", f"crop_pct={dc.crop_pct}",
        f"resize={dc.resize_mode}",
    ])
    return path, f"onnx:{path}?{query}"


@pytest.fixture(scope="module")
def onnx_lite0(lite0_onnx):
    return load_model(lite0_onnx[1])


@pytest.fixture(scope="module")
def lite0_table(onnx_lite0):
    return model_layer_table(onnx_lite0, (3, 224, 224))


def _last_tensor_of(table, scope: str) -> str:
    """The tensor a PyTorch module returns: the last one produced inside its name scope."""
    rows = [l for l in table.layers if f"node {scope}" in l.note]
    assert rows, f"no node under {scope}"
    return rows[-1].name


def test_classification_matches_the_torch_model(lite0, lite0_onnx, onnx_lite0, photos, capsys):
    path, spec = lite0_onnx
    m = onnx_lite0
    assert dataclasses.replace(m.data_config, fixed_input_size=False) == lite0.data_config
    assert m.data_config.fixed_input_size  # the export fixed 224x224; only the batch is dynamic
    assert m.source == "onnx" and m.output_kind == "logits" and m.num_classes == 1000
    assert m.labels[ESPRESSO] == "espresso"
    meta = m.meta()
    assert meta["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["onnx"]["opset"] == 17 and meta["onnx"]["producer"].startswith("pytorch")
    assert meta["onnx"]["layout"] == "NCHW" and meta["onnx"]["batch"] == "dynamic"
    # keyword options are the same as options in the spec
    kw = load_model(f"onnx:{path}", mean=(0.5, 0.5, 0.5), std="0.5", scale=1 / 255, input_size=224,
                    interpolation="bicubic", crop_pct=0.875)
    assert kw.data_config == m.data_config

    px = np.stack([decode_image(photos[k], SizePolicy("model"), m.data_config).pixels for k in ("chelsea", "coffee")])
    with torch.inference_mode():
        p_onnx = probabilities(m, m.forward_uint8(torch.from_numpy(px)))
        p_torch = probabilities(lite0, lite0.forward_uint8(torch.from_numpy(px)))
    assert torch.allclose(p_onnx, p_torch, atol=1e-4)
    assert int(p_onnx[0].argmax()) in CAT_CLASSES and int(p_onnx[1].argmax()) == ESPRESSO

    res = classify(m, [photos["chelsea"], photos["coffee"]], k=3, batch_size=2, workers=1)
    assert res[0].predictions[0].index in CAT_CLASSES and res[1].predictions[0].label == "espresso"
    assert main(["classify", photos["coffee"], "--model", spec, "--json", "--top", "1", "--device", "cpu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"][0]["predictions"][0]["index"] == ESPRESSO
    assert abs(doc["results"][0]["predictions"][0]["prob"] - float(p_torch[1, ESPRESSO])) < 1e-4


def test_taps_pooled_with_gem_match_the_torch_taps(lite0, onnx_lite0, lite0_table, photos):
    m = onnx_lite0
    b5 = _last_tensor_of(lite0_table, B5)
    assert b5 == "/blocks/blocks.5/blocks.5.3/Add_output_0"  # the residual add ending blocks.5
    dflt = default_layer(m)  # the final feature map (bn2 with its ReLU6), as for the torch model
    assert dflt == "/bn2/act/Clip_output_0"
    px = np.stack([decode_image(photos[k], SizePolicy("model"), m.data_config).pixels
                   for k in ("chelsea", "coffee")])
    x = m.normalize(torch.from_numpy(px))
    gem = get_pooling("gem")
    with torch.inference_mode():
        got = make_taps(m, [b5, "/blocks/blocks.5/blocks.5.3/Add", dflt, "output"])(x)
        ref = Taps(lite0.net, ["blocks.5", "bn2", "output"])(x)
    assert got[b5].shape == ref["blocks.5"].shape == (2, 192, 7, 7)
    assert torch.equal(got[b5], got["/blocks/blocks.5/blocks.5.3/Add"])  # a node name taps its first output
    assert torch.allclose(gem(got[b5]), gem(ref["blocks.5"]), atol=1e-4)
    assert torch.allclose(gem(got[dflt]), gem(ref["bn2"]), atol=1e-4)
    assert torch.allclose(got["output"], ref["output"], atol=1e-3)
    # the reduced graph for an early tap runs the nodes it needs and no others
    sub = m.net.graph.subgraph(["/conv_stem/Conv_output_0"])
    assert [n.op_type for n in sub.graph.node].count("Conv") == 1 and len(sub.graph.initializer) == 2
    assert len(sub.graph.node) < len(m.net.graph.nodes) / 4

    with pytest.raises(LayerError) as e:
        make_taps(m, ["/blocks/blocks.5/blocks.5.3/Addd_output_0"])
    assert "/blocks/blocks.5/blocks.5.3/Add_output_0" in str(e.value)  # a close match is suggested
    with pytest.raises(LayerError) as e:  # a PyTorch module name points at the tensors of its scope
        make_taps(m, ["blocks.6"])
    assert "/blocks/blocks.6/blocks.6.0/conv_pwl/Conv_output_0" in str(e.value)
    with pytest.raises(LayerError, match="initializer"):
        make_taps(m, ["classifier.weight"])


def test_layers_command_lists_nodes_with_shapes(lite0_onnx, capsys):
    spec = lite0_onnx[1]
    assert main(["layers", "--model", spec, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {l["name"]: l for l in doc["layers"]}
    assert doc["layers"][0]["name"] == "image" and doc["layers"][0]["shape"] == [3, 224, 224]
    stem = rows["/conv_stem/Conv_output_0"]
    assert stem["type"] == "Conv" and stem["shape"] == [32, 112, 112]
    assert stem["params"] == 32 * 3 * 3 * 3 + 32  # BatchNorm folded into the convolution by the export
    assert rows["/blocks/blocks.5/blocks.5.3/Add_output_0"]["shape"] == [192, 7, 7]
    assert rows["/global_pool/pool/GlobalAveragePool_output_0"]["shape"] == [1280, 1, 1]
    assert rows["logits"]["type"] == "Gemm" and rows["logits"]["shape"] == [1000]
    assert rows["output"]["shape"] == [1000]
    assert rows["/conv_stem/Shape_output_0"]["shape"] == [4]  # shape arithmetic keeps its full shape
    params = {p["name"]: p for p in doc["params"]}
    assert params["classifier.weight"]["shape"] == [1000, 1280] and params["classifier.weight"]["kind"] == "param"
    assert doc["total_params"] > 4_000_000
    assert main(["layers", "--model", spec, "--no-params"]) == 0
    text = capsys.readouterr().out
    assert "/blocks/blocks.5/blocks.5.3/Add_output_0" in text and "192x7x7" in text and "Conv" in text
    # a static input size cannot be listed at another size
    assert main(["layers", "--model", spec, "--size", "160", "160"]) == 2
    assert "takes 224x224 images only" in capsys.readouterr().err


def test_extract_end_to_end_matches_the_torch_model(lite0, lite0_onnx, lite0_table, photos, tmp_path):
    spec = lite0_onnx[1]
    b5 = _last_tensor_of(lite0_table, B5)
    paths = sorted(photos[k] for k in ("chelsea", "coffee", "rocket"))
    rep = extract(ExtractConfig(inputs=paths, output=str(tmp_path / "s"), model=spec, layers=[b5], pooling="gem",
                                workers=0, progress="none", batch_size=4))
    assert rep.ok == len(paths) and rep.failed == 0
    store = FeatureStore(tmp_path / "s")
    assert store.meta["model"]["source"] == "onnx" and store.meta["layers"] == [b5] and store.dim == 192
    fnet = FeatureNet(lite0, ["blocks.5"], get_pooling(store.meta["pooling"]))
    px = np.stack([decode_image(p, SizePolicy("model"), lite0.data_config).pixels for p in store.paths])
    with torch.inference_mode():
        ref = fnet(torch.from_numpy(px))[0].numpy()
    got = store.raw()
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.9999
    assert np.allclose(got, ref, rtol=1e-4, atol=1e-5)


class _NHWCConv(torch.nn.Module):
    """A Keras-style network: N x H x W x C in, a convolution, N x H x W x C out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x.permute(0, 3, 1, 2)).relu().permute(0, 2, 3, 1)


def test_nhwc_model_layout_detected_and_taps_transposed(tmp_path):
    net = _NHWCConv()
    path = _export(net, torch.zeros(2, 20, 24, 3), tmp_path / "nhwc.onnx", output="features")
    m = load_model(f"onnx:{path}")
    assert m.extra_meta["onnx"]["layout"] == "NHWC"
    assert m.data_config.input_size == (20, 24) and m.data_config.fixed_input_size
    assert m.data_config.mean == (0.485, 0.456, 0.406) and m.data_config.channel_order == "RGB"
    table = model_layer_table(m, (3, 20, 24))
    conv = next(l for l in table.layers if l.type == "Conv")
    out = next(l for l in table.layers if l.name == "features")
    assert conv.shape == [8, 20, 24] and "NHWC" not in conv.note  # Conv is NCHW in ONNX
    assert out.shape == [8, 20, 24] and "NHWC in the graph" in out.note
    assert m.extra_meta["default_layer"] == "features"

    x = torch.randn(3, 3, 20, 24)  # what deepfeat feeds: normalised N x C x H x W
    with torch.inference_mode():
        ref_conv = net.conv(x)
        ref_out = net(x.permute(0, 2, 3, 1))
        taps = make_taps(m, [conv.name, "features"])(x)
        y = m.net(x)
    assert y.shape == (3, 20, 24, 8) and torch.allclose(y, ref_out, atol=1e-5)  # the net's output as it is
    assert taps[conv.name].shape == (3, 8, 20, 24) and torch.allclose(taps[conv.name], ref_conv, atol=1e-5)
    assert taps["features"].shape == (3, 8, 20, 24)
    assert torch.allclose(taps["features"], ref_out.permute(0, 3, 1, 2), atol=1e-5)
    gem = get_pooling("gem")
    assert torch.allclose(gem(taps["features"]), gem(ref_conv.relu()), atol=1e-5)
    # tap_layout overrides the tracking
    raw = load_model(f"onnx:{path}?tap_layout=NCHW")
    with torch.inference_mode():
        assert make_taps(raw, ["features"])(x)["features"].shape == (3, 20, 24, 8)
    # a forced layout that contradicts the graph is a clear error
    with pytest.raises(ModelError, match="channels"):
        load_model(f"onnx:{path}?layout=NCHW")


class _TinyClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x):
        y = self.conv(x).relu().mean((2, 3))
        return self.fc(y).softmax(-1)


def test_static_batch_of_one_runs_many_images(tmp_path):
    net = _TinyClassifier()
    path = _export(net, torch.zeros(1, 3, 32, 32), tmp_path / "b1.onnx", dynamic_batch=False, output="prob")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {c}" for c in "abcde") + "\n")
    m = load_model(f"onnx:{path}?labels={labels}")
    assert m.extra_meta["onnx"]["batch"] == 1 and m.output_kind == "probs" and m.num_classes == 5
    assert m.labels == [f"class {c}" for c in "abcde"]
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        got = m.net(x)
        ref = net(x)
        conv = next(l.name for l in model_layer_table(m, (3, 32, 32)).layers if l.type == "Conv")
        tapped = make_taps(m, [conv])(x)[conv]
    assert got.shape == (3, 5) and torch.allclose(got, ref, atol=1e-5)
    assert torch.allclose(tapped, net.conv(x), atol=1e-5)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    preds = classify_images(m, images, k=2)
    assert len(preds) == 3 and all(p[0].label.startswith("class ") for p in preds)
    # the labels keyword of load_model works the same, and a wrong count is refused
    assert load_model(f"onnx:{path}", labels=str(labels)).labels == m.labels
    bad = tmp_path / "bad.txt"
    bad.write_text("a\nb\n")
    with pytest.raises(UsageError, match="2 labels but the model has 5"):
        load_model(f"onnx:{path}?labels={bad}")
    # the graph's input is 32x32: other sizes are a clear error, not an ONNX Runtime trace
    with pytest.raises(UsageError, match="32x32 images only"):
        m.net(torch.zeros(1, 3, 40, 40))
    with pytest.raises(UsageError, match="fixed at 32x32"):
        load_model(f"onnx:{path}?input_size=64")


class _MeanOfPixels(torch.nn.Module):
    def forward(self, x):
        return x.float().mean((2, 3))


def test_uint8_input_gets_raw_pixels(tmp_path):
    path = _export(_MeanOfPixels(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), tmp_path / "u8.onnx")
    m = load_model(f"onnx:{path}")
    assert m.data_config.scale == 1.0 and m.data_config.mean == (0.0,) * 3 and m.data_config.std == (1.0,) * 3
    px = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    with torch.inference_mode():
        got = m.forward_uint8(torch.from_numpy(px))
    assert torch.allclose(got, torch.from_numpy(px).float().mean((1, 2)), atol=1e-4)


def test_errors(tmp_path, lite0_onnx):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(FormatError, match="garbage.onnx"):
        load_model(f"onnx:{garbage}")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(lite0_onnx[0].read_bytes()[:200_000])
    with pytest.raises(FormatError, match="truncated.onnx"):
        load_model(f"onnx:{truncated}")
    with pytest.raises(ModelError, match="not found"):
        load_model(f"onnx:{tmp_path / 'missing.onnx'}")
    path = lite0_onnx[0]
    with pytest.raises(UsageError, match="Did you mean: mean"):
        load_model(f"onnx:{path}?meen=0.5")
    with pytest.raises(UsageError, match="layout"):
        load_model(f"onnx:{path}?layout=NCWH")
    with pytest.raises(UsageError, match="2 values for a 3-channel"):
        load_model(f"onnx:{path}?mean=0.5,0.5")
    with pytest.raises(UsageError, match="key=value"):
        load_model(f"onnx:{path}?mean")
    with pytest.raises(UsageError, match="not a tensor"):
        load_model(f"onnx:{path}?output=logit")
    # a model whose input is not an image
    linear = _export(torch.nn.Linear(10, 2), torch.zeros(1, 10), tmp_path / "linear.onnx")
    with pytest.raises(ModelError, match="4-D"):
        load_model(f"onnx:{linear}")
    # the CLI turns them into one line and an exit code
    assert main(["layers", "--model", f"onnx:{garbage}"]) == 1


def _tf2onnx_style_graph(path: Path) -> dict[str, np.ndarray]:
    """What tf2onnx makes of a small Keras classifier: an NHWC input, Transposes around
    the NCHW Conv, an NHWC tail (Mul, ReduceMean over H and W), Dense, Softmax, Identity."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = {"W": rng.standard_normal((6, 3, 3, 3)), "B": rng.standard_normal(6), "S": rng.standard_normal((1, 1, 1, 6)),
         "D": rng.standard_normal((6, 4))}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["t0"], perm=[0, 3, 1, 2], name="model/conv/Conv2D__6"),
        helper.make_node("Conv", ["t0", "W", "B"], ["c0"], pads=[1, 1, 1, 1], name="model/conv/Conv2D"),
        helper.make_node("Relu", ["c0"], ["r0"], name="model/conv/Relu"),
        helper.make_node("Transpose", ["r0"], ["model/conv/Relu:0"], perm=[0, 2, 3, 1], name="model/conv/Relu__9"),
        helper.make_node("Mul", ["model/conv/Relu:0", "S"], ["model/scale/mul:0"], name="model/scale/mul"),
        helper.make_node("ReduceMean", ["model/scale/mul:0"], ["gap"], axes=[1, 2], keepdims=0, name="model/gap"),
        helper.make_node("MatMul", ["gap", "D"], ["logits"], name="model/dense/MatMul"),
        helper.make_node("Softmax", ["logits"], ["sm"], axis=-1, name="model/dense/Softmax"),
        helper.make_node("Identity", ["sm"], ["predictions"], name="Identity"),
    ]
    graph = helper.make_graph(
        nodes, "tf2onnx", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__1", 16, 20, 3])],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["unk__1", 4])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tf2onnx")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def test_tf2onnx_style_graph_tracks_layouts(tmp_path):
    w = _tf2onnx_style_graph(tmp_path / "keras.onnx")
    m = load_model(f"onnx:{tmp_path / 'keras.onnx'}?mean=0.5&std=0.5")
    assert m.extra_meta["onnx"]["layout"] == "NHWC" and m.output_kind == "probs" and m.num_classes == 4
    assert m.data_config.input_size == (16, 20) and m.extra_meta["default_layer"] == "model/scale/mul:0"
    x = torch.randn(2, 3, 16, 20)
    with torch.inference_mode():
        taps = make_taps(m, ["model/conv/Relu:0", "model/scale/mul", "model/conv/Relu", "gap"])(x)
        probs = m.net(x)
    relu = torch.nn.functional.conv2d(x, torch.from_numpy(w["W"]), torch.from_numpy(w["B"]), padding=1).relu()
    assert torch.allclose(taps["model/conv/Relu:0"], relu, atol=1e-5)  # NHWC in the graph, NCHW when tapped
    assert torch.allclose(taps["model/conv/Relu"], relu, atol=1e-5)  # the NCHW original, as it is
    scaled = relu * torch.from_numpy(w["S"]).permute(0, 3, 1, 2)
    assert torch.allclose(taps["model/scale/mul"], scaled, atol=1e-5)  # layout kept through the Mul
    assert taps["gap"].shape == (2, 6)
    ref = (scaled.mean((2, 3)) @ torch.from_numpy(w["D"])).softmax(-1)
    assert torch.allclose(probs, ref, atol=1e-5)
    rows = {l.name: l for l in model_layer_table(m, (3, 16, 20)).layers}
    assert rows["model/scale/mul:0"].shape == [6, 16, 20] and "NHWC in the graph" in rows["model/scale/mul:0"].note
    assert rows["r0"].shape == [6, 16, 20] and "NHWC" not in rows["r0"].note
