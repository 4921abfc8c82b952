"""Fine-tuning end to end on a tiny labelled set made from real photos, on CPU.

The set: three classes cut from three real photos (different crops, sizes, flips),
of unequal sizes, plus one broken file that the image check must exclude. Runs use
the embedded EfficientNet-Lite0 at 64 x 64 so that a whole run takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from deepfeat.errors import ModelError, UsageError
from deepfeat.finetune import FinetuneConfig, finetune, load_snapshot
from deepfeat.finetune import data as D
from deepfeat.finetune import heads as H

CLASS_SIZES = {"cat": 6, "coffee": 5, "rocket": 8}
SOURCES = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket"}
TINY = dict(image_size=64, batch_size=4, head_epochs=4, epochs=2, per_class=5, train_blocks="3", seed=0,
            augment="all", progress="none", workers=2, eval_retrieval=True, lr=0.01)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, photos) -> Path:
    """DATA/<class>/<image>.jpg: crops of one real photo per class, and a broken file."""
    root = tmp_path_factory.mktemp("labelled")
    for cls, n in CLASS_SIZES.items():
        d = root / cls
        d.mkdir()
        img = Image.open(photos[SOURCES[cls]]).convert("RGB")
        w, h = img.size
        for j in range(n):
            f = 0.55 + 0.05 * j
            cw, ch = int(w * f), int(h * f)
            x0, y0 = (j * 37) % max(1, w - cw), (j * 23) % max(1, h - ch)
            im = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((96 + 8 * j, 80 + 4 * j), Image.Resampling.BICUBIC)
            if j % 2:
                im = ImageOps.mirror(im)
            im.save(d / f"{cls}_{j}.jpg", quality=90)
    (root / "cat" / "broken.jpg").write_bytes(b"this is not a JPEG, whatever its name says")
    return root


@pytest.fixture(scope="module")
def run_a(labelled, tmp_path_factory):
    """One uninterrupted tiny run (head stage on precomputed features, then 2 full epochs)."""
    out = tmp_path_factory.mktemp("runs") / "a"
    res = finetune(FinetuneConfig(data=str(labelled), output=str(out), **TINY))
    return out, res


# ---------------------------------------------------------------------------- data


def test_check_split_reproducible_and_balance(labelled, tmp_path):
    ds = D.check_labelled(labelled)
    assert ds.classes == ["cat", "coffee", "rocket"]
    assert [e.path for e in ds.excluded] == [str(labelled / "cat" / "broken.jpg")]
    assert "not an image" in ds.excluded[0].reason
    assert ds.counts() == [6, 5, 8]
    tr0, va0 = D.split_labelled(ds, 0.4, seed=0)
    tr0b, va0b = D.split_labelled(ds, 0.4, seed=0)
    _, va1 = D.split_labelled(ds, 0.4, seed=1)
    assert tr0 == tr0b and va0 == va0b
    assert set(va0) != set(va1)
    # per class: round(n * 0.4) validation images, disjoint, complete
    for label, n in enumerate(CLASS_SIZES.values()):
        assert sum(it.label == label for it in va0) == round(n * 0.4)
    assert not set(tr0) & set(va0) and len(tr0) + len(va0) == 19
    # files round trip, paths relative to the data root
    D.write_split(tmp_path / "train.txt", tr0, ds.root)
    first = (tmp_path / "train.txt").read_text().splitlines()[0]
    assert not first.startswith("/") and first.rsplit(" ", 1)[1] in ("0", "1", "2")
    assert D.read_split(tmp_path / "train.txt", ds.root, 3) == tr0
    # balance: small classes filled up to per_class, the large one kept whole
    counts = [sum(it.label == c for it in tr0) for c in range(3)]
    assert counts == [4, 3, 5]
    samples = D.balance(tr0, 3, per_class=5)
    assert D.balance_counts(samples, 3) == [5, 5, 5]
    assert D.balance_counts(D.balance(tr0, 3, per_class=9), 3) == [9, 9, 9]
    assert D.balance_counts(D.balance(tr0, 3, per_class=0), 3) == counts
    copies = [s for s in D.balance(tr0, 3, per_class=9) if s.label == 1 and s.copy]
    assert len(copies) == 6 and max(s.copy for s in copies) == 2  # 3 originals, each copied twice
    with pytest.raises(UsageError):
        D.split_labelled(ds, 1.5)


def test_csv_labels_and_bad_layouts(labelled, tmp_path):
    rows = ["path,label"] + [f"{p.relative_to(labelled)},{p.parent.name}" for p in sorted(labelled.glob("*/*.jpg"))]
    csv_path = labelled / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    try:
        ds = D.check_labelled(csv_path)
    finally:
        csv_path.unlink()
    assert ds.classes == ["cat", "coffee", "rocket"] and ds.counts() == [6, 5, 8] and len(ds.excluded) == 1
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(one / "only" / "a.jpg")
    with pytest.raises(UsageError, match="at least 2 classes"):
        D.check_labelled(one)
    with pytest.raises(UsageError, match="not found"):
        D.check_labelled(tmp_path / "missing")


def test_augmentation_is_keras_like_and_seeded(photos):
    px = np.asarray(Image.open(photos["chelsea"]).convert("RGB").resize((80, 64)))
    aug = D.Augmentation()
    a1 = aug.apply(px, aug.draw(D.aug_rng(0, 1, 3, 1), 64, 80))
    a2 = aug.apply(px, aug.draw(D.aug_rng(0, 1, 3, 1), 64, 80))
    a3 = aug.apply(px, aug.draw(D.aug_rng(0, 2, 3, 1), 64, 80))
    assert a1.shape == px.shape and a1.dtype == np.uint8
    assert np.array_equal(a1, a2) and not np.array_equal(a1, a3)
    # the identity transform returns the image unchanged; a flip is an exact mirror
    assert np.array_equal(aug.apply(px, D.AffineParams()), px)
    assert np.array_equal(aug.apply(px, D.AffineParams(flip=True)), px[:, ::-1])
    # a shift of 10 rows down (output row r reads input row r - 10): the top is filled with
    # the nearest edge row, as Keras' fill_mode='nearest'
    shifted = aug.apply(px, D.AffineParams(tx=-10))
    assert np.array_equal(shifted[10:], px[:-10])
    assert np.array_equal(shifted[:10], np.repeat(px[:1], 10, axis=0))
    # drawn parameters stay within the Keras ranges
    for k in range(50):
        p = aug.draw(D.aug_rng(k, 0, 0, 0), 64, 80)
        assert abs(p.theta) <= 10 and abs(p.tx) <= 0.2 * 64 and abs(p.ty) <= 0.2 * 80
        assert abs(p.shear) <= 0.2 and 0.8 <= p.zx <= 1.2 and 0.8 <= p.zy <= 1.2


def test_save_augmented_is_reproducible(labelled, tmp_path):
    common = dict(data=str(labelled), image_size=64, head_epochs=1, epochs=0, per_class=7, augment="fill",
                  save_augmented=True, progress="none", workers=1)
    finetune(FinetuneConfig(output=str(tmp_path / "r1"), **common))
    finetune(FinetuneConfig(output=str(tmp_path / "r2"), **common))
    files1 = sorted(p.relative_to(tmp_path / "r1") for p in (tmp_path / "r1" / "augmented").rglob("*.png"))
    files2 = sorted(p.relative_to(tmp_path / "r2") for p in (tmp_path / "r2" / "augmented").rglob("*.png"))
    assert len(files1) == (7 - 4) + (7 - 3) + (7 - 5) and files1 == files2
    for f in files1:
        assert (tmp_path / "r1" / f).read_bytes() == (tmp_path / "r2" / f).read_bytes()
    assert (tmp_path / "r1" / "train.txt").read_text() == (tmp_path / "r2" / "train.txt").read_text()


# ---------------------------------------------------------------------------- heads


def test_head_surgery_param_groups_and_units(lite0):
    import copy

    net = copy.deepcopy(lite0.net)
    old = net.get_submodule("classifier")
    H.replace_head(net, "classifier", H.new_head(old, 4, torch.Generator().manual_seed(0)))
    assert net.classifier.out_features == 4 and net.num_classes == 4
    units = H.backbone_units(net, "classifier")
    assert units[:3] == ["conv_stem", "bn1", "blocks.0"] and units[-2:] == ["conv_head", "bn2"]
    assert H.resolve_train_blocks(units, "3") == ["blocks.6", "conv_head", "bn2"]
    assert H.resolve_train_blocks(units, "blocks.5") == ["blocks.5", "blocks.6", "conv_head", "bn2"]
    with pytest.raises(UsageError, match="units are"):
        H.resolve_train_blocks(units, "block.5")
    H.set_trainable(net, "classifier", ["bn2"])
    groups = {g["name"]: g for g in H.param_groups(net, "classifier", 0.001, 5e-4, 10, 20)}
    assert groups["head_weight"]["lr"] == pytest.approx(0.01) and groups["head_bias"]["lr"] == pytest.approx(0.02)
    assert groups["head_bias"]["weight_decay"] == 0 and groups["backbone_no_decay"]["lr"] == pytest.approx(0.001)
    assert "backbone" not in groups  # bn2 has only 1-d parameters
    # checkpoints carry the head as head_ft.*: base weights can never fill it
    sd = H.to_checkpoint(net.state_dict(), "classifier")
    assert "head_ft.weight" in sd and "classifier.weight" not in sd
    assert torch.equal(H.from_checkpoint(sd, "classifier", "x")["classifier.weight"], net.classifier.weight)
    with pytest.raises(ModelError, match="head_ft"):
        H.from_checkpoint(lite0.net.state_dict(), "classifier", "the base weights")


def test_frozen_prefix_runs_the_same_network(lite0):
    import copy

    from deepfeat.finetune.prefix import FrozenPrefix, leaf_sequence

    net = copy.deepcopy(lite0.net).eval()
    assert leaf_sequence(net)[:3] == ["conv_stem", "bn1", "blocks.0"]
    prefix = FrozenPrefix(net, "blocks.6")
    assert prefix.names[0] == "conv_stem" and prefix.last == "blocks.5"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert prefix.verify(x)
    stem = net.conv_stem
    # the same output and the same gradients for the trained part, with or without the cache
    out = net(x)
    out.square().sum().backward()
    g_ref = net.conv_head.weight.grad.clone()
    net.zero_grad()
    with prefix.injected(prefix.run(x)) as dummy:
        out2 = net(dummy)
    out2.square().sum().backward()
    assert torch.allclose(out, out2, atol=1e-5) and torch.allclose(net.conv_head.weight.grad, g_ref, atol=1e-5)
    assert net.conv_stem is stem  # the modules are back in place

    class Skip(torch.nn.Module):  # uses its input after the prefix: must be detected
        def __init__(self):
            super().__init__()
            self.a, self.b, self.fc = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.fc((self.b(self.a(x)) + x).mean((2, 3)))

    assert not FrozenPrefix(Skip(), "b").verify(torch.randn(2, 3, 8, 8))


# ---------------------------------------------------------------------------- runs


def test_run_writes_everything_and_learns(run_a, labelled):
    out, res = run_a
    for name in ("classes.txt", "train.txt", "val.txt", "check.json", "config.json", "log.csv", "log.json",
                 "model.safetensors", "meta.json", "retrieval.json"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "snapshots").glob("*.pt")) == [f"epoch_{e:03d}.pt" for e in range(1, 7)]
    assert res.classes == ["cat", "coffee", "rocket"] and res.n_train == 12 and res.n_val == 7
    assert res.class_counts == [4, 3, 5] and res.balanced_counts == [5, 5, 5] and res.n_samples == 15
    assert [e["path"] for e in res.excluded] == [str(labelled / "cat" / "broken.jpg")]
    assert "broken.jpg" not in (out / "train.txt").read_text() + (out / "val.txt").read_text()
    # the split files are the seeded split of the checked data
    ds = D.check_labelled(labelled)
    tr, va = D.split_labelled(ds, 0.4, seed=0)
    assert D.read_split(out / "train.txt", ds.root, 3) == tr and D.read_split(out / "val.txt", ds.root, 3) == va
    hist = res.history
    assert [h["epoch"] for h in hist] == list(range(1, 7))
    assert [h["stage"] for h in hist] == ["head"] * 4 + ["full"] * 2
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]  # the loss decreases
    assert all(h["val_acc"] is not None for h in hist) and res.val_accuracy == hist[-1]["val_acc"]
    assert res.val_accuracy > 0.5
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "deepfeat-finetuned/1" and meta["base_model"]["spec"] == "efficientnet_lite0"
    assert len(meta["base_model"]["weights_sha256"]) == 64 and len(meta["weights_sha256"]) == 64
    assert meta["classes"] == res.classes and meta["head"]["name"] == "head_ft"
    assert meta["data_config"]["input_size"] == [64, 64] and meta["default_layer"] == "bn2"
    assert meta["training"]["train_blocks"] == "3" and meta["epochs_done"] == 6
    assert meta["training"]["cached_prefix"] == ["conv_stem", "blocks.5"]
    ret = json.loads((out / "retrieval.json").read_text())
    # the default descriptor (changed from GeM to average pooling by measurement, docs/finetune.md)
    assert ret["layer"] == "bn2" and ret["pooling"] == "avg" and ret["n_queries"] == 7
    for key in ("before", "after"):
        assert 0 < ret[key]["map"] <= 1 and "10" in ret[key]["mp_at_k"]
    log_lines = (out / "log.csv").read_text().splitlines()
    assert log_lines[0].startswith("epoch,stage,iters") and len(log_lines) == 7
    # BatchNorm statistics stay frozen by default, even in the trained units
    from safetensors.torch import load_file

    import deepfeat

    sd = load_file(str(out / "model.safetensors"))
    base = deepfeat.load_model("efficientnet_lite0").net.state_dict()
    assert torch.equal(sd["bn2.running_mean"], base["bn2.running_mean"])
    assert not torch.equal(sd["conv_head.weight"], base["conv_head.weight"])  # ... while the weights train
    assert torch.equal(sd["blocks.4.0.conv_pw.weight"], base["blocks.4.0.conv_pw.weight"])  # frozen unit
    assert sd["head_ft.weight"].shape == (3, 1280) and "classifier.weight" not in sd


def test_resume_continues_like_an_uninterrupted_run(run_a, labelled, tmp_path, monkeypatch):
    from deepfeat import cli

    out_a, res_a = run_a
    out = tmp_path / "b"

    def stop_after_5(entry):
        if entry["epoch"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(data=str(labelled), output=str(out), **TINY), on_epoch=stop_after_5)
    assert max(p.name for p in (out / "snapshots").glob("*.pt")) == "epoch_005.pt"
    assert not (out / "meta.json").exists()
    with pytest.raises(UsageError, match="--resume"):  # a fresh run into it is refused
        finetune(FinetuneConfig(data=str(labelled), output=str(out), **TINY))
    snap = load_snapshot(out / "snapshots" / "epoch_005.pt")
    assert snap["epoch"] == 5 and snap["stage"] == "full" and isinstance(snap["rng"]["torch"], torch.Tensor)
    # continue through the CLI, with only the run directory
    assert cli.main(["finetune", "-o", str(out), "--resume", "--progress", "none"]) == 0
    res_b = json.loads((out / "log.json").read_text())
    assert [h["epoch"] for h in res_b] == list(range(1, 7))
    for ha, hb in zip(res_a.history, res_b):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-4, abs=1e-5)
        assert hb["val_acc"] == pytest.approx(ha["val_acc"])
    from safetensors.torch import load_file

    wa, wb = load_file(str(out_a / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), rtol=1e-4, atol=1e-5), k
    assert json.loads((out / "meta.json").read_text())["epochs_done"] == 6
    # a resumed run keeps its data, split and model settings
    with pytest.raises(UsageError, match="differ"):
        finetune(FinetuneConfig(data=str(labelled), output=str(out), resume=True, **{**TINY, "seed": 3}))


def test_finetuned_spec_classifies_and_extracts(run_a, tmp_path):
    import deepfeat
    from deepfeat.models.classify import classify
    from deepfeat.pipeline import ExtractConfig, extract
    from deepfeat.store import FeatureStore

    out, res = run_a
    spec = f"finetuned:{out}"
    model = deepfeat.load_model(spec)
    assert model.labels == ["cat", "coffee", "rocket"] and model.num_classes == 3
    assert model.data_config.input_size == (64, 64) and model.classifier == "classifier"
    assert model.meta()["base_model"] == "efficientnet_lite0"
    val = D.read_split(out / "val.txt", json.loads((out / "check.json").read_text())["root"], 3)
    results = classify(model, [v.path for v in val], k=1)
    right = sum(r.predictions[0].label == res.classes[v.label] for r, v in zip(results, val))
    assert right / len(val) == pytest.approx(res.val_accuracy)
    rep = extract(ExtractConfig(inputs=[v.path for v in val], output=str(tmp_path / "store"), model=spec,
                                workers=0, progress="none", batch_size=4))
    assert rep.ok == len(val)
    store = FeatureStore(tmp_path / "store")
    assert store.meta["layers"] == ["bn2"] and store.dim == 1280
    assert store.meta["model"]["spec"] == spec and store.meta["model"]["source"] == "finetuned"
    x = store.vectors()
    assert x.shape == (len(val), 1280) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    # the extracted descriptors give the retrieval mAP the run reported for the fine-tuned model
    from deepfeat.finetune.retrieval import evaluate_descriptors

    order = {p: i for i, p in enumerate(store.paths)}
    rows = [order[v.path] for v in val]
    ev = evaluate_descriptors(x[rows], [v.label for v in val], [v.path for v in val], res.classes)
    assert ev.map == pytest.approx(res.retrieval["after"]["map"], abs=1e-4)


def test_finetuned_spec_errors(tmp_path, run_a):
    import deepfeat

    with pytest.raises(ModelError, match="not found"):
        deepfeat.load_model(f"finetuned:{tmp_path / 'nope'}")
    (tmp_path / "half" / "snapshots").mkdir(parents=True)
    with pytest.raises(ModelError, match="--resume"):
        deepfeat.load_model(f"finetuned:{tmp_path / 'half'}")
    out, _ = run_a
    bad = tmp_path / "tampered"
    bad.mkdir()
    (bad / "meta.json").write_text((out / "meta.json").read_text())
    (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelError, match="sha256"):
        deepfeat.load_model(f"finetuned:{bad}")


def test_usage_errors(labelled, tmp_path):
    with pytest.raises(UsageError, match="resume"):
        finetune(FinetuneConfig(output=str(tmp_path / "x"), resume=True))
    with pytest.raises(UsageError, match="--augment"):
        finetune(FinetuneConfig(data=str(labelled), output=str(tmp_path / "y"), augment="lots"))
    with pytest.raises(UsageError, match="nothing to train"):
        finetune(FinetuneConfig(data=str(labelled), output=str(tmp_path / "z"), head_epochs=0, epochs=0))
    with pytest.raises(UsageError, match="--train-blocks"):
        finetune(FinetuneConfig(data=str(labelled), output=str(tmp_path / "w"), train_blocks="nope",
                                image_size=64, progress="none"))


def test_contrastive_metric_learning(labelled, tmp_path):
    out = tmp_path / "metric"
    res = finetune(FinetuneConfig(data=str(labelled), output=str(out), image_size=64, batch_size=8, head_epochs=2,
                                  epochs=2, loss="contrastive", neg_num=2, train_blocks="2", progress="none",
                                  eval_retrieval=True, lr=0.01, workers=2))
    full = [h for h in res.history if h["stage"] == "full"]
    assert len(full) == 2 and all(np.isfinite(h["train_loss"]) and h["train_loss"] > 0 for h in full)
    assert all(h["gem_p"] >= 1.0 for h in full)
    meta = json.loads((out / "meta.json").read_text())
    ml = meta["metric_learning"]
    assert ml["loss"] == "contrastive" and ml["gem_p"] == pytest.approx(full[-1]["gem_p"], abs=1e-5)
    assert ml["head_refit"]["epochs"] == 2 and ml["head_refit"]["val_acc"] is not None
    assert "after_learned_pooling" in res.retrieval and "after" in res.retrieval
    import deepfeat

    m = deepfeat.load_model(f"finetuned:{out}")
    assert m.extra_meta["finetuned"]["pooling"] == ml["pooling"]


def test_contrastive_learned_whitening_travels_to_extract(labelled, tmp_path):
    """--whiten: the whitening is trained with the network, saved as whitening.npz, and
    `extract --post RUN/whitening.npz` reproduces the run's own whitened retrieval mAP."""
    from deepfeat.finetune.retrieval import evaluate_descriptors
    from deepfeat.pipeline import ExtractConfig, extract
    from deepfeat.postprocess import PostChain
    from deepfeat.store import FeatureStore

    out = tmp_path / "whiten"
    cfg = dict(data=str(labelled), image_size=64, batch_size=8, head_epochs=1, epochs=2, loss="contrastive",
               neg_num=2, train_blocks="2", progress="none", eval_retrieval=True, lr=0.01, workers=2, whiten=8)
    res = finetune(FinetuneConfig(output=str(out), **cfg))
    meta = json.loads((out / "meta.json").read_text())
    wh = meta["metric_learning"]["whitening"]
    assert wh == {"dim": 8, "file": "whitening.npz", "post": "l2,lw:8,l2", "init": "pca"}
    chain = PostChain.load(out / "whitening.npz")
    assert chain.spec == "l2,lw:8,l2" and chain.fitted and chain.dim_in == 1280
    W = chain.steps[1].affine.weight
    # trained: no longer the orthonormal PCA directions it started from
    assert W.shape == (8, 1280) and not np.allclose(W @ W.T, np.eye(8), atol=1e-6)
    snap = load_snapshot(sorted((out / "snapshots").glob("epoch_*.pt"))[-1])
    assert np.allclose(snap["metric"]["whiten.weight"].double().numpy(), W, atol=1e-6)

    r = res.retrieval["after_learned_whitening"]
    assert r["post"] == "l2,lw:8,l2" and 0 < r["map"] <= 1
    pool = res.retrieval["after_learned_pooling"]["pooling"]
    val = D.read_split(out / "val.txt", json.loads((out / "check.json").read_text())["root"], 3)
    rep = extract(ExtractConfig(inputs=[v.path for v in val], output=str(tmp_path / "store"), model=f"finetuned:{out}",
                                pooling=pool, post=str(out / "whitening.npz"), workers=0, progress="none"))
    assert rep.ok == len(val)
    store = FeatureStore(tmp_path / "store")
    assert store.meta["post"] == "l2,lw:8,l2" and store.meta["post_fitted_on"] == str(out / "whitening.npz")
    x = store.vectors()
    assert x.shape == (len(val), 8) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    order = {p: i for i, p in enumerate(store.paths)}
    rows = [order[v.path] for v in val]
    ev = evaluate_descriptors(x[rows], [v.label for v in val], [v.path for v in val], res.classes)
    assert ev.map == pytest.approx(r["map"], abs=1e-4)

    # interrupted after the first full epoch and resumed: the same whitening as uninterrupted
    def stop_after_2(entry):
        if entry["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(output=str(tmp_path / "again"), **cfg), on_epoch=stop_after_2)
    finetune(FinetuneConfig(output=str(tmp_path / "again"), resume=True, **cfg))
    again = PostChain.load(tmp_path / "again" / "whitening.npz").steps[1].affine
    np.testing.assert_allclose(again.weight, W, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(again.bias, chain.steps[1].affine.bias, rtol=1e-4, atol=1e-5)

    with pytest.raises(UsageError, match="--loss contrastive"):
        finetune(FinetuneConfig(output=str(tmp_path / "ce"), **{**cfg, "loss": "ce"}))
    with pytest.raises(UsageError, match="more than the 1280 dims"):
        finetune(FinetuneConfig(output=str(tmp_path / "big"), **{**cfg, "whiten": 5000}))
    assert not list((tmp_path / "big").glob("snapshots/*.pt"))  # refused before any training


def test_metric_losses_match_loop_references():
    from deepfeat.finetune.metric import contrastive_loss, triplet_loss

    g = torch.Generator().manual_seed(0)
    q, others = torch.randn(6, generator=g), torch.randn(4, 6, generator=g)

    def dist2(a, b):
        return sum((float(x) - float(y)) ** 2 for x, y in zip(a, b))

    m = 0.7
    want = 0.5 * dist2(q, others[0]) + sum(0.5 * max(0.0, m - dist2(q, n) ** 0.5) ** 2 for n in others[1:])
    is_pos = torch.tensor([True, False, False, False])
    assert float(contrastive_loss(q, others, is_pos, m)) == pytest.approx(want, rel=1e-5)
    for m in (0.1, 5.0):  # a small margin leaves some negatives at zero loss; a large one none
        want = sum(max(0.0, m + dist2(q, others[0]) - dist2(q, n)) for n in others[1:])
        assert float(triplet_loss(q, others[0], others[1:], m)) == pytest.approx(want, rel=1e-5)


def test_triplet_metric_learning_runs_and_records_its_margin(labelled, tmp_path):
    out = tmp_path / "triplet"
    res = finetune(FinetuneConfig(data=str(labelled), output=str(out), image_size=64, batch_size=8, head_epochs=1,
                                  epochs=2, loss="triplet", neg_num=2, train_blocks="2", progress="none",
                                  eval_retrieval=True, lr=0.01, workers=2))
    full = [h for h in res.history if h["stage"] == "full"]
    assert len(full) == 2 and all(np.isfinite(h["train_loss"]) for h in full)
    ml = json.loads((out / "meta.json").read_text())["metric_learning"]
    assert ml["loss"] == "triplet" and ml["margin"] == 0.1
    assert "after_learned_pooling" in res.retrieval
