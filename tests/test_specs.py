"""The one spec grammar (deepfeat.specs), over every registered spec kind: round trip
(parse -> canonical -> parse), bad names and parameters, old spellings."""

from __future__ import annotations

import importlib

import pytest

from deepfeat import specs
from deepfeat.errors import UsageError

# importing these registers their spec kinds in specs.SPEC_KINDS
for _mod in ("deepfeat.pooling.spec", "deepfeat.rerank.specs", "deepfeat.postprocess.spec",
             "deepfeat.localfeat.features", "deepfeat.localfeat.verify", "deepfeat.models.options"):
    importlib.import_module(_mod)

#: per spec kind: specs that parse, including the spellings README and docs showed
EXAMPLES = {
    "pooling": ["gem", "gem:3", "GeM:p=3.5", "rmac:L=3+mac", "R-MAC:L=2,overlap=0.5", "spoc:center_prior=1",
                "mop:k=100,local=128,dim=256,windows=128/64,step=32,cell=32,pool=mac", "crow:a=2,b=1/2",
                "gem:p=3+rgem:L=2"],
    "rerank": ["diffusion", "diffusion:k=30,alpha=0.9,gamma=2,trunc=500", "k-reciprocal", "kreciprocal:k1=5,k2=2",
               "Regional_Diffusion:k=30,kq=20,pool=sum,section=reg-1"],
    "postprocess": ["l2", "power:0.5,l2", "sqrt,l2", "pca:128", "pca-whiten:128,l2", "l2,pca-whiten:256:shrink=0.5,l2",
                    "pcaw:32", "power:alpha=1/4", "l2,lw:16,l2"],
    "local": ["cnn", "cnn:layer=blocks.3,max=300,size=512,scales=1/0.707", "sift:max=2000", "orb",
              "regions:L=3,pool=gem", "regions:levels=2"],
    "verify": ["20", "20:weight=2,cap=30,model=homography", "5:ratio=0.8,ransac=1/2"],
    "model-options": ["mean=0.5&std=0.5", "scale=1/255&input_size=224x224"],
}
#: per spec kind: (bad spec, what the error must name)
BAD = {
    "pooling": [("gme", "valid poolings: none, sum"), ("gem:q=3", "its parameters are: p, eps"),
                ("gem:p=-1", "p must be a number > 0"), ("mop:pool=median", "pool must be mac or avg")],
    "rerank": [("difusion", "valid: diffusion, kreciprocal, regional-diffusion"),
               ("diffusion:k3=1", "its parameters are: k, kq, alpha"), ("diffusion:alpha=2", "a number in (0, 1)"),
               ("regional-diffusion:pool=max", "pool must be gmp or sum")],
    "postprocess": [("whitening:128", "valid steps: l2, power, sqrt, pca, pca-whiten"),
                    ("pca-whiten:8:foo=1", "not understood"), ("pca:abc", "dim must be an integer >= 1")],
    "local": [("surf", "choose cnn, sift, orb, regions"), ("sift:layer=x", "is not one of max=..., size=..."),
              ("regions:pool=avg", "pool must be mac or gem")],
    "verify": [("5:foo=1", "is not one of weight=..., cap=..."),
               ("5:model=projective", "choose similarity, affine, homography")],
    "model-options": [("mean", "key=value pairs joined by '&'")],
}
#: old spellings that keep working: (old, canonical)
OLD = {
    "pooling": [("max", "mac"), ("ave", "avg"), ("gem:3", "gem:p=3")],
    "rerank": [("k_reciprocal", "kreciprocal:k1=20,k2=6,lambda=0.3,trunc=2000")],
    "postprocess": [("pca-whiten:16:shrinkage=0.25", "pca-whiten:16:shrink=0.25"), ("pca_whiten:8", "pca-whiten:8")],
    "local": [("regions:levels=2", "regions:L=2,pool=mac,size=640")],
    "verify": [("20:cap=10", "20:weight=1,cap=10,min_inliers=5,ransac=1,ratio=0,model=similarity")],
    "model-options": [("scale=1/255", "scale=1/255")],
}


def test_every_spec_kind_is_covered():
    assert set(specs.SPEC_KINDS) == set(EXAMPLES) == set(BAD) == set(OLD)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_round_trip(kind):
    canonical = specs.SPEC_KINDS[kind].canonical
    for text in EXAMPLES[kind]:
        once = canonical(text)
        assert canonical(once) == once, (text, once)


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_specs_name_the_valid_choices(kind):
    canonical = specs.SPEC_KINDS[kind].canonical
    for text, fragment in BAD[kind]:
        with pytest.raises(UsageError) as e:
            canonical(text)
        assert fragment in str(e.value), (text, str(e.value))


@pytest.mark.parametrize("kind", sorted(OLD))
def test_old_spellings_still_parse(kind):
    canonical = specs.SPEC_KINDS[kind].canonical
    for old, want in OLD[kind]:
        assert canonical(old) == want


@pytest.mark.parametrize("kind", sorted(k for k in EXAMPLES if k != "model-options"))
def test_unknown_names_list_every_registered_name(kind):
    grammar = specs.SPEC_KINDS[kind].grammar
    if kind == "verify":
        return  # N, not a name
    with pytest.raises(UsageError) as e:
        grammar.lookup("no-such-thing")
    assert all(name in str(e.value) for name in grammar.registry)


def test_typed_values():
    p = specs.Param("x", "float", 1.0, "a number > 0", lambda v: v > 0)
    g = specs.SpecKind("thing", {"t": type("K", (), {"name": "t", "params": (p,)})()}, positional=True)
    assert g.parse_part("t:1/4").params == {"x": 0.25}
    assert g.parse_part("T:x=2e+0").params == {"x": 2.0}
    with pytest.raises(UsageError, match="x must be a number > 0, got 'nan'"):
        g.parse_part("t:x=nan")
    with pytest.raises(ValueError):
        specs.Param("y", "complex", 0, "")


def test_parse_scales_one_rule():
    assert specs.parse_scales("1,0.707,1/2") == (1.0, 0.707, 0.5)
    assert specs.parse_scales(None) == specs.parse_scales("") == (1.0,)
    assert specs.parse_scales([1, 0.5]) == (1.0, 0.5)
    for bad in ("1,big", "1,-0.5", "5", "1,1/0"):
        with pytest.raises(UsageError):
            specs.parse_scales(bad)
    from deepfeat.pooling import parse_scales as pool_scales

    assert pool_scales is specs.parse_scales


def test_one_tolerance():
    import numpy as np

    from deepfeat.backends import append_check, openvino_setup, tolerance

    assert (tolerance.COSINE_MIN, tolerance.ATOL) == (tolerance.F32.min_cosine, tolerance.F32.max_abs_diff)
    assert openvino_setup.tolerance("bf16") == tolerance.BF16.as_dict() == append_check.tolerance(
        {"precision": "bf16"}, {"precision": "f32"}, "float32")
    assert append_check.tolerance(None, {}, "float32") == openvino_setup.tolerance("f32")
    a = np.ones((2, 4), np.float32)
    assert tolerance.F32.check(a, a)[0] and not tolerance.F32.check(a, a + 0.01)[0]
    assert tolerance.BF16.check(a, a + 0.01)[0]
