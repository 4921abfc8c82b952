"""Poolings against plain-loop references, hand-computed examples and the papers' promises."""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pytest
import torch

from deepfeat import pooling as P
from deepfeat.errors import FormatError, UsageError

SHAPES = [(2, 5, 7, 9), (1, 3, 1, 1), (3, 4, 6, 6), (2, 3, 1, 8), (1, 4, 11, 5)]


def rand_map(shape, seed=0, relu=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return torch.relu(x) if relu else x


def close(a, b, rtol=1e-5, atol=1e-5):
    a = a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    np.testing.assert_allclose(a, np.asarray(b, dtype=np.float64), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------
# Plain-loop references, written from the papers, no vectorisation
# ---------------------------------------------------------------------------


def ref_reduce(x, how, p=3.0, eps=1e-6):
    x = x.double().numpy()
    N, C, H, W = x.shape
    out = np.zeros((N, C))
    for n in range(N):
        for c in range(C):
            vals = [x[n, c, i, j] for i in range(H) for j in range(W)]
            if how == "sum":
                out[n, c] = sum(vals)
            elif how == "avg":
                out[n, c] = sum(vals) / len(vals)
            elif how == "max":
                out[n, c] = max(vals)
            elif how == "gem":
                out[n, c] = (sum(max(v, eps) ** p for v in vals) / len(vals)) ** (1.0 / p)
    return out


def ref_spoc_prior(H, W):
    sigma = min(H, W) / 2.0 / 3.0  # one third of the distance from the centre to the closest border
    a = np.zeros((H, W))
    for i in range(H):
        for j in range(W):
            y, x = i + 0.5, j + 0.5
            a[i, j] = math.exp(-((y - H / 2.0) ** 2 + (x - W / 2.0) ** 2) / (2 * sigma**2))
    return a


def ref_spoc(x, prior):
    x = x.double().numpy()
    N, C, H, W = x.shape
    a = ref_spoc_prior(H, W) if prior else np.ones((H, W))
    out = np.zeros((N, C))
    for n in range(N):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    out[n, c] += a[i, j] * x[n, c, i, j]
    return out


def matlab_rmac_regions(H, W, L):
    """Transcription of Tolias' MATLAB rmac_regions (1-based arithmetic), returned 0-based."""
    ovr = 0.4
    steps = [2, 3, 4, 5, 6, 7]
    w = min(W, H)
    best, idx = None, None
    for pos, s in enumerate(steps, start=1):
        b = (max(H, W) - w) / (s - 1)
        cost = abs(((w**2 - w * b) / w**2) - ovr)
        if best is None or cost < best:
            best, idx = cost, pos
    Wd = Hd = 0
    if H < W:
        Wd = idx
    elif H > W:
        Hd = idx
    out = []
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = (W - wl) / (l + Wd - 1) if (l + Wd - 1) != 0 else 0.0
        cenW = [math.floor(wl2 + k * b) - wl2 for k in range(l - 1 + Wd + 1)]
        b = (H - wl) / (l + Hd - 1) if (l + Hd - 1) != 0 else 0.0
        cenH = [math.floor(wl2 + k * b) - wl2 for k in range(l - 1 + Hd + 1)]
        for i_ in cenH:
            for j_ in cenW:
                if wl == 0:
                    continue
                # MATLAB R = X(i_+[1:wl], j_+[1:wl]) -> rows i_ .. i_+wl-1 (0-based)
                out.append((i_, j_, i_ + wl, j_ + wl))
    return out


def ref_regional(x, regions, region_fn):
    x = x.double().numpy()
    N, C = x.shape[:2]
    out = np.zeros((N, C))
    for n in range(N):
        acc = [0.0] * C
        for (y0, x0, y1, x1) in regions:
            v = []
            for c in range(C):
                vals = [x[n, c, i, j] for i in range(y0, y1) for j in range(x0, x1)]
                v.append(region_fn(vals))
            norm = math.sqrt(sum(t * t for t in v))
            for c in range(C):
                acc[c] += v[c] / max(norm, 1e-6)
        norm = math.sqrt(sum(t * t for t in acc))
        out[n] = [t / max(norm, 1e-6) for t in acc]
    return out


def ref_crow(x, a=2.0, b=2.0):
    """Following the authors' numpy code (YahooArchive/crow), one image at a time, with loops."""
    x = x.double().numpy()
    N, C, H, W = x.shape
    out = np.zeros((N, C))
    for n in range(N):
        S = np.zeros((H, W))
        for i in range(H):
            for j in range(W):
                S[i, j] = sum(x[n, c, i, j] for c in range(C))
        z = sum(S[i, j] ** a for i in range(H) for j in range(W)) ** (1.0 / a)
        S = S / z
        if b != 1:
            S = S ** (1.0 / b)
        Q = [sum(1 for i in range(H) for j in range(W) if x[n, c, i, j] != 0) / (H * W) for c in range(C)]
        total = sum(Q)
        beta = [math.log(total / q) if q > 0 else 0.0 for q in Q]
        for c in range(C):
            out[n, c] = beta[c] * sum(S[i, j] * x[n, c, i, j] for i in range(H) for j in range(W))
    return out


def ref_vlad(desc, centers, intra=False, alpha=0.5):
    desc = desc.double().numpy()
    centers = centers.double().numpy()
    N, M, D = desc.shape
    K = centers.shape[0]
    out = np.zeros((N, K * D))
    for n in range(N):
        v = np.zeros((K, D))
        for m in range(M):
            dists = [sum((desc[n, m, d] - centers[k, d]) ** 2 for d in range(D)) for k in range(K)]
            k = dists.index(min(dists))
            for d in range(D):
                v[k, d] += desc[n, m, d] - centers[k, d]
        if intra:
            for k in range(K):
                norm = math.sqrt(sum(t * t for t in v[k]))
                if norm > 1e-6:
                    v[k] /= norm
        flat = [math.copysign(abs(t) ** alpha, t) for t in v.reshape(-1)]
        norm = math.sqrt(sum(t * t for t in flat))
        out[n] = [t / max(norm, 1e-6) for t in flat]
    return out


# ---------------------------------------------------------------------------
# Global poolings
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_global_poolings_match_loop_reference(shape):
    x = rand_map(shape, seed=sum(shape))
    close(P.sum_pool(x), ref_reduce(x, "sum"))
    close(P.avg_pool(x), ref_reduce(x, "avg"))
    close(P.mac(x), ref_reduce(x, "max"))
    for p in (1.0, 2.5, 3.0, 7.0):
        close(P.gem(x, p=p), ref_reduce(x, "gem", p=p))
    close(P.spoc(x), ref_spoc(x, prior=False))
    close(P.spoc(x, center_prior=True), ref_spoc(x, prior=True))
    xs = rand_map(shape, seed=7, relu=False)  # negative values: GeM clamps at eps
    close(P.gem(xs, p=3.0), ref_reduce(xs, "gem", p=3.0))
    close(P.mac(xs), ref_reduce(xs, "max"))


def test_hand_computed_tiny_example():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 8.0]]]])  # 1 x 2 x 2 x 2
    close(P.sum_pool(x), [[10.0, 8.0]])
    close(P.avg_pool(x), [[2.5, 2.0]])
    close(P.mac(x), [[4.0, 8.0]])
    close(P.gem(x, p=2.0), [[math.sqrt(7.5), math.sqrt((3 * 1e-12 + 64) / 4)]])
    close(P.get_pooling("gem:1")(x), [[2.5, (3e-6 + 8) / 4]])
    # SPoC prior on 2x2: every cell centre is (0.5, 0.5) away from the centre, sigma = 1/3
    a = math.exp(-0.5 / (2 / 9))
    close(P.spoc_center_prior(2, 2), [[a, a], [a, a]])
    close(P.spoc(x, center_prior=True), [[10 * a, 8 * a]])
    # CroW: S = [[1, 2], [3, 12]], ||S||_2 = sqrt(158), S' = sqrt(S / sqrt(158))
    z = math.sqrt(158.0)
    s = [[math.sqrt(1 / z), math.sqrt(2 / z)], [math.sqrt(3 / z), math.sqrt(12 / z)]]
    v0 = 1 * s[0][0] + 2 * s[0][1] + 3 * s[1][0] + 4 * s[1][1]
    v1 = 8 * s[1][1]
    # Q = [1, 0.25] -> beta = [log(1.25 / 1), log(1.25 / 0.25)]
    close(P.crow(x), [[math.log(1.25) * v0, math.log(5.0) * v1]])
    # R-MAC on 2x2 with L=1: one region = the whole map -> L2-normalised MAC
    close(P.rmac(x, L=1), [[4 / math.sqrt(80), 8 / math.sqrt(80)]])


