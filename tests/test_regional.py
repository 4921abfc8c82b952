"""Regional diffusion: regional descriptors cached in the store (``local-features --extractor
regions``) and diffusion on the graph of the database's regions (Iscen et al., CVPR 2017)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from deepfeat.cli import main
from deepfeat.errors import StoreError, UsageError
from deepfeat.evaluate import rank_by_similarity
from deepfeat.localfeat.cache import LocalFeatureCache
from deepfeat.localfeat.features import LocalExtractor, parse_local_spec
from deepfeat.pooling import rmac, rmac_regions
from deepfeat.rerank import (
    Diffusion,
    RegionalDiffusion,
    get_reranker,
    gmp_weights,
    knn_graph,
    seed_vector,
    system_matrix,
)
from deepfeat.search import SearchEngine
from deepfeat.store import FeatureStore

from .local_sections import kill_and_resume
from .test_search import store, views  # noqa: F401  (module fixtures: 5 photos x 4 edited views)

# --------------------------------------------------------------------------- the algorithm, on constructed data


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def _chain_database():
    """Images as sets of regions. The query's object seen from four viewpoints, 25 degrees
    apart: v0 (the query), v1 in image B, v2 in C, v3 in T. T shows the object small among
    grass, which four more images (Z0..Z3) are made of, so T's global vector is grass and its
    image-level neighbours are the Z's. X is one region that is moderately like the query
    (cosine 0.45) and unlike the rest. B and C also hold a region of clutter of their own."""
    e = np.eye(64, dtype=np.float32)
    phi = np.deg2rad(25)
    v = [_unit(np.cos(t * phi) * e[0] + np.sin(t * phi) * e[1]) for t in range(4)]
    free = iter(range(30, 64))

    def clutter():
        return e[next(free)]

    def grass():
        return _unit(e[2] + 0.4 * clutter())

    images = {"B": [v[1], clutter()], "C": [v[2], clutter()], "T": [v[3], grass(), grass()],
              "X": [_unit(0.45 * e[0] + np.sqrt(1 - 0.45 ** 2) * e[20])]}
    for j in range(4):
        images[f"Z{j}"] = [grass(), grass()]
    regions = np.concatenate([np.stack(r) for r in images.values()])
    counts = np.array([len(r) for r in images.values()])
    xb = np.stack([_unit(np.stack(r).sum(0)) for r in images.values()])  # R-MAC-like: the regions summed
    return list(images), regions, counts, xb, v[0][None].copy()


def test_regional_diffusion_follows_a_chain_of_regions_that_image_level_diffusion_misses():
    names, regions, counts, xb, q = _chain_database()
    ranks = rank_by_similarity(q, xb)
    order = [names[i] for i in ranks[0]]
    assert order.index("X") < order.index("T")  # globally, X is nearer
    for k in (2, 3):
        for kq in (1, 3, 8):
            for alpha in (0.9, 0.99):
                I, _ = Diffusion(k=k, kq=kq, alpha=alpha).rerank(q, xb, ranks)
                got = [names[i] for i in I[0]]
                assert got.index("X") < got.index("T"), (k, kq, alpha, got)  # image-level diffusion too
    for k in (2, 3):
        for kq in (1, 3, 8):
            for pool in ("gmp", "sum"):
                r = RegionalDiffusion(k=k, kq=kq, alpha=0.99, pool=pool).attach((regions, counts))
                I, s = r.rerank(q, xb, ranks, query_regions=[q])
                got = [names[i] for i in I[0]]
                # the chain v0 -> v1 (B) -> v2 (C) -> v3 (T): T comes right after B and C, X after it
                assert set(got[:3]) == {"B", "C", "T"} and got.index("T") < got.index("X"), (k, kq, pool, got)
                assert (np.diff(s[0]) <= 0).all()
    st = r.stats
    assert st["regions"] == len(regions) and st["queries"] == 1 and st["rerank"].startswith("regional-diffusion:k=3")


def test_regional_scores_are_the_exact_diffusion_pooled_per_image():
    """Against a dense reference: the truncated system solved exactly, region scores summed per
    image with the GMP weights (a truncated shortlist and the whole database)."""
    rng = np.random.default_rng(0)
    n, d = 30, 16
    counts = rng.integers(1, 6, size=n)
    centres = rng.standard_normal((6, d))
    R = centres[rng.integers(0, 6, counts.sum())] + 0.4 * rng.standard_normal((counts.sum(), d))
    R = (R / np.linalg.norm(R, axis=1, keepdims=True)).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(counts)])
    xb = np.stack([_unit(R[starts[i]:starts[i + 1]].sum(0)) for i in range(n)])
    xq = np.ascontiguousarray(xb[:2] + 0.1, dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    qregions = [R[starts[0]:starts[1]] + 0.05, R[starts[1]:starts[2]]]
    ranks = rank_by_similarity(xq, xb)
    A = knn_graph(R, 8, 3.0)
    w = gmp_weights(R, starts)
    for trunc in (12, n):
        r = RegionalDiffusion(k=8, kq=5, alpha=0.9, trunc=trunc, iters=500).attach((R, counts))
        I, s = r.rerank(xq, xb, np.ascontiguousarray(ranks[:, :trunc]), query_regions=qregions)
        for qi in range(2):
            T = ranks[qi, :trunc]
            sub = np.concatenate([np.arange(starts[t], starts[t + 1]) for t in T])
            y = seed_vector(R[sub] @ np.asarray(qregions[qi], np.float32).T, 5, 3.0)
            f = np.linalg.solve(system_matrix(A[sub][:, sub], 0.9).toarray(), y)
            score = np.bincount(np.repeat(np.arange(len(T)), counts[T]), weights=f * w[sub], minlength=len(T))
            got = dict(zip(I[qi].tolist(), s[qi].tolist()))
            assert np.allclose([got[t] for t in T], score, rtol=1e-4, atol=1e-6), trunc


def test_gmp_weights_and_seed_vector_by_hand():
    e = np.eye(3, dtype=np.float32)
    # one image with regions a, a, b: (V V^T + I) c = 1 gives 1/3, 1/3 (a counted once) and 1/2
    w = gmp_weights(np.stack([e[0], e[0], e[1]]), np.array([0, 3]))
    assert np.allclose(w, [1 / 3, 1 / 3, 1 / 2])
    # 4 regions x 2 query regions: each query region's 2 nearest, summed per region, the 2 largest kept ^2
    S = np.array([[0.9, 0.1], [0.5, 0.6], [0.2, 0.8], [0.4, 0.0]], np.float32)
    # column 0 -> rows 0 (0.9), 1 (0.5); column 1 -> rows 2 (0.8), 1 (0.6); sums: 0.9, 1.1, 0.8
    assert np.allclose(seed_vector(S, 2, 2.0), [0.81, 1.21, 0, 0])
    assert np.allclose(seed_vector(S, 10, 1.0), [1.0, 1.1, 1.0, 0.4])  # kq beyond the regions: all


def test_specs_and_refusals():
    r = get_reranker("Regional_Diffusion:k=30,kq=20,pool=sum,section=reg-1")
    assert isinstance(r, RegionalDiffusion) and r.section == "reg-1"
    assert r.spec == "regional-diffusion:k=30,kq=20,alpha=0.99,gamma=3,trunc=1000,iters=20,pool=sum,section=reg-1"
    assert get_reranker("regional-diffusion").spec.endswith("pool=gmp")  # no section: the store's first
    for bad, msg in [("regional-diffusion:pool=max", "pool must be gmp or sum"),
                     ("regional-diffusion:section=a/b", "section must be a section name"),
                     ("regional-difusion", "Did you mean")]:
        with pytest.raises(UsageError, match=msg):
            get_reranker(bad)
    with pytest.raises(UsageError, match="needs the database's regional descriptors"):
        RegionalDiffusion().rerank(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32), np.array([[0], [1]]))
    names, regions, counts, xb, q = _chain_database()
    r = RegionalDiffusion(k=2).attach((regions, counts[:-1]))
    with pytest.raises(StoreError, match="cover 7 images .* the database has 8"):
        r.rerank(q, xb, rank_by_similarity(q, xb))
    r = RegionalDiffusion(k=2).attach((regions, counts))
    with pytest.raises(UsageError, match="query 0 is neither a stored image nor given with its image"):
        r.rerank(q, xb, rank_by_similarity(q, xb))
    from deepfeat.tune.sweep import parse_reranks

    with pytest.raises(UsageError, match="regional diffusion needs a store's regional descriptors"):
        parse_reranks(["none", "regional-diffusion"])


# --------------------------------------------------------------------------- the regions extractor, on a real photo


def test_regions_extractor_on_a_real_photo(lite0, photos):
    spec = parse_local_spec("regions")
    assert str(spec) == "regions:L=3,pool=mac,size=640" and spec.needs_model and not spec.binary
    with pytest.raises(UsageError, match="L must be an integer from 1 to 8"):
        parse_local_spec("regions:L=0")
    with pytest.raises(UsageError, match="pool must be mac or gem"):
        parse_local_spec("regions:pool=avg")
    ex = LocalExtractor("regions:size=320", lite0)
    assert ex.layer == "bn2"  # the model's descriptor layer
    src = photos["chelsea"]
    w, h = Image.open(src).size
    f = ex.extract(src)
    dec = ex._decode(src)
    with torch.inference_mode():
        a = ex._taps(lite0.normalize(torch.from_numpy(dec.pixels)[None]))["bn2"].float()
    grid = rmac_regions(a.shape[2], a.shape[3], 3)
    assert f.desc.shape == (len(grid), 1280) and f.boxes.shape == (len(grid), 4) and f.image_size == (w, h)
    assert np.allclose(np.linalg.norm(f.desc, axis=1), 1, atol=1e-5)
    # the regions of R-MAC: their sum, normalised, is the R-MAC of the same map
    assert np.allclose(_unit(f.desc.sum(0)), rmac(a)[0].numpy(), atol=1e-5)
    b = f.boxes
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w + 1).all() and (b[:, 3] <= h + 1).all()
    side = min(w, h)  # level 1: squares of the short side (a 2 x 1 grid on a landscape photo)
    assert np.allclose(b[0, 2] - b[0, 0], side, rtol=0.08) and np.allclose(b[0, 3] - b[0, 1], side, rtol=0.08)
    assert np.allclose(f.xy, (b[:, :2] + b[:, 2:]) / 2)
    # a query box keeps the regions at least half inside it
    box = (0, 0, w * 0.6, h)
    sub = f.within(box)
    assert 0 < len(sub) < len(f) and (sub.boxes[:, 0] < box[2]).all()
    # the regions of a box cut out of the image keep the whole image's pixel coordinates
    g = ex.extract(src, crop=(w // 2, h // 4, w, h))
    assert len(g) and (g.boxes[:, 0] >= w // 2 - 1).all() and (g.boxes[:, 1] >= h // 4 - 1).all()
    assert (g.boxes[:, 2] <= w + 1).all() and np.allclose(np.linalg.norm(g.desc, axis=1), 1, atol=1e-5)
    multi = LocalExtractor("regions:size=320,scales=1/0.5,pool=gem", lite0).extract(src)
    assert len(multi) > len(f)  # every scale adds its own grid


# --------------------------------------------------------------------------- the section in the store, resumable


@pytest.mark.slow
def test_regions_section_survives_kill_and_resume_identically(collection, tmp_path):
    n_before, res, got, want = kill_and_resume(collection, tmp_path, "regions:size=256", "regions")
    assert 0 < n_before < 8
    assert res.returncode == 0, res.stderr
    assert f"{8 - n_before} shard(s) done, {n_before} already done" in res.stdout and " regions in " in res.stdout
    assert got == want and len(got) == 8  # the temporary file of the killed shard, if any, is gone too
    st = FeatureStore(tmp_path / "run")  # the resumed store
    meta = st.meta["local_features"]["regions"]
    assert {k: meta[k] for k in ("extractor", "layer", "levels", "pool", "size", "dim", "dtype", "model")} == {
        "extractor": "regions", "layer": "bn2", "levels": 3, "pool": "mac", "size": 256, "dim": 1280,
        "dtype": "float16", "model": "efficientnet_lite0"}
    cache = LocalFeatureCache(st, regions=True)
    desc, counts = cache.all_descriptors()
    assert len(counts) == len(st) == 24 and desc.shape == (counts.sum(), 1280) and (counts >= 3).all()
    one = cache[5]
    assert one.boxes.shape == (counts[5], 4) and np.allclose(one.desc, desc[counts[:5].sum():counts[:6].sum()])
    # regions are not keypoints: verification does not pick them up, and says how to make keypoints
    with pytest.raises(UsageError, match="no cached local features; compute them once"):
        LocalFeatureCache(st)
    with pytest.raises(UsageError, match="local features 'regions' hold regional descriptors, not keypoints"):
        LocalFeatureCache(st, "regions")


# --------------------------------------------------------------------------- engine and CLI, on real photos

REGIONAL = "regional-diffusion:k=40,kq=40"  # a neighbourhood that fits 4 views x ~10 regions per object


def test_clear_error_without_regions(store, views, capsys):
    q = str(views / "coffee" / "mirror.jpg")
    if "regions" in (FeatureStore(store).meta.get("local_features") or {}):
        pytest.skip("the module's store already has regions")
    for argv in (["search", str(store), q, "--rerank", "regional-diffusion"],
                 ["eval", str(store), "--gt", "folders", "--rerank", "regional-diffusion"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"has no regional descriptors; compute them once with `deepfeat local-features {store} " \
               f"--extractor regions`" in err
    eng = SearchEngine(store)
    with pytest.raises(UsageError, match="no regional descriptors"):
        eng.search(eng.xb[:1], k=3, exclude_rows=[0], rerank="regional-diffusion")


@pytest.fixture(scope="module")
def rstore(store):  # noqa: F811
    """The module's store with a regions section (images at 320 pixels)."""
    assert main(["local-features", str(store), "--extractor", "regions:size=320"]) == 0
    return store


