"""Model sources: the embedded default on real photos, timm and torchvision with local weights, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import deepfeat
from deepfeat.data.images import decode_image
from deepfeat.data.preprocess import SizePolicy
from deepfeat.errors import ModelError, UsageError
from deepfeat.models import registry
from deepfeat.models.embedded import map_state_dict

from .conftest import CAT_CLASSES, ESPRESSO


def _probs(model, path):
    px = decode_image(path, SizePolicy("model"), model.data_config).pixels
    with torch.inference_mode():
        return model.forward_uint8(torch.from_numpy(px)[None]).softmax(-1)[0]


def test_embedded_lite0_sees_a_cat_and_an_espresso(lite0, photos):
    p = _probs(lite0, photos["chelsea"])
    assert int(p.argmax()) in CAT_CLASSES
    assert float(p[list(CAT_CLASSES)].sum()) > 0.6  # the mass is on cats, not spread out
    p = _probs(lite0, photos["coffee"])
    assert int(p.argmax()) == ESPRESSO and float(p[ESPRESSO]) > 0.8


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_embedded_lite1_lite2(name, photos):
    m = deepfeat.load_model(name)
    assert m.data_config.input_size == {"efficientnet_lite1": (240, 240), "efficientnet_lite2": (260, 260)}[name]
    assert int(_probs(m, photos["chelsea"]).argmax()) in CAT_CLASSES
    assert int(_probs(m, photos["coffee"]).argmax()) == ESPRESSO


def test_embedded_preprocessing_is_the_tensorflow_one(lite0):
    cfg = lite0.data_config
    # TF EfficientNet-Lite: (x - 127.5) / 127.5 on RGB, bicubic, 0.875 crop at 224
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.std == (0.5, 0.5, 0.5)
    assert cfg.input_size == (224, 224) and cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic"
    x = lite0.normalize(torch.full((1, 2, 2, 3), 255, dtype=torch.uint8))
    assert torch.allclose(x, torch.ones_like(x))
    meta = lite0.meta()
    assert meta["arch"] == "tf_efficientnet_lite0" and len(meta["weights_sha256"]) == 64


def test_embedded_mapping_checks_shapes():
    a = {"_a.weight": torch.zeros(2, 3), "_b.num_batches_tracked": torch.tensor(0), "_b.bias": torch.zeros(2)}
    b = {"x.weight": torch.zeros(2, 3), "y.bias": torch.zeros(2)}
    assert list(map_state_dict(a, b)) == ["x.weight", "y.bias"]
    with pytest.raises(ModelError, match="does not fit"):
        map_state_dict(a, {"x.weight": torch.zeros(3, 2), "y.bias": torch.zeros(2)})
    with pytest.raises(ModelError, match="tensors"):
        map_state_dict(a, {"x.weight": torch.zeros(2, 3)})


def _save(sd, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_spec_with_local_weights(tmp_path, suffix):
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", pretrained=False, num_classes=7).eval()
    w = tmp_path / f"r10t{suffix}"
    _save(ref.state_dict(), w)
    m = deepfeat.load_model(f"timm:resnet10t@{w}")
    assert m.num_classes == 7 and m.labels is None and m.classifier == "fc"
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        assert torch.allclose(m.net(x), ref(x), atol=1e-6)
    from timm.data import resolve_model_data_config

    assert m.data_config.input_size == tuple(resolve_model_data_config(ref)["input_size"][1:])


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_timm_transformer_from_a_file_is_the_saved_network(tmp_path, arch):
    """Built without timm's random initialisation (``weight_init='skip'``, the weights come from the
    file) and sized on a meta-device skeleton: the same outputs as the saved network, non-persistent
    buffers (Swin's relative position index) included."""
    import timm

    from deepfeat.models.weights import shapes_only

    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False, num_classes=5).eval()
    w = tmp_path / "net.pth"
    torch.save(ref.state_dict(), w)
    m = deepfeat.load_model(f"timm:{arch}@{w}")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert m.num_classes == 5 and torch.allclose(m.net(x), ref(x), atol=1e-5)
    assert next(shapes_only(lambda: timm.create_model(arch, pretrained=False)).parameters()).is_meta


def test_timm_checkpoint_wrapped_and_prefixed(tmp_path):
    import timm

    ref = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    w = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, w)
    assert deepfeat.load_model(f"timm:resnet10t@{w}").num_classes == 3