def test_gem_limits_and_scaling():
    x = rand_map((2, 6, 7, 9), seed=3) + 0.05
    close(P.gem(x, p=1.0), P.avg_pool(x))
    m = P.mac(x)
    prev = P.gem(x, p=1.0)
    for p in (2.0, 5.0, 20.0, 100.0):
        cur = P.gem(x, p=p)
        assert (cur >= prev - 1e-6).all(), "GeM must grow with p"
        assert (cur <= m + 1e-6).all(), "GeM never exceeds MAC"
        prev = cur
    close(P.gem(x, p=3000.0), m, rtol=3e-3, atol=0)
    big = x * 40  # (40 x)^500 overflows float32; the result must still be finite and <= MAC
    y = P.gem(big, p=500.0)
    assert torch.isfinite(y).all() and (y <= P.mac(big) * (1 + 1e-6)).all()
    const = torch.full((1, 3, 4, 5), 2.5)
    close(P.gem(const, p=3.0), np.full((1, 3), 2.5))
    for fn in (P.mac, P.avg_pool, P.sum_pool, lambda t: P.gem(t, 3.0)):
        close(fn(3.0 * x), 3.0 * fn(x).numpy(), rtol=1e-5, atol=1e-5)  # positively homogeneous
    close(P.sum_pool(x), P.avg_pool(x).numpy() * 63)


