"""Caffe models without Caffe: parser, wire format, layers, and agreement with OpenCV.

The reference implementation is OpenCV's independent Caffe importer
(``cv2.dnn.readNetFromCaffe``). Every layer's output is compared, on the real trained
models in ``../shared/caffe`` (or ``$DEEPFEAT_SHARED_CAFFE``) and on the reference
ImageNet architectures with random weights written by deepfeat's own caffemodel
encoder. Tests needing the shared folder skip cleanly without it; the parser, wire
format, layer and error tests run anywhere.

Agreement is measured as max |ours - opencv| / max(1, max |opencv|) per blob and must
be below 1e-4 (float32 with different summation orders; observed values are ~1e-6).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfeat.errors import FormatError, ModelError, UsageError
from deepfeat.models import load_model
from deepfeat.models.caffe import (
    ILSVRC_MEAN_BGR,
    build_net,
    encode_blob,
    encode_caffemodel,
    init_random,
    load_caffe_net,
    netdef_from_message,
    parse_caffemodel,
    parse_text,
    read_caffemodel,
    read_mean,
    read_netdef,
    sanitize,
    split_caffe_spec,
    write_binaryproto,
    write_caffemodel,
)
from deepfeat.models.caffe.layers import LRN, Pooling, pool_out
from deepfeat.models.taps import Taps, layer_table

SHARED = Path(os.environ.get("DEEPFEAT_SHARED_CAFFE")
              or Path(os.environ.get("DEEPFEAT_SHARED") or Path(__file__).resolve().parents[2] / "shared") / "caffe")
REF = SHARED / "reference_prototxts"
TOL = 1e-4
RESULTS: dict[str, float] = {}  # worst relative difference per model (printed with -s)

try:
    import cv2
except ImportError:  # pragma: no cover - opencv-python-headless is a dev dependency
    cv2 = None

torch.set_num_threads(min(2, torch.get_num_threads()))


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} not available (set DEEPFEAT_SHARED_CAFFE to the shared caffe folder)")
    return p


def need_cv2():
    if cv2 is None:
        pytest.skip("opencv-python-headless is not installed")
    cv2.setNumThreads(2)
    return cv2


def opencv_layers(proto: Path, weights: Path, x: np.ndarray, names: list[str]) -> dict[str, list[np.ndarray]]:
    """Every output of each named layer, from OpenCV's Caffe implementation (no fusion, so
    a layer followed by an in-place ReLU keeps its own value)."""
    cv = need_cv2()
    net = cv.dnn.readNetFromCaffe(str(proto), str(weights))
    net.enableFusion(False)
    net.setPreferableBackend(cv.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv.dnn.DNN_TARGET_CPU)
    x = np.ascontiguousarray(x, dtype=np.float32)
    net.setInput(x)
    outs = net.forwardAndRetrieve(names)
    res = {n: [np.asarray(o) for o in outs_n] for n, outs_n in zip(names, outs)}
    for n in names:
        # OpenCV keeps only the first output of a requested layer from being reused by later
        # layers: fetch the other tops of a multi-top layer (Slice) by running just up to it
        if len(res[n]) > 1:
            net.setInput(x)
            res[n] = [np.asarray(o) for o in net.forwardAndRetrieve([n])[0]]
    return res


def compare_with_opencv(net, proto: Path, weights: Path, x: np.ndarray, key: str) -> float:
    """Compare every layer's every top with OpenCV; returns the worst relative difference."""
    names = list(net.layer_names)
    with torch.inference_mode():
        ours = net.forward_layers(torch.from_numpy(x))
    ref = opencv_layers(proto, weights, x, names)
    worst, where = 0.0, ""
    for n in names:
        # (OpenCV adds the argmax mask as a second output of a MAX pooling no layer consumes)
        assert len(ref[n]) >= len(ours[n]), f"{key}: layer {n} has {len(ours[n])} tops, OpenCV {len(ref[n])}"
        for i, (o, r) in enumerate(zip(ours[n], ref[n])):
            o = o.numpy()
            assert o.size == r.size, f"{key}: layer {n} top {i}: shape {o.shape} vs OpenCV {r.shape}"
            o = o.reshape(r.shape)
            scale = max(1.0, float(np.abs(r).max()))
            rel = float(np.abs(o - r).max()) / scale
            assert rel <= TOL, f"{key}: layer {n} top {i} differs from OpenCV by {rel:.3g} (relative)"
            if rel >= worst:
                worst, where = rel, n
    # the net's forward returns the output blob, equal to the last layer writing it
    with torch.inference_mode():
        out = net(torch.from_numpy(x)).numpy()
    r = ref[net.output_layer][0]
    assert np.abs(out.reshape(r.shape) - r).max() <= TOL * max(1.0, float(np.abs(r).max()))
    RESULTS[key] = max(RESULTS.get(key, 0.0), worst)
    print(f"\n[caffe vs opencv] {key}: {len(names)} layers, worst relative diff {worst:.2e} at {where}")
    return worst


@pytest.fixture(scope="module")
def cifar_images():
    d = shared("cifar10_quick")
    return [str(d / f"{n}10.png") for n in ("dog", "cat", "truck")]


def real_batch(model, paths: list[str]) -> np.ndarray:
    """Images through deepfeat's own decode + preprocessing for *model*."""
    from deepfeat.data.images import decode_image
    from deepfeat.data.preprocess import SizePolicy

    pix = [decode_image(p, SizePolicy("model"), model.data_config).pixels for p in paths]
    with torch.inference_mode():
        return model.normalize(torch.from_numpy(np.stack(pix))).numpy()


# ---------------------------------------------------------------------------
# Text format
# ---------------------------------------------------------------------------

TEXT = r"""
# a comment
name: "net"   # trailing comment
input: 'data'
input_dim: 1 input_dim: 3, input_dim: 8; input_dim: 8
layer {
  name: "c\"1\x41\101\n" type: "Convolution"
  bottom: "data" top: "c1"
  param: { lr_mult: 1 } param < lr_mult: 2 >
  convolution_param { num_output: 4 kernel_size: [3, 3] pad: 1 weight_filler { std: 1e-2 } bias_term: false }
}
layers { name: "x" "y" type: CONVOLUTION blobs_lr: -1.5 weight_decay: .5 f: -inf g: 0x1F h: 2.5f }
"""


