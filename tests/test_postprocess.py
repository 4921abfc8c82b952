"""Post-processing against plain-loop references: L2, power law, PCA, PCA-whitening, chains, files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import deepfeat
from deepfeat.errors import FormatError, UsageError
from deepfeat.postprocess import PCA, PostChain, l2n, learned_whitening_chain, parse_post, power_law


def rand(n, d, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def structured(n, d=6, seed=0, scales=(5.0, 3.0, 2.0, 1.0, 0.5, 0.2), offset=3.0):
    """Data with well separated variances along a random rotation, and a non-zero mean."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    z = rng.normal(size=(n, d)) * np.asarray(scales[:d])
    return (z @ q.T + offset).astype(np.float32)


# ---------------------------------------------------------------------------
# Plain-loop references
# ---------------------------------------------------------------------------


def ref_cov(X):
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    mean = [sum(X[i, j] for i in range(n)) / n for j in range(d)]
    cov = [[sum((X[i, a] - mean[a]) * (X[i, b] - mean[b]) for i in range(n)) / (n - 1) for b in range(d)]
           for a in range(d)]
    return np.array(mean), np.array(cov)


def ref_eigs(cov, k, iters=3000):
    """Leading eigenpairs by power iteration with deflation, plain loops."""
    d = len(cov)
    A = [list(row) for row in cov]
    vals, vecs = [], []
    for _ in range(k):
        v = [1.0 / math.sqrt(d) + 0.01 * j for j in range(d)]
        for _ in range(iters):
            w = [sum(A[a][b] * v[b] for b in range(d)) for a in range(d)]
            norm = math.sqrt(sum(t * t for t in w))
            v = [t / norm for t in w]
        lam = sum(v[a] * sum(A[a][b] * v[b] for b in range(d)) for a in range(d))
        big = max(range(d), key=lambda j: abs(v[j]))
        if v[big] < 0:
            v = [-t for t in v]
        vals.append(lam)
        vecs.append(v)
        for a in range(d):
            for b in range(d):
                A[a][b] -= lam * v[a] * v[b]
    return np.array(vals), np.array(vecs)


def ref_project(X, mean, vecs, scale):
    out = np.zeros((len(X), len(vecs)))
    for i in range(len(X)):
        for k in range(len(vecs)):
            out[i, k] = scale[k] * sum((float(X[i, j]) - mean[j]) * vecs[k][j] for j in range(len(mean)))
    return out


# ---------------------------------------------------------------------------
# L2 and power law
# ---------------------------------------------------------------------------


def test_l2n_matches_loops():
    X = rand(5, 7, seed=1)
    X[2] = 0.0
    Y = l2n(X)
    assert Y.dtype == np.float32 and Y.flags.c_contiguous and Y.shape == X.shape
    for i in range(5):
        norm = math.sqrt(sum(float(v) ** 2 for v in X[i]))
        for j in range(7):
            want = 0.0 if norm == 0 else float(X[i, j]) / norm
            assert abs(Y[i, j] - want) < 1e-6
    assert np.allclose(np.linalg.norm(Y[[0, 1, 3, 4]], axis=1), 1.0, atol=1e-6)
    assert l2n(np.array([3.0, 4.0])).tolist() == [[0.6000000238418579, 0.800000011920929]]


def test_power_law_matches_loops_and_hand_values():
    X = rand(4, 6, seed=2)
    for alpha in (0.5, 0.3, 1.0, 2.0):
        Y = power_law(X, alpha)
        for i in range(4):
            for j in range(6):
                x = float(X[i, j])
                assert abs(Y[i, j] - math.copysign(abs(x) ** alpha, x)) < 1e-5
    np.testing.assert_allclose(power_law(np.array([[-4.0, 9.0, 0.0, 0.25]])), [[-2.0, 3.0, 0.0, 0.5]], atol=1e-7)
    with pytest.raises(UsageError, match="alpha must be > 0"):
        power_law(X, 0)
    with pytest.raises(UsageError, match="N x D"):
        l2n(np.zeros((2, 3, 4)))


# ---------------------------------------------------------------------------
# PCA and whitening
# ---------------------------------------------------------------------------