# ---------------------------------------------------------------------------
# R-MAC region grid and regional poolings
# ---------------------------------------------------------------------------


def test_rmac_regions_hand_layouts():
    # 7 x 7 (a 224 px input at stride 32): 1 + 4 + 9 squares of side 7, 4, 3
    expected = [(0, 0, 7, 7)]
    expected += [(y, x, y + 4, x + 4) for y in (0, 3) for x in (0, 3)]
    expected += [(y, x, y + 3, x + 3) for y in (0, 2, 4) for x in (0, 2, 4)]
    assert P.rmac_regions(7, 7, L=3) == expected
    # 5 x 8, wide: the overlap rule picks one extra region along the width
    wide = [(0, 0, 5, 5), (0, 3, 5, 8)]
    wide += [(y, x, y + 3, x + 3) for y in (0, 2) for x in (0, 2, 5)]
    wide += [(y, x, y + 2, x + 2) for y in (0, 1, 3) for x in (0, 2, 4, 6)]
    assert P.rmac_regions(5, 8, L=3) == wide
    assert sorted(P.rmac_regions(8, 5, L=3)) == sorted((x0, y0, x1, y1) for (y0, x0, y1, x1) in wide)
    # 2 x 2: level 3 repeats the first row/column, as the reference code does
    tiny = [(0, 0, 2, 2)] + [(y, x, y + 1, x + 1) for y in (0, 1) for x in (0, 1)]
    tiny += [(y, x, y + 1, x + 1) for y in (0, 0, 1) for x in (0, 0, 1)]
    assert P.rmac_regions(2, 2, L=3) == tiny
    assert P.rmac_regions(1, 1, L=3) == [(0, 0, 1, 1)]


def test_rmac_regions_follow_tolias_reference_on_many_sizes():
    sizes = [(h, w) for h in range(1, 15) for w in range(1, 15)] + [(24, 32), (32, 24), (30, 40), (45, 64), (64, 45)]
    for H, W in sizes:
        for L in (1, 2, 3, 4):
            regions = P.rmac_regions(H, W, L=L)
            assert regions == matlab_rmac_regions(H, W, L), (H, W, L)
            for y0, x0, y1, x1 in regions:
                assert 0 <= y0 < y1 <= H and 0 <= x0 < x1 <= W and (y1 - y0) == (x1 - x0)
            assert regions[0][2] - regions[0][0] == min(H, W)  # level 1 squares are as large as possible


def test_rmac_level1_overlap_is_closest_to_40_percent():
    # 24 x 32 (768 x 1024 image at stride 32): level 1 has 24 x 24 squares; the count along
    # the width is chosen so consecutive squares overlap as close to 40% as possible
    regions = [r for r in P.rmac_regions(24, 32, L=1)]
    xs = [r[1] for r in regions]
    assert len(regions) == 2 and xs == [0, 8]
    overlap = (24 - (xs[1] - xs[0])) / 24
    assert abs(overlap - 0.4) < abs((24 - 4) / 24 - 0.4)  # better than 3 regions (step 4)


@pytest.mark.parametrize("shape", [(2, 4, 7, 9), (1, 3, 5, 8), (2, 3, 8, 5), (1, 5, 3, 3), (1, 2, 1, 6)])
def test_rmac_and_rgem_match_loop_reference(shape):
    x = rand_map(shape, seed=11)
    H, W = shape[2:]
    for L in (1, 2, 3):
        regions = matlab_rmac_regions(H, W, L)
        close(P.rmac(x, L=L), ref_regional(x, regions, max))
        gem_fn = lambda vals: (sum(max(v, 1e-6) ** 3.0 for v in vals) / len(vals)) ** (1 / 3.0)
        close(P.rgem(x, p=3.0, L=L), ref_regional(x, regions, gem_fn))
    y = P.get_pooling("rmac+mac")(x)
    r = ref_regional(x, matlab_rmac_regions(H, W, 3), max)
    m = ref_reduce(x, "max")
    m = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-6)
    close(y, np.concatenate([r, m], axis=1) / math.sqrt(2))