def test_engine_search_and_rank_all_with_regional_diffusion(rstore, views, tmp_path):
    eng = SearchEngine(rstore)
    folder = np.array([p.split("/")[-2] for p in eng.paths])
    # a stored query (its cached regions) and an outside photo (its regions computed)
    xq, _, rows = eng.resolve_queries([str(views / "rocket" / "crop.jpg")])
    for kw in ({}, {"qe": 1}, {"dba": 1}):
        hits = eng.search(xq, k=3, exclude_rows=rows, rerank=REGIONAL, **kw)[0]
        assert [h.path.split("/")[-2] for h in hits] == ["rocket"] * 3 and rows[0] not in [h.row for h in hits], kw
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    ext = tmp_path / "outside.jpg"
    Image.open(views / "chelsea" / "crop.jpg").rotate(8).save(ext)
    xe = eng.embed_images([str(ext)])
    qr = eng.query_regions(image=str(ext))
    assert qr.ndim == 2 and qr.shape[1] == 1280 and len(qr) >= 3
    hits = eng.search(xe, k=4, rerank=REGIONAL, query_regions=[qr])[0]
    assert [h.path.split("/")[-2] for h in hits] == ["chelsea"] * 4
    with pytest.raises(UsageError, match="neither a stored image nor given with its image"):
        eng.search(xe, k=4, rerank=REGIONAL)
    # every stored image as a query: each object's four views first
    ranks = eng.rank_all(eng.xb, rerank=REGIONAL, query_rows=list(range(len(eng.xb))))
    assert ranks.shape == (20, 20) and (np.sort(ranks, axis=1) == np.arange(20)).all()
    assert (folder[ranks[:, :4]] == folder[:, None]).mean() == 1.0
    # a stored query with a box: its cached regions inside the box (or, if none, the box's own)
    row = rows[0]
    w, h = Image.open(eng.store.resolve_path(eng.paths[row])).size
    inside = eng.query_regions(row=row, bbox=(0, 0, w * 0.7, h))
    assert 0 < len(inside) < len(eng.query_regions(row=row))
    assert len(eng.query_regions(row=row, bbox=(0, 0, 20, 20))) > 0  # too small for any cached region: cut out
    st = [s for s in eng.rerank_stats() if s["rerank"].startswith("regional")]
    assert st and st[0]["regions"] > 100 and st[0]["ms_per_query"] > 0 and st[0]["offline_seconds"] > 0