def test_pca_matches_loop_reference():
    X = structured(40, seed=3)
    mean, cov = ref_cov(X)
    vals, vecs = ref_eigs(cov, 4)
    pca = PCA().fit(X, 4)
    np.testing.assert_allclose(pca.mean, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pca.eigvals, vals, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pca.components, vecs, rtol=1e-5, atol=1e-5)
    new = structured(7, seed=4) * 1.5
    np.testing.assert_allclose(pca.apply(new), ref_project(new, mean, vecs, [1] * 4), rtol=1e-5, atol=1e-5)
    w = PCA().fit(X, 3, whiten=True)
    np.testing.assert_allclose(w.apply(new), ref_project(new, mean, vecs[:3], 1 / np.sqrt(vals[:3])),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, d, dim", [(500, 12, 8), (12, 30, 5)])  # eigh path and thin-SVD path
def test_whitened_training_descriptors_have_identity_covariance(n, d, dim):
    rng = np.random.default_rng(n)
    X = (rng.normal(size=(n, d)) * np.linspace(4, 0.5, d) + 2.0).astype(np.float32)
    X = X @ np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)
    pca = PCA().fit(X, dim, whiten=True)
    Y = pca.apply(X)
    assert Y.shape == (n, dim) and Y.dtype == np.float32 and Y.flags.c_contiguous
    np.testing.assert_allclose(np.cov(Y.astype(np.float64), rowvar=False), np.eye(dim), atol=1e-5)
    np.testing.assert_allclose(Y.mean(axis=0), np.zeros(dim), atol=1e-5)


def test_applying_to_new_data_uses_the_training_mean():
    X = structured(200, seed=5)
    pca = PCA().fit(X, 4, whiten=True)
    np.testing.assert_allclose(pca.apply(X.mean(axis=0, dtype=np.float64)[None]), np.zeros((1, 4)), atol=1e-5)
    shifted = structured(50, seed=6) + 10.0  # a set with a very different mean is not re-centred
    Y = pca.apply(shifted)
    assert np.abs(Y.mean(axis=0)).max() > 1.0
    direct = (shifted.astype(np.float64) - pca.mean) @ pca.components.T * pca.scale
    np.testing.assert_allclose(Y, direct, rtol=1e-5, atol=1e-5)
    one = pca.apply(shifted[3])  # one row at a time gives the same answer
    np.testing.assert_allclose(one, Y[3:4], rtol=1e-6, atol=1e-6)


def test_shrinkage_regularises_eigenvalues_towards_their_mean():
    X = structured(400, seed=7)
    lam_all = np.linalg.eigvalsh(np.cov(X.astype(np.float64), rowvar=False))[::-1]
    mean_lam = lam_all.mean()
    for s in (0.0, 0.3, 1.0):
        pca = PCA().fit(X, 5, whiten=True, shrinkage=s)
        Y = pca.apply(X)
        want = lam_all[:5] / ((1 - s) * lam_all[:5] + s * mean_lam)
        np.testing.assert_allclose(np.diag(np.cov(Y.astype(np.float64), rowvar=False)), want, rtol=1e-5, atol=1e-5)
    plain = PCA().fit(X, 5).apply(X)
    np.testing.assert_allclose(PCA().fit(X, 5, whiten=True, shrinkage=1.0).apply(X), plain / math.sqrt(mean_lam),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="shrinkage must be in"):
        PCA().fit(X, 3, whiten=True, shrinkage=1.5)
    with pytest.raises(UsageError, match="only applies to PCA-whitening"):
        PCA().fit(X, 3, shrinkage=0.5)


def test_dimension_larger_than_rank_is_a_clear_error():
    rng = np.random.default_rng(0)
    low_rank = (rng.normal(size=(100, 5)) @ rng.normal(size=(5, 10))).astype(np.float32)
    PCA().fit(low_rank, 5)
    with pytest.raises(UsageError, match="rank 5"):
        PCA().fit(low_rank, 6)
    with pytest.raises(UsageError, match=r"at most min\(N-1, D\) = 3"):
        PCA().fit(rand(4, 10), 4, whiten=True)
    with pytest.raises(UsageError, match="choose dim <= 10"):
        PCA().fit(rand(50, 10), 11)
    with pytest.raises(UsageError, match="at least 2"):
        PCA().fit(rand(1, 10), 1)
    with pytest.raises(UsageError, match="not fitted"):
        PCA().apply(rand(2, 3))
    with pytest.raises(UsageError, match="fitted on 10-D"):
        PCA().fit(rand(50, 10), 3).apply(rand(2, 9))
    bad = rand(20, 4)
    bad[3, 1] = np.nan
    with pytest.raises(UsageError, match="NaN"):
        PCA().fit(bad, 2)