def test_rmac_is_scale_invariant_and_unit_norm():
    x = rand_map((3, 6, 9, 12), seed=5)
    for spec in ("rmac", "rgem", "rmac+mac", "rmac:L=2+gem:p=2"):
        pl = P.get_pooling(spec)
        y = pl(x)
        close(y.norm(dim=1), np.ones(3))
        close(pl(7.0 * x), y)


# ---------------------------------------------------------------------------
# CroW
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 6, 4, 4), (2, 3, 1, 5)])
def test_crow_matches_loop_reference(shape):
    x = rand_map(shape, seed=13)  # ReLU'd: about half the entries are exactly zero
    x[0, 1] = 0.0  # an all-zero channel gets weight 0
    close(P.crow(x), ref_crow(x), rtol=1e-5, atol=1e-5)
    close(P.crow(x, a=1.0, b=1.0), ref_crow(x, 1.0, 1.0))
    close(P.get_pooling("crow:3,0.5")(x), ref_crow(x, 3.0, 0.5))
    assert P.crow(x)[0, 1] == 0


def test_crow_finite_on_all_zero_and_negative_maps():
    assert torch.equal(P.crow(torch.zeros(1, 3, 4, 4)), torch.zeros(1, 3))
    y = P.crow(rand_map((2, 4, 5, 5), seed=2, relu=False))
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------
# Registry and specs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, canonical",
    [
        ("gem", "gem:p=3"), ("gem:3", "gem:p=3"), ("gem:p=3", "gem:p=3"), ("GeM:P=2.5", "gem:p=2.5"),
        ("gem:p=3,eps=1e-5", "gem:p=3,eps=1e-05"), ("rmac:L=3", "rmac:L=3"), ("rmac:2", "rmac:L=2"),
        ("rmac:L=3,overlap=0.3", "rmac:L=3,overlap=0.3"), ("rmac+mac", "rmac:L=3+mac"),
        ("rgem:p=3", "rgem:p=3,L=3"), ("crow:a=2,b=2", "crow:a=2,b=2"), ("crow", "crow:a=2,b=2"),
        ("none", "none"), ("max", "mac"), ("ave", "avg"), ("sum", "sum"), ("spoc", "spoc"),
        ("spoc:center_prior=1", "spoc:center_prior=1"), ("spoc:center_prior=true", "spoc:center_prior=1"),
        ("mop:k=64,dim=128", "mop:k=64,local=128,dim=128,windows=128/64,step=32,cell=32,pool=mac"),
        ("mop:input=224,windows=160/96/64,pool=avg",
         "mop:k=100,local=128,dim=256,windows=160/96/64,step=32,input=224,pool=avg"),
        ("gem:p=2 + mac", "gem:p=2+mac"),
    ],
)
def test_specs_are_canonical_and_round_trip(spec, canonical):
    pl = P.get_pooling(spec)
    assert pl.spec == canonical
    again = P.get_pooling(pl.spec)
    assert again.spec == canonical and type(again) is type(pl)
    d = pl.to_dict()
    json.dumps(d)
    assert d["spec"] == canonical


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("gme", "valid poolings: none, sum, avg, spoc, mac, gem, rmac, rgem, crow, cls, reg, mop"),
        ("gme", "Did you mean: gem"),
        ("gem:q=3", "its parameters are: p, eps"),
        ("gem:abc", "p must be a number > 0"),
        ("gem:p=-1", "p must be a number > 0"),
        ("gem:p=3,p=4", "sets p twice"),
        ("gem:3,4", "name=value"),
        ("rmac:L=0", "L must be an integer >= 1"),
        ("rmac:L=2.5", "L must be an integer >= 1"),
        ("rmac:overlap=1.5", "overlap must be a number in (0, 1)"),
        ("crow:a=nan", "a must be a number > 0"),
        ("mac:3", "takes no parameters"),
        ("mop+gem", "cannot be part of a '+' concatenation"),
        ("none+mac", "cannot be part of a '+' concatenation"),
        ("mop:cell=16,input=224", "not both"),
        ("mop:pool=median", "pool must be mac or avg"),
        ("spoc:center_prior=maybe", "center_prior must be 0 or 1"),
        ("", "valid poolings"),
        ("gem:", None),
    ],
)
def test_bad_specs_raise_usage_errors(spec, fragment):
    if fragment is None:  # a trailing colon with no parameters is just the default
        assert P.get_pooling(spec).spec == "gem:p=3"
        return
    with pytest.raises(UsageError) as e:
        P.get_pooling(spec)
    assert fragment in str(e.value)


def test_registry_lists_every_method_with_citation():
    assert P.list_poolings() == ["none", "sum", "avg", "spoc", "mac", "gem", "rmac", "rgem", "crow", "cls", "reg", "mop"]
    for row in P.describe_poolings():
        assert row["summary"] and row["citation"] and row["syntax"].startswith(row["name"])
    assert [n for n, k in P.POOLINGS.items() if k.needs_fit] == ["mop"]
    assert P.get_pooling(P.get_pooling("gem")) is not None