def test_cli_search_and_eval_with_regional_diffusion(rstore, views, tmp_path, capsys):
    q = str(tmp_path / "coffee.jpg")  # a photo outside the store: its regions are computed
    Image.open(views / "coffee" / "mirror.jpg").rotate(-6).save(q)
    assert main(["search", str(rstore), q, "--top", "4", "--rerank", REGIONAL, "--json"]) == 0
    cap = capsys.readouterr()
    assert [h["path"].split("/")[-2] for h in json.loads(cap.out)[0]["hits"]] == ["coffee"] * 4
    assert "re-ranking regional-diffusion:k=40,kq=40,alpha=0.99" in cap.err and "ms/query" in cap.err
    assert "query regions:" in cap.err
    eng = SearchEngine(rstore)
    assert main(["search", str(rstore), str(eng.ids[0]), "--top", "3", "--rerank", REGIONAL, "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert eng.paths[0] not in [h["path"] for h in hits]
    assert {h["path"].split("/")[-2] for h in hits} == {eng.paths[0].split("/")[-2]}
    w, h = Image.open(q).size
    assert main(["search", str(rstore), q, "--bbox", f"0,0,{w // 2},{h}", "--top", "2", "--rerank", REGIONAL]) == 0
    assert "/coffee/" in capsys.readouterr().out.splitlines()[1]
    np.save(tmp_path / "q.npy", eng.xb[0])
    assert main(["search", str(rstore), str(tmp_path / "q.npy"), "--rerank", REGIONAL]) == 2
    assert "have no regions" in capsys.readouterr().err
    out = tmp_path / "ev.json"
    assert main(["eval", str(rstore), "--gt", "folders", "--rerank", REGIONAL, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["results"][0]["map"] == pytest.approx(1.0)
    assert res["rerank"]["rerank"] == "regional-diffusion:k=40,kq=40,alpha=0.99,gamma=3,trunc=1000,iters=20,pool=gmp"
    assert res["rerank"]["queries"] == 20 and res["rerank"]["regions"] > 100
    assert "re-ranking regional-diffusion" in capsys.readouterr().out
    # Oxford-style: a query region; its regions are the cached ones inside the box
    gt = tmp_path / "gt"
    gt.mkdir()
    img = Image.open(views / "coffee" / "dark.jpg")
    (gt / "coffee_1_query.txt").write_text(f"oxc1_coffee/dark 10 10 {img.width - 10} {img.height - 10}\n")
    (gt / "coffee_1_good.txt").write_text("coffee/dark\ncoffee/crop\ncoffee/mirror\n")
    (gt / "coffee_1_ok.txt").write_text("coffee/small\n")
    (gt / "coffee_1_junk.txt").write_text("")
    assert main(["eval", str(rstore), "--gt", f"oxford:{gt}", "--rerank", REGIONAL, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["results"][0]["map"] == pytest.approx(1.0) and res["rerank"]["queries"] == 1


def test_serve_regional_diffusion_by_item_and_upload(rstore, views):
    pytest.importorskip("fastapi")
    pytest.importorskip("python_multipart")
    from fastapi.testclient import TestClient

    from deepfeat.serve import create_app

    with TestClient(create_app(rstore)) as client:
        info = client.get("/api/info").json()
        assert "regional-diffusion" in info["search_options"]["rerank_choices"]
        assert "regions" not in info["local_features"]  # not keypoints: no verify switch from it
        eng = SearchEngine(rstore)
        row = next(i for i, p in enumerate(eng.paths) if "/rocket/" in p)
        r = client.get(f"/api/search/item/{int(eng.ids[row])}", params={"k": 3, "rerank": REGIONAL})
        assert r.status_code == 200, r.text
        assert [h["path"].split("/")[-2] for h in r.json()["hits"]] == ["rocket"] * 3
        data = (views / "astronaut" / "crop.jpg").read_bytes()
        r = client.post("/api/search/upload", params={"k": 4, "rerank": REGIONAL},
                        files={"file": ("q.jpg", data, "image/jpeg")})
        assert r.status_code == 200, r.text
        assert [h["path"].split("/")[-2] for h in r.json()["hits"]] == ["astronaut"] * 4
        assert any(c["rerank"].startswith("regional-diffusion") and c["queries"] == 2
                   for c in client.get("/api/info").json()["search_options"]["rerank_cost"])