# ---------------------------------------------------------------------------
# Chains
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, canonical, needs_fit",
    [
        ("none", "none", False), ("", "none", False), ("l2", "l2", False), ("L2N", "l2", False),
        ("power:0.5,l2", "power:0.5,l2", False), ("sqrt,l2", "power:0.5,l2", False), ("power", "power:0.5", False),
        ("power:alpha=0.25", "power:0.25", False), ("pca:128", "pca:128", True), ("pca:dim=64", "pca:64", True),
        ("pca-whiten:128,l2", "pca-whiten:128,l2", True), ("pcaw:32", "pca-whiten:32", True),
        ("pca-whiten:256:shrink=0.5", "pca-whiten:256:shrink=0.5", True),
        ("l2, pca-whiten:16:shrinkage=0.25 ,l2", "l2,pca-whiten:16:shrink=0.25,l2", True),
        ("pca-whiten:8:shrink=0", "pca-whiten:8", True), ("l2,lw:16,l2", "l2,lw:16,l2", True),
    ],
)
def test_chain_grammar(spec, canonical, needs_fit):
    chain = parse_post(spec)
    assert chain.spec == canonical and chain.needs_fit == needs_fit and chain.fitted == (not needs_fit)
    assert PostChain(chain.spec).spec == canonical
    json.dumps(chain.to_dict())


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("pca", "needs a dimension"), ("pca:abc", "must be an integer"), ("pca:0", ">= 1"),
        ("pca:128:shrink=0.5", "applies to pca-whiten only"), ("pca-whiten:128:shrink=2", "in [0, 1]"),
        ("power:-1", "alpha must be > 0"), ("l2:3", "takes no arguments"), ("l2,,pca:3", "empty step"),
        ("whitening:128", "valid steps: l2, power, sqrt, pca, pca-whiten"), ("l2,none", "whole post-processing"),
        ("pca:12:34", "not understood"), ("pca-whiten:8:foo=1", "not understood"), ("lw", "use lw:DIM"),
        ("lw:0", ">= 1"),
    ],
)
def test_bad_chains_raise_usage_errors(spec, fragment):
    with pytest.raises(UsageError) as e:
        parse_post(spec)
    assert fragment in str(e.value)


def test_chain_fit_apply_equals_manual_composition():
    train, test = structured(300, seed=8), structured(20, seed=9)
    chain = parse_post("l2,pca-whiten:4,l2")
    with pytest.raises(UsageError, match="must be fitted first"):
        chain.apply(test)
    assert chain.fit(train) is chain and chain.fitted and chain.dim_in == 6 and chain.output_dim(6) == 4
    manual = PCA().fit(l2n(train), 4, whiten=True)
    want = l2n(manual.apply(l2n(test)))
    got = chain.apply(test)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    with pytest.raises(UsageError, match="fitted on 6-D"):
        chain.apply(rand(3, 5))
    np.testing.assert_array_equal(parse_post("none").apply(test), test)
    np.testing.assert_allclose(parse_post("power:0.5,l2").apply(test), l2n(power_law(test, 0.5)), atol=1e-7)
    two = parse_post("pca:5,power:0.5,pca-whiten:3").fit(train)  # every PCA fitted on what reaches it
    np.testing.assert_allclose(np.cov(two.apply(train).astype(np.float64), rowvar=False), np.eye(3), atol=1e-5)
    with pytest.raises(UsageError, match="receives 6-D"):
        parse_post("pca:8").fit(train)