@pytest.mark.parametrize("n", list(P.POOLINGS))
def test_registry_entry_builds_a_pooling(n):
    assert P.get_pooling(n).needs_fit == (n == "mop")


def test_output_dim():
    assert P.get_pooling("gem").output_dim(512) == 512
    assert P.get_pooling("rmac+mac").output_dim(512) == 1024
    assert P.get_pooling("rmac+mac+gem").output_dim(100) == 300
    assert P.get_pooling("mop:k=10,local=16,dim=32").output_dim(512) == 512 + 2 * 32
    assert P.get_pooling("mop:k=10,local=16,dim=0").output_dim(512) == 512 + 2 * 160
    assert P.get_pooling("mop:k=10,local=0,dim=0,windows=64").output_dim(8) == 8 + 80


# ---------------------------------------------------------------------------
# Batches, sizes, 2-D inputs
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fitted_mop():
    batches = [rand_map((4, 6, 9, 9), seed=s) for s in range(3)]
    return P.get_pooling("mop:k=5,local=4,dim=6").fit(batches)


#: every registered pooling on feature maps (``none`` takes pooled vectors) and a few combinations,
#: parametrised from the registry so that a new pooling is tested the day it is added
MAP_POOLINGS = [n for n in P.POOLINGS if n != "none" and not P.POOLINGS[n].token_fn] + [
    "spoc:center_prior=1", "rmac+mac"]


def map_pooling(spec: str, mop):
    return mop if spec == "mop" else P.get_pooling(spec)


@pytest.mark.parametrize("spec", MAP_POOLINGS)
def test_batches_equal_single_images(fitted_mop, spec):
    x = rand_map((3, 6, 9, 9), seed=21)
    pl = map_pooling(spec, fitted_mop)
    batch = pl(x)
    single = torch.cat([pl(x[i : i + 1]) for i in range(3)])
    close(batch, single.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", MAP_POOLINGS)
@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (9, 9), (16, 11), (4, 30)])
def test_any_spatial_size(fitted_mop, hw, spec):
    x = rand_map((2, 6, *hw), seed=hw[0] * 31 + hw[1])
    pl = map_pooling(spec, fitted_mop)
    y = pl(x)
    assert y.shape == (2, pl.output_dim(6)), pl.spec
    assert torch.isfinite(y).all(), pl.spec
    if pl.l2_normalized:
        close(y.norm(dim=1), np.ones(2))


def test_two_dimensional_inputs():
    v = torch.randn(4, 10)
    assert P.get_pooling("none")(v) is v
    close(P.get_pooling("none")(v[:, :, None, None]), v.numpy())
    for name in ("sum", "avg", "mac", "gem", "rmac", "crow", "spoc", "rgem"):
        with pytest.raises(UsageError, match="already pooled, use pooling 'none'"):
            P.get_pooling(name)(v)
    with pytest.raises(UsageError, match="already pooled, use pooling 'none'"):
        P.get_pooling("rmac+mac")(v)
    with pytest.raises(UsageError, match="choose a spatial pooling"):
        P.get_pooling("none")(torch.zeros(1, 3, 2, 2))
    with pytest.raises(UsageError, match="token sequence or an N x H x W x C map"):
        P.mac(torch.zeros(3, 4, 4))


# ---------------------------------------------------------------------------
# Learnable GeM
# ---------------------------------------------------------------------------


def test_gem_module_is_learnable_and_matches_function():
    x = rand_map((2, 4, 5, 6), seed=4) + 0.1
    m = P.GeM(p=3.0)
    assert isinstance(m.p, torch.nn.Parameter) and m.p.requires_grad
    close(m(x), P.gem(x, 3.0).numpy())
    m(x).sum().backward()
    assert m.p.grad is not None and torch.isfinite(m.p.grad).all() and m.p.grad.abs().item() > 0
    with torch.no_grad():
        m.p.fill_(2.5)
    assert m.to_pooling().spec == "gem:p=2.5"
    fixed = P.GeM(p=4.0, learnable=False)
    assert not list(fixed.parameters()) and fixed.p.item() == 4.0
    with pytest.raises(UsageError):
        P.GeM(p=0)


# ---------------------------------------------------------------------------
# Multi-scale
# ---------------------------------------------------------------------------