def test_torchvision_spec_with_local_weights(tmp_path):
    from torchvision.models import squeezenet1_1

    torch.manual_seed(0)
    ref = squeezenet1_1(num_classes=5).eval()
    w = tmp_path / "sq.pt"
    torch.save(ref.state_dict(), w)
    m = deepfeat.load_model(f"torchvision:squeezenet1_1@{w}")
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.allclose(m.net(x), ref(x), atol=1e-6)
    cfg = m.data_config
    assert cfg.input_size == (224, 224) and cfg.interpolation == "bilinear"
    assert abs(cfg.crop_pct - 224 / 256) < 1e-9


def test_torchvision_last_linear_classifier(tmp_path):
    from torchvision.models import mobilenet_v3_small

    w = tmp_path / "mb.pt"
    torch.save(mobilenet_v3_small(num_classes=4).state_dict(), w)
    m = deepfeat.load_model(f"torchvision:mobilenet_v3_small@{w}")
    assert m.classifier == "classifier.3" and m.num_classes == 4


def test_errors_are_clear(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'efficientnet_lite9'.*Did you mean"):
        deepfeat.load_model("efficientnet_lite9")
    with pytest.raises(ModelError, match="unknown model source 'tfhub'"):
        deepfeat.load_model("tfhub:foo")
    with pytest.raises(ModelError, match="needs a local weights file"):
        deepfeat.load_model("timm:resnet50")
    with pytest.raises(ModelError, match="weights file not found"):
        deepfeat.load_model(f"timm:resnet10t@{tmp_path / 'nope.pth'}")
    with pytest.raises(ModelError, match="timm has no architecture 'resnet5O'"):
        deepfeat.load_model(f"timm:resnet5O@{tmp_path / 'x.pth'}")
    with pytest.raises(ModelError, match="torchvision has no architecture"):
        deepfeat.load_model(f"torchvision:resnet99@{tmp_path / 'x.pth'}")
    with pytest.raises(UsageError, match="empty model spec"):
        deepfeat.load_model("")


def test_weights_that_do_not_fit_are_summarised(tmp_path):
    import timm

    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    w = tmp_path / "r18.pth"
    torch.save(sd, w)
    with pytest.raises(ModelError) as e:
        deepfeat.load_model(f"timm:resnet10t@{w}")
    msg = str(e.value)
    assert "do not fit timm architecture resnet10t" in msg and "shape mismatch" in msg
    assert len(msg.splitlines()) <= 5 and "more)" in msg  # summarised, not a 500-line dump


def test_pickles_with_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    w = tmp_path / "evil.pth"
    with open(w, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(ModelError, match="cannot read weights"):
        deepfeat.load_model(f"timm:resnet10t@{w}")


def test_random_init_spec_and_labels_file(tmp_path):
    m = deepfeat.load_model("timm:resnet10t@random")
    assert m.meta()["random_init"] is True and m.num_classes == 1000
    labels = tmp_path / "labels.txt"
    labels.write_text("n01440764 tench, Tinca tinca\n" * 1000)
    m = deepfeat.load_model("efficientnet_lite0", labels=str(labels))
    assert m.labels[0] == "tench, Tinca tinca"
    labels.write_text("a\nb\n")
    with pytest.raises(UsageError, match="2 labels but the model has 1000"):
        deepfeat.load_model("efficientnet_lite0", labels=str(labels))


def test_device_choice():
    from deepfeat.models import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UsageError, match="unknown"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA"):
            resolve_device("cuda")


def test_meta_is_json_serialisable(lite0):
    import json

    json.dumps(lite0.meta())
    assert np.isfinite(lite0.meta()["data_config"]["crop_pct"])


# every registered source, parametrised from the registry: a new source is tested the day it is added
@pytest.mark.parametrize("src", registry.sources(), ids=lambda s: s.name)
def test_every_model_source_is_described_routed_and_lists_ready_models_offline(src):
    assert src.name and src.description and src.example
    assert registry.split_spec(src.example)[0] is src  # its example spec reaches it
    if src.prefix:
        assert registry.split_spec(f"{src.prefix}:anything")[0] is src
    ready = src.ready()  # offline: what this machine can load now
    assert isinstance(ready, list) and all(isinstance(n, str) for n in ready)