def test_chain_files_are_self_describing_and_round_trip(tmp_path):
    train, test = structured(300, seed=10), structured(10, seed=11)
    chain = parse_post("l2,pca-whiten:4:shrink=0.5,l2").fit(train)
    path = tmp_path / "sub" / "post.npz"
    chain.save(path, extra={"model": "efficientnet_lite0", "layer": "bn2", "pooling": "gem:p=3"})
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert sorted(z.files) == ["meta", "step1.components", "step1.eigvals", "step1.mean", "step1.scale"]
    assert meta["kind"] == "deepfeat.postchain" and meta["spec"] == chain.spec
    assert meta["dim_in"] == 6 and meta["dim_out"] == 4 and meta["fitted_on"] == 300
    assert meta["deepfeat_version"] == deepfeat.__version__ and meta["created"] and meta["saved"]
    assert meta["extra"]["layer"] == "bn2" and meta["steps"][1]["shrinkage"] == 0.5
    loaded = PostChain.load(path)
    assert loaded.spec == chain.spec and loaded.fitted and loaded.dim_in == 6 and loaded.n_fit == 300
    np.testing.assert_array_equal(loaded.apply(test), chain.apply(test))
    with pytest.raises(UsageError, match="not fitted; fit it before saving"):
        parse_post("pca:3").save(tmp_path / "x.npz")
    parse_post("power:0.5,l2").save(tmp_path / "nofit.npz")
    assert PostChain.load(tmp_path / "nofit.npz").spec == "power:0.5,l2"


def test_pca_files_round_trip_and_bad_files_are_rejected(tmp_path):
    X = structured(100, seed=12)
    pca = PCA().fit(X, 3, whiten=True)
    pca.save(tmp_path / "pca.npz")
    with np.load(tmp_path / "pca.npz", allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
    assert meta["kind"] == "deepfeat.pca" and meta["dim"] == 3 and meta["dim_in"] == 6 and meta["fitted_on"] == 100
    loaded = PCA.load(tmp_path / "pca.npz")
    assert loaded.whiten and loaded.n_fit == 100 and repr(loaded) == "PCA(6 -> 3, whiten=True, fitted_on=100)"
    np.testing.assert_array_equal(loaded.apply(X), pca.apply(X))
    with pytest.raises(FormatError, match="expected a deepfeat.postchain file, found kind 'deepfeat.pca'"):
        PostChain.load(tmp_path / "pca.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(FormatError, match="no 'meta' entry"):
        PCA.load(tmp_path / "plain.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(FormatError, match="not a readable"):
        PCA.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "obj.npz", meta=np.array([{"kind": "deepfeat.pca"}], dtype=object))
    with pytest.raises(FormatError):  # object arrays would need pickle: refused
        PCA.load(tmp_path / "obj.npz")
    with pytest.raises(UsageError, match="file not found"):
        PCA.load(tmp_path / "missing.npz")


def test_learned_whitening_chain_is_an_affine_map_that_round_trips(tmp_path):
    rng = np.random.default_rng(3)
    W, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    x = structured(12, seed=13)
    chain = learned_whitening_chain(W, b, {"layer": "bn2", "trained_on": 40})
    assert chain.spec == "l2,lw:3,l2" and chain.fitted and chain.dim_in == 6 and chain.output_dim(6) == 3
    want = []
    for row in x:  # loops: L2, then y_i = sum_j W_ij x_j + b_i, then L2
        v = row / math.sqrt(sum(float(t) ** 2 for t in row))
        y = [sum(W[i, j] * v[j] for j in range(6)) + b[i] for i in range(3)]
        n = math.sqrt(sum(t * t for t in y))
        want.append([t / n for t in y])
    np.testing.assert_allclose(chain.apply(x), np.array(want), atol=1e-6)
    chain.save(tmp_path / "whitening.npz")
    loaded = PostChain.from_arg(str(tmp_path / "whitening.npz"))
    assert loaded.spec == chain.spec and loaded.n_fit == 40
    assert loaded.to_dict()["steps"][1]["learned"]["layer"] == "bn2"
    np.testing.assert_array_equal(loaded.apply(x), chain.apply(x))
    # fitting keeps the learned step and fits the PCA after it
    mixed = parse_post("l2,lw:3,pca:2")
    with pytest.raises(UsageError, match="learned by `deepfeat finetune --whiten`"):
        mixed.fit(x)
    mixed.steps[1].affine = loaded.steps[1].affine
    assert mixed.fit(x).apply(x).shape == (12, 2)
    with pytest.raises(UsageError, match="fitted on 6-D descriptors, got 5-D"):
        chain.apply(rand(2, 5))
    with pytest.raises(UsageError, match="chain file not found"):
        PostChain.from_arg(str(tmp_path / "missing.npz"))
    assert PostChain.from_arg("pca:4").spec == "pca:4"