def test_combine_scales():
    a, b, c = (torch.rand(2, 5) + 0.1 for _ in range(3))
    close(P.combine_scales([a, b, c]), (a + b + c).numpy())
    ref = ((a.double() ** 3 + b.double() ** 3 + c.double() ** 3) / 3) ** (1 / 3)
    close(P.combine_scales([a, b, c], mode="gem", p=3.0), ref.numpy())
    close(P.combine_scales([a, b], mode="gem", p=1.0), ((a + b) / 2).numpy())
    with pytest.raises(UsageError, match="sum, gem"):
        P.combine_scales([a], mode="max")
    with pytest.raises(UsageError, match="different shapes"):
        P.combine_scales([a, torch.rand(2, 4)])
    with pytest.raises(UsageError):
        P.combine_scales([])
    assert P.parse_scales("1,0.707,1/2") == (1.0, 0.707, 0.5)
    with pytest.raises(UsageError):
        P.parse_scales("1,big")
    with pytest.raises(UsageError):
        P.parse_scales("1,-0.5")


def test_multiscale_rules():
    maps = [rand_map((2, 4, 9, 12), seed=1), rand_map((2, 4, 6, 8), seed=2), rand_map((2, 4, 4, 6), seed=3)]
    # R-MAC: every region of every scale summed, one final L2
    acc = np.zeros((2, 4))
    for m in maps:
        H, W = m.shape[2:]
        x = m.double().numpy()
        for n in range(2):
            for (y0, x0, y1, x1) in matlab_rmac_regions(H, W, 3):
                v = np.array([max(x[n, c, i, j] for i in range(y0, y1) for j in range(x0, x1)) for c in range(4)])
                acc[n] += v / max(np.linalg.norm(v), 1e-6)
    ref = acc / np.linalg.norm(acc, axis=1, keepdims=True)
    close(P.get_pooling("rmac").multiscale(maps), ref)
    # global: each scale L2-normalised, combined, L2-normalised
    g = [ref_reduce(m, "gem", p=3.0) for m in maps]
    g = [v / np.linalg.norm(v, axis=1, keepdims=True) for v in g]
    s = sum(g)
    close(P.get_pooling("gem").multiscale(maps), s / np.linalg.norm(s, axis=1, keepdims=True))
    gm = (sum(v**2 for v in g) / 3) ** 0.5
    close(P.get_pooling("gem").multiscale(maps, mode="gem", p=2.0), gm / np.linalg.norm(gm, axis=1, keepdims=True))
    y = P.get_pooling("rmac+mac").multiscale(maps)
    close(y[:, :4], ref / math.sqrt(2))


def test_pool_multiscale_runs_the_network_at_each_scale():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU())
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        got = P.pool_multiscale(net, x, "gem", scales=(1, 2**-0.5, 0.5))
        maps = [net(x), net(torch.nn.functional.interpolate(x, scale_factor=2**-0.5, mode="bilinear",
                                                            align_corners=False)),
                net(torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False))]
        assert [m.shape[2:] for m in maps] == [(31, 23), (22, 16), (15, 11)]
        want = P.get_pooling("gem").multiscale(maps)
    close(got, want.numpy())


# ---------------------------------------------------------------------------
# MOP
# ---------------------------------------------------------------------------


def test_mop_patch_grid_matches_paper_layout():
    g2 = P.mop_patch_grid((256, 256), 128, 32)
    assert len(g2) == 25 and g2[0] == (0, 0, 128, 128) and g2[-1] == (128, 128, 256, 256)
    assert g2[1] == (0, 32, 128, 160) and g2[5] == (32, 0, 160, 128)
    g3 = P.mop_patch_grid((256, 256), 64, 32)
    assert len(g3) == 49 and g3[-1] == (192, 192, 256, 256)
    assert P.mop_patch_grid((100, 300), 128, 32) == [(0, x, 100, x + 128) for x in range(0, 173, 32)]
    with pytest.raises(UsageError):
        P.mop_patch_grid((256, 256), 0, 32)


def test_mop_windows_match_loops():
    x = rand_map((2, 3, 7, 9), seed=8)
    # 128 px windows every 32 px at a 32 px cell: 4 x 4 cells, stride 1 -> 4 x 6 windows
    got = P.mop_windows(x, 128, 32, 32, "mac")
    xs = x.double().numpy()
    want = np.zeros((2, 4 * 6, 3))
    for n in range(2):
        k = 0
        for y0 in range(7 - 4 + 1):
            for x0 in range(9 - 4 + 1):
                for c in range(3):
                    want[n, k, c] = max(xs[n, c, i, j] for i in range(y0, y0 + 4) for j in range(x0, x0 + 4))
                k += 1
    close(got, want)
    # 64 px windows every 32 px at a 16 px cell: 4 x 4 cells every 2 cells, averaged
    got = P.mop_windows(x, 64, 32, 16, "avg")
    want = [[[np.mean(xs[n, c, y0 : y0 + 4, x0 : x0 + 4]) for c in range(3)]
             for y0 in range(0, 4, 2) for x0 in range(0, 6, 2)] for n in range(2)]
    close(got, want)
    # a window larger than the map is clamped to it: one window = global MAC
    close(P.mop_windows(x, 1024, 32, 32, "mac")[:, 0], ref_reduce(x, "max"))