def test_text_format_parses_every_form():
    m = parse_text(TEXT, "t.prototxt")
    assert m.str("name") == "net" and m.strs("input") == ["data"]
    assert m.ints("input_dim") == [1, 3, 8, 8]
    layer = m.msgs("layer")[0]
    assert layer.str("name") == 'c"1AA\n'
    assert [p.float("lr_mult") for p in layer.msgs("param")] == [1.0, 2.0]
    conv = layer.msg("convolution_param")
    assert conv.ints("kernel_size") == [3, 3] and conv.bool("bias_term") is False
    assert conv.msg("weight_filler").float("std") == pytest.approx(0.01)
    v1 = m.msgs("layers")[0]
    assert v1.str("name") == "xy" and v1.enum("type") == "CONVOLUTION"
    assert v1.float("blobs_lr") == -1.5 and v1.float("weight_decay") == 0.5
    assert v1.float("f") == float("-inf") and v1.int("g") == 31 and v1.float("h") == 2.5
    assert m.msg("absent") == {} and m.int("absent", 7) == 7


@pytest.mark.parametrize("text,where", [
    ('layer {\n  name: "a"\n  type: "ReLU"\n', "4:1"),             # block never closed
    ('layer {\n  name "a"\n}', "2:8"),                             # missing ':'
    ('layer {\n  name: "a\n}', "2:9"),                             # unterminated string
    ('layer {\n  num: 3 }\n}', "3:1"),                             # stray '}'
    ('input_dim: 1\ninput_dim: @\n', "2:12"),                      # bad character
])
def test_text_format_syntax_errors_name_line_and_column(text, where):
    with pytest.raises(FormatError, match=rf"deploy\.prototxt:{where}"):
        parse_text(text, "deploy.prototxt")


def test_typed_access_and_unknown_fields_are_clear_errors():
    net = 'input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n' \
          'layer { name: "conv1" type: "Convolution" bottom: "data" top: "c" convolution_param { %s } }'
    with pytest.raises(FormatError, match=r"conv1.*num_output.*integer.*'many'"):
        build_net(netdef_from_message(parse_text(net % 'num_output: "many" kernel_size: 3', "d.prototxt")))
    with pytest.raises(FormatError, match=r"conv1.*unknown field 'kernal_size'"):
        build_net(netdef_from_message(parse_text(net % "num_output: 2 kernal_size: 3", "d.prototxt")))
    with pytest.raises(FormatError, match=r"unknown field 'layr'"):
        netdef_from_message(parse_text('input: "data" layr { name: "x" }'))


# ---------------------------------------------------------------------------
# Wire format
# ---------------------------------------------------------------------------


def test_wire_round_trip_all_encodings():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    for fmt in ("v2", "v1"):
        for packed in (True, False):
            data = encode_caffemodel([("c", "Convolution", [w, b]), ("r", "ReLU", [])], name="n", format=fmt,
                                     packed=packed)
            f = parse_caffemodel(data)
            assert f.name == "n" and f.format == fmt and [l.name for l in f.layers] == ["c", "r"]
            assert f.layers[0].type == "Convolution" and f.layers[1].type == "ReLU"
            blobs = f.layers[0].blobs
            np.testing.assert_array_equal(blobs[0].array().reshape(w.shape), w)
            np.testing.assert_array_equal(blobs[1].data, b)
            assert blobs[0].legacy == (fmt == "v1")
            assert blobs[1].fits((4,)) and not blobs[1].fits((2, 2))
    # double_data (packed and not), large int64 dims in BlobShape
    for packed in (True, False):
        f = parse_caffemodel(encode_caffemodel([("a", "Abc", [np.arange(6.0).reshape(2, 3)])], double=True,
                                               packed=packed))
        assert f.layers[0].blobs[0].shape == (2, 3) and f.layers[0].blobs[0].data.dtype == np.float32
        np.testing.assert_array_equal(f.layers[0].blobs[0].array(), np.arange(6).reshape(2, 3))
    blob = parse_caffemodel(encode_caffemodel([("a", "Abc", [np.zeros((300, 1, 1), np.float32)])])).layers[0].blobs[0]
    assert blob.shape == (300, 1, 1) and blob.fits((300, 1, 1))
    assert len(encode_blob(np.zeros((2, 2)), packed=False)) > len(encode_blob(np.zeros((2, 2))))