@pytest.mark.parametrize("intra", [False, True])
def test_vlad_matches_loop_reference(intra):
    g = torch.Generator().manual_seed(9)
    desc = torch.randn(2, 12, 4, generator=g)
    centers = torch.randn(3, 4, generator=g)
    close(P.vlad(desc, centers, intra=intra), ref_vlad(desc, centers, intra=intra))
    close(P.vlad(desc, centers, intra=intra, alpha=1.0), ref_vlad(desc, centers, intra=intra, alpha=1.0))


def test_kmeans_is_seeded_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    true = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float64)
    X = np.concatenate([c + rng.normal(scale=0.3, size=(50, 2)) for c in true])
    c1 = P.kmeans(X, 4, seed=3)
    assert np.array_equal(c1, P.kmeans(X, 4, seed=3))
    found = sorted(map(tuple, np.round(c1).astype(int).tolist()))
    assert found == [(0, 0), (0, 10), (10, 0), (10, 10)]
    with pytest.raises(UsageError, match="at least 5"):
        P.kmeans(X[:4], 5)
    with pytest.raises(UsageError, match="distinct"):
        P.kmeans(np.ones((20, 2)), 3)


def test_mop_pooling_equals_its_definition(fitted_mop):
    x = rand_map((2, 6, 9, 9), seed=30)
    y = fitted_mop(x)
    assert y.shape == (2, 6 + 6 + 6) and fitted_mop.output_dim(6) == 18
    g = ref_reduce(x, "max")
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    parts = [g]
    for level, window in zip(fitted_mop.levels, (128, 64)):
        desc = P.mop_windows(x, window, 32, 32, "mac")
        local = (desc - level.local_mean) @ level.local_proj.t()
        v = torch.from_numpy(ref_vlad(local, level.centers)).float()
        v = (v - level.vlad_mean) @ level.vlad_proj.t()
        parts.append((v / v.norm(dim=1, keepdim=True)).numpy())
    close(y, np.concatenate(parts, axis=1) / math.sqrt(3), rtol=1e-4, atol=1e-5)
    info = fitted_mop.to_dict()
    assert info["fit"]["images"] == 12 and [lv["k"] for lv in info["levels"]] == [5, 5]


def test_mop_unfitted_and_fit_errors():
    pl = P.get_pooling("mop:k=3,local=0,dim=0")
    assert pl.needs_fit and not pl.fitted
    with pytest.raises(UsageError, match="must be fitted first"):
        pl(rand_map((1, 4, 7, 7)))
    with pytest.raises(UsageError, match="batches were empty"):
        pl.fit([])
    with pytest.raises(UsageError, match="more than 8 training images"):
        P.get_pooling("mop:k=3,local=0,dim=8").fit([rand_map((4, 4, 7, 7))])
    pl.fit([rand_map((2, 4, 7, 7))])
    with pytest.raises(UsageError, match="fitted on 4-channel maps"):
        pl(rand_map((1, 5, 7, 7)))


def test_mop_fit_is_deterministic_and_saves_self_describing(tmp_path, fitted_mop):
    batches = [rand_map((4, 6, 9, 9), seed=s) for s in range(3)]
    again = P.get_pooling("mop:k=5,local=4,dim=6").fit(batches)
    x = rand_map((2, 6, 12, 10), seed=40)
    close(again(x), fitted_mop(x).numpy(), rtol=1e-6, atol=1e-6)
    path = tmp_path / "mop.npz"
    fitted_mop.save(path, extra={"layer": "bn2"})
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        assert "level2.centers" in z.files and "level3.vlad_proj" in z.files
    assert meta["kind"] == "deepfeat.mop-codebook" and meta["spec"] == fitted_mop.spec
    assert meta["fitted_on"] == 12 and meta["output_dim"] == 18 and meta["extra"] == {"layer": "bn2"}
    assert meta["deepfeat_version"] and meta["saved"]
    loaded = P.load_pooling(path)
    assert loaded.spec == fitted_mop.spec and loaded.fitted and loaded.to_dict()["codebook_path"] == str(path)
    close(loaded(x), fitted_mop(x).numpy(), rtol=0, atol=0)
    np.savez(tmp_path / "other.npz", meta=np.array(json.dumps({"kind": "deepfeat.pca"})))
    with pytest.raises(FormatError, match="expected a deepfeat.mop-codebook"):
        P.load_pooling(tmp_path / "other.npz")


def test_mop_patch_recipe_with_fc_descriptors():
    """The exact MOP-CNN flow: crop the 256 px image into patches, describe each by an
    FC layer, fit one VLAD level per patch size, concatenate with the global vector."""
    torch.manual_seed(0)
    # a stand-in "network": resize to its 16 x 16 input, then a 4x4 grid of colour means -> FC
    fc = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 16),
                             torch.nn.Tanh())
    images = torch.rand(8, 3, 256, 256)

    def net(batch):
        return fc(torch.nn.functional.interpolate(batch, size=(16, 16), mode="bilinear", align_corners=False))

    def patches(img, window):
        boxes = P.mop_patch_grid((256, 256), window, 32)
        return net(torch.stack([img[:, y0:y1, x0:x1] for (y0, x0, y1, x1) in boxes]))

    with torch.no_grad():
        level2 = torch.stack([patches(im, 128) for im in images])  # 8 x 25 x 16
        level3 = torch.stack([patches(im, 64) for im in images])  # 8 x 49 x 16
        glob = net(images)
    assert level2.shape == (8, 25, 16) and level3.shape == (8, 49, 16)
    lv2 = P.VLADLevel.fit([level2], k=4, local_dim=8, dim=5, seed=0)
    lv3 = P.VLADLevel.fit([level3], k=4, local_dim=8, dim=5, seed=1)
    v = P.mop_encode(glob, [level2, level3], [lv2, lv3])
    assert v.shape == (8, 16 + 5 + 5)
    close(v.norm(dim=1), np.ones(8))
    close(v[:, 16:21] * math.sqrt(3), lv2(level2).numpy())


# ---------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------


def test_poolings_export_to_onnx_and_match_onnxruntime(fitted_mop):
    ort = pytest.importorskip("onnxruntime")

    class Head(torch.nn.Module):
        def __init__(self, pooling):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
            self.pool = pooling

        def forward(self, x):
            return self.pool(torch.relu(self.conv(x)))

    torch.manual_seed(0)
    x = torch.randn(2, 3, 19, 23)  # -> 2 x 6 x 9 x 11 maps
    for spec in ("gem:p=3", "rmac:L=3", "rgem:p=2", "crow", "rmac+mac", "spoc:center_prior=1", fitted_mop):
        head = Head(P.get_pooling(spec)).eval()
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(head, (x,), buf, dynamo=False, input_names=["x"], output_names=["y"])
        sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            want = head(x).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=head.pool.spec)


# ---------------------------------------------------------------------------
# A real layer of the embedded model
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_maps(tmp_path_factory):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    import deepfeat
    from deepfeat.data.images import decode_image
    from deepfeat.data.preprocess import SizePolicy
    from deepfeat.models.taps import capture

    model = deepfeat.load_model("efficientnet_lite0")
    path = tmp_path_factory.mktemp("img") / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(path)
    pixels = np.array(decode_image(path, SizePolicy("model"), model.data_config).pixels)
    batch = [pixels, pixels[:, ::-1], np.array(Image.fromarray(skimage_data.astronaut()).resize((224, 224)))]
    x = model.normalize(torch.from_numpy(np.ascontiguousarray(np.stack(batch))))
    return capture(model, x, ["bn2", "global_pool"])


@pytest.mark.parametrize("name", list(P.POOLINGS))
def test_every_pooling_on_a_real_layer(real_maps, name):
    if P.POOLINGS[name].token_fn:
        pytest.skip("cls and reg read a transformer's prefix tokens: tests/test_layouts.py")
    fmap, vec = real_maps["bn2"], real_maps["global_pool"]
    assert fmap.shape == (3, 1280, 7, 7) and vec.shape == (3, 1280)
    pl = P.get_pooling("mop:k=8,local=16,dim=0" if name == "mop" else name)
    if pl.needs_fit:
        pl.fit([fmap[i : i + 1] for i in range(3)])
    y = pl(vec if name == "none" else fmap)
    assert y.shape == (3, pl.output_dim(1280)), name
    assert torch.isfinite(y).all(), name
    if pl.l2_normalized:
        close(y.norm(dim=1), np.ones(3))
    if name in ("sum", "avg", "mac", "gem", "crow", "spoc"):
        assert (y >= 0).all() and (y.norm(dim=1) > 0).all(), name  # ReLU6 output: non-negative


def test_poolings_agree_with_the_network_on_a_real_layer(real_maps):
    fmap, vec = real_maps["bn2"], real_maps["global_pool"]
    # the network's own global pool is average pooling of bn2
    close(P.get_pooling("avg")(fmap), vec.numpy(), rtol=1e-5, atol=1e-5)
    close(P.get_pooling("none")(vec), vec.numpy())
    # a flipped image has (almost) the same orderless descriptors, the other image does not
    for spec in ("mac", "gem", "rmac", "crow"):
        y = P.l2_normalize(P.get_pooling(spec)(fmap))
        sim = y @ y.t()
        assert sim[0, 1] > 0.9 and sim[0, 1] > sim[0, 2], spec