def test_truncated_and_garbage_caffemodels_are_format_errors(tmp_path):
    w = np.ones((8, 3, 3, 3), np.float32)
    data = encode_caffemodel([("conv1", "Convolution", [w, np.zeros(8, np.float32)])])
    for cut in (len(data) - 1, len(data) // 2, 5):
        with pytest.raises(FormatError, match="truncated"):
            parse_caffemodel(data[:cut], "model.caffemodel")
    with pytest.raises(FormatError, match="empty"):
        parse_caffemodel(b"", "model.caffemodel")
    with pytest.raises(FormatError):
        parse_caffemodel(bytes(range(200, 256)) * 3, "model.caffemodel")
    p = tmp_path / "deploy_as_weights.caffemodel"
    p.write_text('name: "x"\nlayer { name: "a" }\n')
    with pytest.raises(FormatError, match="text prototxt"):
        read_caffemodel(p)


def test_real_truncated_caffemodel(tmp_path):
    src = shared("cifar10_quick", "cifar10_quick_iter_5000.caffemodel")
    proto = shared("cifar10_quick", "cifar10_quick_deploy_v2_bvlc.prototxt")
    data = src.read_bytes()
    for frac in (0.3, 0.5, 0.999):
        bad = tmp_path / f"cut{frac}.caffemodel"
        bad.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(FormatError, match=r"cut.*truncated"):
            load_model(f"caffe:{proto}@{bad}")


def test_mean_files(tmp_path):
    npy = read_mean(shared("bvlc_images_mean", "ilsvrc_2012_mean.npy"))
    proto = read_mean(shared("bvlc_images_mean", "imagenet_mean.binaryproto"))
    assert npy.shape == proto.shape == (3, 256, 256)
    np.testing.assert_allclose(proto, npy, atol=1e-4)
    np.testing.assert_allclose(npy.mean(axis=(1, 2)), ILSVRC_MEAN_BGR, atol=1e-4)
    # our binaryproto writer (legacy num/channels/height/width, as compute_image_mean) round-trips
    p = write_binaryproto(tmp_path / "m.binaryproto", npy[None])
    np.testing.assert_array_equal(read_mean(p), npy)


# ---------------------------------------------------------------------------
# Real trained models against OpenCV
# ---------------------------------------------------------------------------

CIFAR_MEAN = "125.3,122.95,113.87"  # what the real Caffe run subtracted, in channel order
REAL = {
    "lenet_mnist": ("lenet_mnist/lenet.prototxt", "lenet_mnist/lenet_iter_10000.caffemodel", {}),
    "cifar10_quick_v2": ("cifar10_quick/cifar10_quick_deploy_v2_bvlc.prototxt",
                         "cifar10_quick/cifar10_quick_iter_5000.caffemodel", {"mean": CIFAR_MEAN}),
    "cifar10_quick_v1": ("cifar10_quick/cifar10_quick_deploy_v1_bvlc2014.prototxt",
                         "cifar10_quick/cifar10_quick_iter_5000.caffemodel", {"mean": CIFAR_MEAN}),
    "cifar10_full": ("cifar10_full/cifar10_full.prototxt", "cifar10_full/cifar10_full_iter_70000.caffemodel",
                     {"mean": CIFAR_MEAN}),
    "resnet20_cifar10": ("resnet20_cifar10/res20_cifar_deploy_DERIVED.prototxt",
                         "resnet20_cifar10/cifar10_res20_iter_64000.caffemodel",
                         {"mean": CIFAR_MEAN, "channel_order": "RGB"}),
}


@pytest.mark.shared_data
@pytest.mark.parametrize("key", list(REAL))
def test_real_model_matches_opencv(key, cifar_images):
    proto, weights, opts = REAL[key]
    proto, weights = shared(proto), shared(weights)
    model = load_model(f"caffe:{proto}@{weights}", **opts)
    x_img = real_batch(model, cifar_images)
    rng = np.random.default_rng(1)
    x_rand = (rng.uniform(-128, 128, (2,) + x_img.shape[1:]) / (256.0 if key == "lenet_mnist" else 1.0))
    x = np.concatenate([x_img, x_rand.astype(np.float32)])
    compare_with_opencv(model.net, proto, weights, x, key)


@pytest.mark.shared_data
def test_cifar10_quick_reproduces_the_real_caffe_run(cifar_images, tmp_path):
    """A real Caffe run (BGR images minus the CIFAR-10 mean) gave dog10 -> 5, cat10 -> 3,
    truck10 -> 9; so does deepfeat's whole classify path, with V1 and current deploys."""
    from deepfeat.models.classify import classify

    labels = tmp_path / "cifar10.txt"
    labels.write_text("airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n")
    weights = shared("cifar10_quick", "cifar10_quick_iter_5000.caffemodel")
    for deploy in ("cifar10_quick_deploy_v2_bvlc.prototxt", "cifar10_quick_deploy_v1_bvlc2014.prototxt"):
        proto = shared("cifar10_quick", deploy)
        model = load_model(f"caffe:{proto}@{weights}?mean={CIFAR_MEAN}", labels=str(labels))
        assert model.output_kind == "probs" and model.num_classes == 10
        assert model.data_config.channel_order == "BGR" and model.data_config.input_size == (32, 32)
        results = classify(model, cifar_images, k=1)
        assert [r.predictions[0].index for r in results] == [5, 3, 9]
        assert [r.predictions[0].label for r in results] == ["dog", "cat", "truck"]
        # the labels file can also travel in the spec
        m2 = load_model(f"caffe:{proto}@{weights}?mean={CIFAR_MEAN}&labels={labels}")
        assert m2.labels == model.labels


# ---------------------------------------------------------------------------
# Reference architectures with random weights written by our encoder
# ---------------------------------------------------------------------------

# (prototxt, input size override or None, caffemodel format to write)
REFERENCE = {
    "caffenet": ("bvlc_reference_caffenet/deploy.prototxt", None, "v2"),
    "caffenet_v1": ("legacy_v1_bvlc/bvlc_reference_caffenet_deploy_v1.prototxt", (99, 99), "v1"),
    "caffenet_input_dim": ("legacy_v1_bvlc/bvlc_reference_caffenet_deploy_v2_input_dim.prototxt", (99, 99), "v2"),
    "caffenet_input_shape": ("legacy_v1_bvlc/bvlc_reference_caffenet_deploy_v2_input_shape.prototxt", (99, 99),
                             "v2"),
    "alexnet": ("bvlc_alexnet/deploy.prototxt", (99, 99), "v2"),
    "alexnet_v1": ("legacy_v1_bvlc/bvlc_alexnet_deploy_v1.prototxt", (99, 99), "v1"),
    "googlenet": ("bvlc_googlenet/deploy.prototxt", None, "v2"),
    "googlenet_v1": ("legacy_v1_bvlc/bvlc_googlenet_deploy_v1.prototxt", None, "v1"),
    "squeezenet_v1.0": ("squeezenet_v1.0/deploy.prototxt", None, "v2"),
    "squeezenet_v1.1": ("squeezenet_v1.1/deploy.prototxt", None, "v2"),
    "resnet50": ("resnet50_kaiminghe/ResNet-50-deploy.prototxt", None, "v2"),
    "vgg16_v1": ("vgg16_v1_gist/VGG_ILSVRC_16_layers_deploy.prototxt", (64, 64), "v1"),
}
SLOW = {"caffenet", "googlenet_v1", "resnet50"}


@pytest.mark.shared_data
@pytest.mark.parametrize("key", [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in REFERENCE])
def test_reference_prototxt_random_weights_match_opencv(key, tmp_path):
    rel, size, fmt = REFERENCE[key]
    proto = shared("reference_prototxts", *rel.split("/"))
    netdef = read_netdef(proto)
    inp = netdef.inputs[0]
    shape = (1, inp.shape[1]) + (tuple(size) if size else tuple(inp.shape[2:]))
    net = init_random(build_net(netdef, input_shapes={inp.blob: shape}), seed=7)
    weights = net.save_caffemodel(str(tmp_path / f"{key}.caffemodel"), format=fmt)
    del net
    loaded = build_net(netdef, read_caffemodel(weights), input_shapes={inp.blob: shape})
    assert read_caffemodel(weights).format == fmt
    x = np.random.default_rng(3).uniform(-120, 120, shape).astype(np.float32)
    compare_with_opencv(loaded, proto, Path(weights), x, f"{key}@{shape[2]}x{shape[3]}")


def test_zoo_of_layer_types_matches_opencv(tmp_path):
    """The layer types and parameter spellings the reference nets do not use."""
    need_cv2()
    proto = tmp_path / "zoo.prototxt"
    proto.write_text(ZOO)
    netdef = read_netdef(proto)
    net = init_random(build_net(netdef), seed=1)
    weights = Path(net.save_caffemodel(str(tmp_path / "zoo.caffemodel")))
    loaded = build_net(netdef, read_caffemodel(weights))
    x = np.random.default_rng(0).standard_normal((1, 3, 23, 19)).astype(np.float32) * 20
    compare_with_opencv(loaded, proto, weights, x, "layer zoo")
    types = set(loaded.layer_types.values())
    assert {"Deconvolution", "PReLU", "Slice", "Split", "Power", "Reshape", "Flatten", "BNLL", "ELU", "AbsVal",
            "Crop", "MVN", "Exp", "Log", "BatchNorm", "Scale", "LRN", "Eltwise", "Concat", "Sigmoid",
            "TanH"} <= types


ZOO = """
name: "zoo"
input: "data"
input_shape { dim: 1 dim: 3 dim: 23 dim: 19 }
layer { name: "conv/hw" type: "Convolution" bottom: "data" top: "conv/hw"
  convolution_param { num_output: 8 kernel_h: 3 kernel_w: 5 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 2 } }
layer { name: "leaky" type: "ReLU" bottom: "conv/hw" top: "conv/hw" relu_param { negative_slope: 0.1 } }
layer { name: "conv/dil" type: "Convolution" bottom: "conv/hw" top: "conv/dil"
  convolution_param { num_output: 8 kernel_size: 3 pad: 2 dilation: 2 group: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv/dil" top: "conv/dil" batch_norm_param { use_global_stats: true eps: 0.001 } }
layer { name: "scale" type: "Scale" bottom: "conv/dil" top: "conv/dil" scale_param { bias_term: true } }
layer { name: "prelu" type: "PReLU" bottom: "conv/dil" top: "prelu" }
layer { name: "pool_pad" type: "Pooling" bottom: "prelu" top: "pool_pad" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool_max" type: "Pooling" bottom: "prelu" top: "pool_max" pooling_param { pool: MAX kernel_h: 2 kernel_w: 3 stride_h: 2 stride_w: 3 } }
layer { name: "pool_bigpad" type: "Pooling" bottom: "prelu" top: "pool_bigpad" pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "pool_bigpad_ave" type: "Pooling" bottom: "prelu" top: "pool_bigpad_ave" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "lrn_within" type: "LRN" bottom: "pool_pad" top: "lrn_within" lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 norm_region: WITHIN_CHANNEL } }
layer { name: "lrn_across" type: "LRN" bottom: "pool_pad" top: "lrn_across" lrn_param { local_size: 5 alpha: 0.001 beta: 0.75 } }
layer { name: "sig" type: "Sigmoid" bottom: "lrn_within" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "lrn_across" top: "tanh" }
layer { name: "prod" type: "Eltwise" bottom: "sig" bottom: "tanh" top: "prod" eltwise_param { operation: PROD } }
layer { name: "emax" type: "Eltwise" bottom: "sig" bottom: "tanh" top: "emax" eltwise_param { operation: MAX } }
layer { name: "esum" type: "Eltwise" bottom: "prod" bottom: "emax" top: "esum" eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }
layer { name: "cat" type: "Concat" bottom: "esum" bottom: "prod" top: "cat" concat_param { axis: 1 } }
layer { name: "slice" type: "Slice" bottom: "cat" top: "s1" top: "s2" top: "s3" slice_param { axis: 1 slice_point: 4 slice_point: 10 } }
layer { name: "power" type: "Power" bottom: "s2" top: "power" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "mul" type: "Scale" bottom: "power" bottom: "s2" top: "mul" scale_param { axis: 0 } }
layer { name: "absval" type: "AbsVal" bottom: "s1" top: "absval" }
layer { name: "bnll" type: "BNLL" bottom: "s3" top: "bnll" }
layer { name: "elu" type: "ELU" bottom: "bnll" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "exp" type: "Exp" bottom: "elu" top: "exp" exp_param { base: 2 scale: 0.5 shift: 0.1 } }
layer { name: "log" type: "Log" bottom: "exp" top: "log" }
layer { name: "mvn" type: "MVN" bottom: "pool_pad" top: "mvn" }
layer { name: "mvn2" type: "MVN" bottom: "log" top: "mvn2" mvn_param { across_channels: true normalize_variance: false } }
layer { name: "deconv" type: "Deconvolution" bottom: "mul" top: "deconv" convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 } }
layer { name: "crop" type: "Crop" bottom: "deconv" bottom: "prelu" top: "crop" crop_param { axis: 2 offset: 0 offset: 1 } }
layer { name: "gpool" type: "Pooling" bottom: "deconv" top: "gpool" pooling_param { pool: MAX global_pooling: true } }
layer { name: "gpool_ave" type: "Pooling" bottom: "crop" top: "gpool_ave" pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "absval" top: "flat" }
layer { name: "drop" type: "Dropout" bottom: "flat" top: "flat" dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip" inner_product_param { num_output: 12 } }
layer { name: "reshape" type: "Reshape" bottom: "ip" top: "reshape" reshape_param { shape { dim: 0 dim: 3 dim: -1 } } }
layer { name: "ip_axis" type: "InnerProduct" bottom: "reshape" top: "ip_axis" inner_product_param { num_output: 5 axis: 2 } }
layer { name: "softmax" type: "Softmax" bottom: "ip_axis" top: "softmax" softmax_param { axis: 2 } }
layer { name: "split" type: "Split" bottom: "log" top: "sp1" top: "sp2" }
layer { name: "final" type: "Eltwise" bottom: "sp1" bottom: "sp2" top: "final" }
"""


# ---------------------------------------------------------------------------
# Layer semantics OpenCV does not implement (or implements differently)
# ---------------------------------------------------------------------------


def _tiny_net(layers: str, shape=(1, 4, 7, 6)):
    dims = " ".join(f"dim: {d}" for d in shape)
    return build_net(netdef_from_message(parse_text(f'input: "data" input_shape {{ {dims} }}\n{layers}', "t")))


def test_layers_against_caffe_formulas():
    x = torch.randn(2, 4, 7, 6) * 3
    # LRN across channels with k != 1 (OpenCV ignores k): x / (k + alpha/n sum_window x^2)^beta
    y = LRN(5, 0.01, 0.75, 2.0)(x).numpy()
    sq = np.pad(x.numpy() ** 2, ((0, 0), (2, 2), (0, 0), (0, 0)))
    ref = x.numpy() / (2.0 + 0.01 / 5 * sum(sq[:, i:i + 4] for i in range(5))) ** 0.75
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    # Log with base/scale/shift (OpenCV ignores log_param)
    net = _tiny_net('layer { name: "a" type: "AbsVal" bottom: "data" top: "a" }\n'
                    'layer { name: "log" type: "Log" bottom: "a" top: "log" log_param { base: 10 scale: 2 shift: 1 } }\n'
                    'layer { name: "b" type: "Bias" bottom: "log" top: "b" }\n'
                    'layer { name: "s" type: "Scale" bottom: "b" bottom: "a" top: "s" scale_param { axis: 0 bias_term: true } }\n'
                    'layer { name: "t" type: "Threshold" bottom: "s" top: "t" threshold_param { threshold: 0.5 } }\n'
                    'layer { name: "tile" type: "Tile" bottom: "t" top: "tile" tile_param { axis: 1 tiles: 2 } }\n'
                    'layer { name: "sp" type: "Pooling" bottom: "a" top: "sp" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 } }\n'
                    'layer { name: "d" type: "Dropout" bottom: "a" top: "d" dropout_param { dropout_ratio: 0.25 scale_train: false } }')
    init_random(net, 3)
    with torch.inference_mode():
        b = {k: v.numpy() for k, v in net.forward_blobs(x).items()}
    a = np.abs(x.numpy())
    np.testing.assert_allclose(b["log"], np.log10(1 + 2 * a), rtol=1e-5, atol=1e-6)
    bias = net.b.bias.detach().numpy()
    np.testing.assert_allclose(b["b"], b["log"] + bias[None, :, None, None], rtol=1e-6)
    sbias = net.s.bias.detach().numpy()
    np.testing.assert_allclose(b["s"], b["b"] * a + sbias, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(b["t"], (b["s"] > 0.5).astype(np.float32))
    np.testing.assert_array_equal(b["tile"], np.concatenate([b["t"], b["t"]], axis=1))
    np.testing.assert_allclose(b["d"], a * 0.75, rtol=1e-6)
    # MVN against float64 (OpenCV's E[x^2] - E[x]^2 loses digits when the mean dominates)
    from deepfeat.models.caffe.layers import MVN

    z = (torch.randn(2, 3, 5, 5) * 0.03 + 4.0).double()
    m, v = z.mean((2, 3), keepdim=True), z.var((2, 3), unbiased=False, keepdim=True)
    np.testing.assert_allclose(MVN()(z.float()).numpy(), ((z - m) / (v.sqrt() + 1e-9)).numpy(), atol=2e-4)
    # stochastic pooling at test time: sum(x^2)/sum(x) over each (ceil-rounded, clipped) window
    oh, ow = pool_out(7, 3, 2, 0), pool_out(6, 3, 2, 0)
    ref = np.zeros((2, 4, oh, ow), np.float32)
    for i in range(oh):
        for j in range(ow):
            win = a[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            ref[:, :, i, j] = (win ** 2).sum((2, 3)) / (win.sum((2, 3)) + np.finfo(np.float32).tiny)
    np.testing.assert_allclose(b["sp"], ref, rtol=1e-5)


def test_pooling_output_size_is_caffes():
    # ceil rounding (16 -> 8 with k3 s2), and the last window dropped when it would start in the padding
    assert pool_out(16, 3, 2, 0) == 8 and pool_out(13, 3, 2, 0) == 6 and pool_out(6, 3, 2, 1) == 4
    assert pool_out(3, 3, 3, 2) == 2  # ceil gives 3, but the third window would start in the padding
    p = Pooling("AVE", (3, 3), (2, 2), (1, 1))
    y = p(torch.ones(1, 1, 6, 6))
    assert y.shape[-2:] == (4, 4)
    # AVE divides by the window clipped to the padded input, not to the image:
    # corner: 4 pixels / 9; last window rows 5..7 clipped to 5..6 (H + pad = 7): 1 pixel / 4
    assert y[0, 0, 0, 0].item() == pytest.approx(4 / 9) and y[0, 0, 3, 3].item() == pytest.approx(1 / 4)
    assert y[0, 0, 1, 1].item() == pytest.approx(1.0)
    m = Pooling("MAX", (3, 3), (3, 3), (2, 2))  # pad > kernel/2: torch refuses, we pad explicitly
    assert m(torch.arange(9.0).reshape(1, 1, 3, 3)).flatten().tolist() == [0.0, 2.0, 6.0, 8.0]


def test_inner_product_as_convolution():
    net = _tiny_net('layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 5 } }')
    init_random(net, 0)
    x = torch.randn(3, 4, 7, 6)
    conv = net.fc.as_conv2d()
    with torch.inference_mode():
        np.testing.assert_allclose(conv(x).flatten(1).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-5)
        big = conv(torch.randn(1, 4, 11, 9))
    assert big.shape == (1, 5, 5, 4)
    with pytest.raises(ModelError, match=r"'fc' \(InnerProduct\) takes 168 values"):
        net(torch.randn(1, 4, 9, 9))


@pytest.mark.parametrize("layer", [
    'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 1000000000 } }',
    'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 1000000 '
    'kernel_size: 500 } }',
])
def test_a_layer_asking_for_hundreds_of_gigabytes_is_refused_before_allocating(layer, tmp_path, capsys):
    with pytest.raises(ModelError, match=r"would take [\d,]+ GiB .*refuses layers over 4 GiB"):
        _tiny_net(layer)
    proto = tmp_path / "huge.prototxt"
    proto.write_text('input: "data" input_shape { dim: 1 dim: 4 dim: 7 dim: 6 }\n' + layer)
    from deepfeat.cli import main

    assert main(["layers", "--model", f"caffe:{proto}@random"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB" in err[0], err


# ---------------------------------------------------------------------------
# Taps, aliases, layer table
# ---------------------------------------------------------------------------


@pytest.mark.shared_data
def test_taps_fc_before_and_after_inplace_relu():
    proto = shared("lenet_mnist", "lenet.prototxt")
    model = load_model(f"caffe:{proto}@{shared('lenet_mnist', 'lenet_iter_10000.caffemodel')}")
    x = torch.rand(4, 1, 28, 28)
    out = Taps(model.net, ["ip1", "relu1", "conv1", "output"], model.layer_aliases)(x)
    assert (out["ip1"] < 0).any()
    torch.testing.assert_close(out["relu1"], out["ip1"].clamp_min(0))
    assert out["output"].shape == (4, 10)


@pytest.mark.shared_data
def test_taps_fc7_relu7_on_caffenet():
    proto = shared("reference_prototxts", "bvlc_reference_caffenet", "deploy.prototxt")
    model = load_model(f"caffe:{proto}@random", input_size="99x99")
    x = torch.randn(2, 3, 99, 99) * 50
    out = Taps(model.net, ["fc6", "fc7", "relu7", "drop7", "pool5"], model.layer_aliases)(x)
    assert (out["fc7"] < 0).any() and (out["relu7"] >= 0).all()
    torch.testing.assert_close(out["relu7"], out["fc7"].clamp_min(0))
    torch.testing.assert_close(out["drop7"], out["relu7"])  # Dropout is the identity at test time
    assert out["pool5"].shape == (2, 256, 2, 2) and out["fc6"].shape == (2, 4096)
    table = layer_table(model.net, (3, 99, 99), model.layer_aliases)
    rows = {r.name: r for r in table.layers}
    assert rows["fc7"].type == "InnerProduct" and rows["fc7"].shape == [4096]
    assert rows["relu7"].type == "ReLU" and rows["conv1"].shape == [96, 23, 23]
    assert rows["output"].shape == [1000]
    assert model.classifier == "fc8" and model.output_kind == "probs" and len(model.labels) == 1000


def test_names_with_slashes_and_blob_aliases():
    net = _tiny_net(
        'layer { name: "conv/a" type: "Convolution" bottom: "data" top: "blob.a" convolution_param { num_output: 3 kernel_size: 1 } }\n'
        'layer { name: "relu/a" type: "ReLU" bottom: "blob.a" top: "blob.a" }\n'
        'layer { name: "sl" type: "Slice" bottom: "blob.a" top: "x" top: "y:z" slice_param { slice_point: 1 } }\n'
        'layer { name: "cat" type: "Concat" bottom: "y:z" bottom: "x" top: "cat" }')
    init_random(net, 0)
    names = [n for n, _ in net.named_modules() if n]
    assert "conv_a" in names and "relu_a" in names and "sl.y_z" in names
    assert all("." not in n.split(".")[-1] and "/" not in n and ":" not in n for n in names)
    al = net.layer_aliases
    assert al["conv/a"] == "conv_a" and al["relu/a"] == "relu_a"
    assert al["blob.a"] == "relu_a"  # a blob name is its value after the forward pass (after the in-place ReLU)
    assert al["x"] == "sl" and al["y:z"] == "sl.y_z"
    x = torch.randn(2, 4, 7, 6)
    out = Taps(net, ["conv/a", "blob.a", "y:z", "x", "cat"], al)(x)
    assert (out["conv/a"] < 0).any()
    torch.testing.assert_close(out["blob.a"], out["conv/a"].clamp_min(0))
    torch.testing.assert_close(out["cat"], torch.cat([out["y:z"], out["x"]], 1))
    assert out["x"].shape == (2, 1, 7, 6) and out["y:z"].shape == (2, 2, 7, 6)
    rows = {r.name: r for r in layer_table(net, (4, 7, 6), al).layers}
    assert rows["blob.a"].shape == [3, 7, 6] and rows["y:z"].shape == [2, 7, 6]
    assert sanitize("inception_3a/1x1") == "inception_3a_1x1"


# ---------------------------------------------------------------------------
# Preprocessing defaults and options
# ---------------------------------------------------------------------------


@pytest.mark.shared_data
def test_preprocessing_defaults(caplog):
    lenet = load_model(f"caffe:{shared('lenet_mnist', 'lenet.prototxt')}@{shared('lenet_mnist', 'lenet_iter_10000.caffemodel')}")
    cfg = lenet.data_config
    assert cfg.channel_order == "L" and cfg.input_size == (28, 28) and cfg.crop_pct == 1.0
    assert cfg.std == (256.0,) and cfg.mean == (0.0,) and cfg.scale == 1.0  # 1/256 from the training data layer
    assert any("input_scale" in n for n in lenet.extra_meta["caffe"]["preprocessing"])
    with caplog.at_level(logging.WARNING):
        quick = load_model(f"caffe:{shared('cifar10_quick', 'cifar10_quick_deploy_v2_bvlc.prototxt')}@"
                           f"{shared('cifar10_quick', 'cifar10_quick_iter_5000.caffemodel')}")
    assert "mean.binaryproto" in caplog.text  # trained with a mean file that is not here: said loudly
    cfg = quick.data_config
    assert cfg.channel_order == "BGR" and cfg.mean == (0.0, 0.0, 0.0) and cfg.resize_mode == "warp"
    assert cfg.scale == 1.0 and cfg.std == (1.0, 1.0, 1.0) and cfg.interpolation == "bilinear"
    caffenet = load_model(f"caffe:{shared('reference_prototxts', 'bvlc_reference_caffenet', 'deploy.prototxt')}@random")
    cfg = caffenet.data_config
    assert cfg.input_size == (227, 227) and cfg.crop_pct == pytest.approx(227 / 256)
    assert cfg.mean == pytest.approx(ILSVRC_MEAN_BGR)
    assert caffenet.meta()["data_config"]["channel_order"] == "BGR"


@pytest.mark.shared_data
def test_mean_image_is_centre_cropped_like_caffe():
    proto = shared("reference_prototxts", "bvlc_reference_caffenet", "deploy.prototxt")
    npy = shared("bvlc_images_mean", "ilsvrc_2012_mean.npy")
    m = load_model(f"caffe:{proto}@random", mean=str(npy))
    assert m.data_config.mean_image.shape == (3, 256, 256)
    img = np.random.default_rng(0).integers(0, 256, (1, 227, 227, 3), dtype=np.uint8)
    with torch.inference_mode():
        x = m.normalize(torch.from_numpy(img)).numpy()
    mean = np.load(npy).astype(np.float32)[:, 14:241, 14:241]  # Caffe: offset (256 - 227) / 2 = 14
    ref = img[0].transpose(2, 0, 1)[::-1].astype(np.float32) - mean  # RGB -> BGR, 0..255, minus mean
    np.testing.assert_allclose(x[0], ref, atol=1e-3)
    # the binaryproto and an explicit input scale / raw scale / channel order
    m2 = load_model(f"caffe:{proto}@random?mean={shared('bvlc_images_mean', 'imagenet_mean.binaryproto')}"
                    "&channel_order=RGB&input_scale=0.5&raw_scale=1&resize=300&interpolation=bicubic")
    cfg = m2.data_config
    assert cfg.channel_order == "RGB" and cfg.std == (2.0, 2.0, 2.0) and cfg.scale == pytest.approx(1 / 255)
    assert cfg.crop_pct == pytest.approx(227 / 300) and cfg.interpolation == "bicubic"


def test_spec_parsing_and_option_errors(tmp_path):
    assert split_caffe_spec("a@b/deploy.prototxt@w.caffemodel?mean=1,2,3&channel_order=RGB", "s") == (
        "a@b/deploy.prototxt", "w.caffemodel", {"mean": "1,2,3", "channel_order": "RGB"})
    assert split_caffe_spec("x@y/d.prototxt@random", "s") == ("x@y/d.prototxt", "random", {})
    with pytest.raises(ModelError, match="needs the weights"):
        load_model("caffe:deploy.prototxt")
    d = tmp_path / "dir@with@ats"
    d.mkdir()
    proto = d / "tiny.prototxt"
    proto.write_text('name: "tiny" input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
                     'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" '
                     'convolution_param { num_output: 2 kernel_size: 3 } }\n'
                     'layer { name: "prob" type: "Softmax" bottom: "conv1" top: "prob" }\n')
    net = init_random(build_net(read_netdef(proto)), 0)
    weights = Path(net.save_caffemodel(str(d / "tiny.caffemodel")))
    model = load_model(f"caffe:{proto}@{weights}?mean=10")
    assert model.data_config.mean == (10.0, 10.0, 10.0) and model.output_kind == "probs"
    assert model.meta()["weights_sha256"] and model.meta()["caffe"]["prototxt"] == "tiny.prototxt"
    model2 = load_model(f"caffe:{proto}@{weights}", output="conv1")
    assert model2.output_kind == "logits" and model2.net(torch.zeros(1, 3, 8, 8)).shape == (1, 2, 6, 6)
    with pytest.raises(UsageError, match="unknown caffe option 'maen'.*mean"):
        load_model(f"caffe:{proto}@{weights}?maen=1")
    with pytest.raises(UsageError, match="2 values for a 3-channel"):
        load_model(f"caffe:{proto}@{weights}", mean="1,2")
    with pytest.raises(UsageError, match="output blob 'nope'"):
        load_model(f"caffe:{proto}@{weights}", output="nope")
    with pytest.raises(ModelError, match="caffemodel not found"):
        load_model(f"caffe:{proto}@{d / 'missing.caffemodel'}")


# ---------------------------------------------------------------------------
# Malformed inputs and mismatches
# ---------------------------------------------------------------------------

TINY = ('name: "tiny" input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
        'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" '
        'convolution_param { num_output: %d kernel_size: 3 %s } }\n'
        'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n')


def test_weights_that_do_not_fit_the_prototxt(tmp_path):
    proto = tmp_path / "d.prototxt"
    proto.write_text(TINY % (4, ""))
    good = Path(init_random(build_net(read_netdef(proto)), 0).save_caffemodel(str(tmp_path / "w.caffemodel")))
    proto.write_text(TINY % (5, ""))
    with pytest.raises(ModelError, match=r"layer 'conv1'.*weight blob.*4x3x3x3.*prototxt implies 5x3x3x3"):
        load_model(f"caffe:{proto}@{good}")
    proto.write_text(TINY % (4, "bias_term: false"))
    with pytest.raises(ModelError, match=r"layer 'conv1'.*2 blob\(s\).*implies 1"):
        load_model(f"caffe:{proto}@{good}")
    other = tmp_path / "other.caffemodel"
    write_caffemodel(other, [("conv9", "Convolution", [np.zeros((4, 3, 3, 3), np.float32)])])
    proto.write_text(TINY % (4, ""))
    with pytest.raises(ModelError, match=r"no weights for layer\(s\) 'conv1'.*conv9"):
        load_model(f"caffe:{proto}@{other}")


@pytest.mark.shared_data
def test_real_weights_with_the_wrong_prototxt():
    proto = shared("cifar10_full", "cifar10_full.prototxt")
    weights = shared("cifar10_quick", "cifar10_quick_iter_5000.caffemodel")
    with pytest.raises(ModelError, match=r"layer 'ip1' \(InnerProduct.*1x1x64x1024.*implies 10x1024"):
        load_model(f"caffe:{proto}@{weights}")
    train = shared("cifar10_full", "cifar10_full_train_test.prototxt")
    with pytest.raises(ModelError, match=r"training-only layer.*deploy prototxt"):
        load_model(f"caffe:{train}@{shared('cifar10_full', 'cifar10_full_iter_70000.caffemodel')}")


def test_unknown_layer_types_and_broken_graphs(tmp_path):
    head = 'input: "data" input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8\n'
    cases = [
        ('layer { name: "weird1" type: "Frobnicate" bottom: "data" top: "w" }',
         r"layer 'weird1' \(Frobnicate.*unknown layer type 'Frobnicate'.*supported types:.*Convolution"),
        ('layer { name: "r" type: "ReLU" bottom: "nope" top: "r" }',
         r"layer 'r'.*bottom blob 'nope' is not produced"),
        ('layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: MAX kernel_size: 9 } }',
         r"layer 'p'.*too small"),
        ('layer { name: "e" type: "Eltwise" bottom: "data" bottom: "c" top: "e" }\n',
         r"layer 'e'.*bottom blob 'c'"),
        ('layer { name: "py" type: "Python" bottom: "data" top: "py" }', r"Python layers"),
    ]
    for body, pattern in cases:
        with pytest.raises(ModelError, match=pattern):
            build_net(netdef_from_message(parse_text(head + body, "x.prototxt")))
    with pytest.raises(FormatError, match=r"x.prototxt:2:.*expected"):
        netdef_from_message(parse_text(head + 'layer { name: "a" type: "ReLU" bottom: "data" top: "a" } }', "x.prototxt"))
    with pytest.raises(FormatError, match="V0 prototxt format"):
        netdef_from_message(parse_text(head + 'layers { layer { name: "a" type: "relu" } }'))
    with pytest.raises(ModelError, match="declares no input"):
        build_net(netdef_from_message(parse_text('layer { name: "r" type: "ReLU" bottom: "x" top: "x" }')))


def test_prototxt_file_errors(tmp_path):
    bad = tmp_path / "deploy.prototxt"
    bad.write_text('name: "x"\ninput: "data"\nlayer {\n  name: "a"\n  type: "ReLU"\n  bottom: "data"\n')
    with pytest.raises(FormatError, match=r"deploy.prototxt:7:.*not closed"):
        load_model(f"caffe:{bad}@random")
    binary = tmp_path / "swapped.prototxt"
    binary.write_bytes(b"\x0a\x03abc\xff\xfe\x00")
    with pytest.raises(FormatError, match="not a text prototxt"):
        load_model(f"caffe:{binary}@random")


# ---------------------------------------------------------------------------
# Writing weights back
# ---------------------------------------------------------------------------


@pytest.mark.shared_data
def test_save_caffemodel_round_trip(tmp_path, cifar_images):
    proto = shared("resnet20_cifar10", "res20_cifar_deploy_DERIVED.prototxt")
    weights = shared("resnet20_cifar10", "cifar10_res20_iter_64000.caffemodel")
    net = load_caffe_net(proto, weights)
    x = torch.randn(2, 3, 32, 32) * 60
    with torch.inference_mode():
        y = net(x)
    out = net.save_caffemodel(str(tmp_path / "copy.caffemodel"))
    again = load_caffe_net(proto, out)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), y, rtol=1e-5, atol=1e-6)  # BN: (mean x f) / f rounds
    with pytest.raises(UsageError, match="'BatchNorm' did not exist in the V1 format"):
        net.save_caffemodel(str(tmp_path / "v1.caffemodel"), format="v1")
    # the BatchNorm moving-average factor survives the trip (stored x factor, then divided)
    orig = {l.name: l for l in read_caffemodel(weights).layers}["BatchNorm1"].blobs
    copy = {l.name: l for l in read_caffemodel(out).layers}["BatchNorm1"].blobs
    assert copy[2].data[0] == pytest.approx(orig[2].data[0])
    np.testing.assert_allclose(copy[0].data, orig[0].data, rtol=1e-6)
    # and OpenCV reads what we wrote
    compare_with_opencv(again, proto, Path(out), x.numpy(), "resnet20 re-encoded")
    # a V1 round trip of the V1 cifar10_quick weights
    quick = load_caffe_net(shared("cifar10_quick", "cifar10_quick_deploy_v1_bvlc2014.prototxt"),
                           shared("cifar10_quick", "cifar10_quick_iter_5000.caffemodel"))
    v1 = quick.save_caffemodel(str(tmp_path / "quick_v1.caffemodel"), format="v1")
    assert read_caffemodel(v1).format == "v1" and read_caffemodel(v1).layers[0].blobs[1].shape == (1, 1, 1, 32)
    again = load_caffe_net(shared("cifar10_quick", "cifar10_quick_deploy_v2_bvlc.prototxt"), v1)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), quick(x), rtol=0, atol=0)

