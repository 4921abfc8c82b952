"""Re-ranking: diffusion follows a manifold, k-reciprocal matches the paper's definitions, specs parse."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepfeat.errors import UsageError
from deepfeat.rerank import (
    RERANKERS,
    Diffusion,
    KReciprocal,
    complete_ranking,
    get_reranker,
    k_reciprocal_distances,
    knn_graph,
    parse_rerank_spec,
    rerank_ranks,
)


def _two_moons_on_sphere(n_per: int = 150, noise: float = 0.03, seed: int = 0):
    """Two interleaved half circles (the classic 'two moons'), lifted onto the unit sphere
    as normalise(x, y, 1), so that inner products are cosine similarities that fall with
    the planar distance: the moons' tips lie closer to the *other* moon than to their own far end."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, math.pi, n_per)
    a = np.stack([np.cos(t), np.sin(t)], 1)
    b = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
    xy = np.concatenate([a, b]) + rng.normal(scale=noise, size=(2 * n_per, 2))
    X = np.concatenate([xy * 0.8, np.ones((2 * n_per, 1))], axis=1)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    labels = np.repeat([0, 1], n_per)
    return np.ascontiguousarray(X, dtype=np.float32), labels


@pytest.mark.parametrize("name", sorted(RERANKERS))
def test_every_reranker_gives_full_rankings_from_its_spec(name):
    """Each registry entry, at its defaults: parsed from its name, its spec parses back to itself,
    and it turns a global ranking into a complete one whose head stays on the query's own moon."""
    if name == "regional-diffusion":
        pytest.skip("needs a store's regional descriptors: tests/test_regional.py")
    X, labels = _two_moons_on_sphere()
    rows = [40, 75, 225]  # the middle of the moons, away from the tips that face the other moon
    xq = np.ascontiguousarray(X[rows])
    ranks = np.argsort(-(xq @ X.T), axis=1, kind="stable")
    reranker = get_reranker(name)
    assert get_reranker(reranker.spec).spec == reranker.spec
    out = rerank_ranks(reranker, xq, X, ranks, query_rows=rows)
    assert out.shape == ranks.shape and (np.sort(out, axis=1) == np.arange(len(X))).all()
    assert all((labels[o[:10]] == labels[r]).all() for o, r in zip(out, rows))


def test_diffusion_ranks_along_the_manifold_where_knn_does_not():
    X, labels = _two_moons_on_sphere()
    n = len(X)
    # queries: points near the tip of moon A that faces moon B (t ~ 0: (1, 0), inside B's arc)
    queries = [0, 3, 6, 9]
    xq = np.ascontiguousarray(X[queries])
    order = np.argsort(-(xq @ X.T), axis=1, kind="stable")
    k = 100  # two thirds of a moon
    knn_prec = np.mean([(labels[o[:k]] == 0).mean() for o in order])
    diff = Diffusion(k=10, kq=10, alpha=0.99, gamma=3, trunc=n, iters=100)
    I, scores = diff.rerank(xq, X, order, query_rows=queries)  # shortlist = everything: one LU solve
    assert I.shape == (len(queries), n) and (np.sort(I, axis=1) == np.arange(n)).all()
    assert (np.diff(scores, axis=1) <= 1e-12).all()  # best first
    diff_prec = np.mean([(labels[o[:k]] == 0).mean() for o in I])
    assert knn_prec < 0.75, knn_prec  # plain kNN mixes the two moons in its top 100
    assert diff_prec > 0.95, diff_prec  # diffusion stays on the query's own moon
    assert diff_prec - knn_prec > 0.25
    # a truncated shortlist (the per-query conjugate-gradient path): within the top 200 of the
    # global ranking, the query's own moon comes first (R-precision), where kNN interleaves the two
    I2, _ = diff.rerank(xq, X, np.ascontiguousarray(order[:, :200]))
    own = [int((labels[o[:200]] == 0).sum()) for o in order]
    assert np.mean([(labels[o[:m]] == 0).mean() for o, m in zip(I2, own)]) > 0.95
    assert np.mean([(labels[o[:m]] == 0).mean() for o, m in zip(order, own)]) < 0.7
    st = diff.stats
    assert st["queries"] == 8 and st["offline_seconds"] > 0 and st["ms_per_query"] > 0
    assert st["rerank"] == "diffusion:k=10,kq=10,alpha=0.99,gamma=3,trunc=300,iters=100"


def test_knn_graph_is_mutual_symmetric_and_uses_the_index():
    from deepfeat.index import Index

    X, _ = _two_moons_on_sphere(40)
    A = knn_graph(X, 5, 3.0)
    assert (A != A.T).nnz == 0 and A.diagonal().sum() == 0
    assert (np.diff(A.indptr) <= 5).all()  # mutual: at most k edges per node
    i, j = A.nonzero()
    assert np.allclose(A[i, j].A1, np.maximum(np.einsum("ij,ij->i", X[i], X[j]), 0) ** 3, rtol=1e-5)
    idx = Index.build(X, kind="flat", ids=np.arange(len(X)))
    B = knn_graph(X, 5, 3.0, index=idx)
    assert abs(A - B).max() < 1e-6
    hnsw = Index.build(X, kind="hnsw", ids=np.arange(len(X)))  # approximate: similarities recomputed
    assert abs(A - knn_graph(X, 5, 3.0, index=hnsw)).max() < 1e-5


def _kreciprocal_by_hand(P: np.ndarray, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al. CVPR 2017 written out literally, one definition at a time, with plain loops."""
    M = len(P)
    d = [[float(((P[i] - P[j]) ** 2).sum()) for j in range(M)] for i in range(M)]  # squared Euclidean
    d = [[d[i][j] / max(d[i]) for j in range(M)] for i in range(M)]  # each row over its maximum

    def N(p, k):  # k-nearest neighbours of p, p itself first (k + 1 points)
        return sorted(range(M), key=lambda j: (d[p][j], j != p, j))[: k + 1]

    def R(p, k):  # eq. (2): k-reciprocal nearest neighbours
        return {g for g in N(p, k) if p in N(g, k)}

    Vs = []
    for p in range(M):
        Rstar = set(R(p, k1))  # eq. (7): add R(q, k/2) of candidates q that share >= 2/3 of it
        for q in R(p, k1):
            h = R(q, round(k1 / 2))
            if len(h & R(p, k1)) >= 2 / 3 * len(h):
                Rstar |= h
        w = {g: math.exp(-d[p][g]) for g in Rstar}  # eq. (8): Gaussian kernel
        Vs.append([w.get(g, 0.0) / sum(w.values()) for g in range(M)])
    Vq = [[sum(Vs[j][g] for j in N(p, k2 - 1)) / k2 for g in range(M)] for p in range(M)]  # eq. (11): local QE
    out = np.zeros((M, M))
    for p in range(M):
        for g in range(M):
            dj = 1 - sum(min(Vq[p][j], Vq[g][j]) for j in range(M)) / sum(max(Vq[p][j], Vq[g][j]) for j in range(M))
            out[p, g] = (1 - lam) * dj + lam * d[p][g]  # eq. (12)
    return out


def test_kreciprocal_matches_the_hand_computed_case():
    # two tight pairs and a loner, in the plane
    P = np.array([[0.0, 0.0], [0.3, 0.1], [3.0, 0.0], [3.2, 0.4], [1.4, 2.5], [2.0, 2.3]], dtype=np.float32)
    d = ((P[:, None] - P[None]) ** 2).sum(-1)
    assert all(len(set(np.round(r, 4))) == len(P) for r in d)  # no ties: the neighbour order is unambiguous
    # a fact one can check on paper: with k1 = 2, 0 and 1 are each other's nearest, so both are reciprocal
    got = k_reciprocal_distances(P, list(range(len(P))), k1=2, k2=2, lam=0.3)
    want = _kreciprocal_by_hand(P.astype(np.float64), 2, 2, 0.3)
    assert np.allclose(got, want, atol=1e-6)
    # and with a larger neighbourhood, the expansion (k1/2 = 2) comes into play; k2 = 1: no local QE
    got = k_reciprocal_distances(P, [0, 4], k1=4, k2=1, lam=0.1)
    want = _kreciprocal_by_hand(P.astype(np.float64), 4, 1, 0.1)[[0, 4]]
    assert np.allclose(got, want, atol=1e-6)
    assert got[0, 0] == pytest.approx(0.0) and got[0, 1] < got[0, 2]


def test_kreciprocal_reranker_stored_and_external_queries_agree():
    X, labels = _two_moons_on_sphere(30)
    n = len(X)
    order = np.argsort(-(X[:3] @ X.T), axis=1)
    kr = KReciprocal(k1=8, k2=3, lam=0.3)
    I, s = kr.rerank(np.ascontiguousarray(X[:3]), X, order, query_rows=[0, 1, 2])
    assert I.shape == (3, n) and (I[:, 0] == [0, 1, 2]).all()  # a stored query is its own best match
    assert (np.diff(s, axis=1) <= 1e-7).all()
    # the shortlist mode (database larger than trunc) re-ranks the top trunc, the rest follow in global order
    small = KReciprocal(k1=8, k2=3, lam=0.3, trunc=20)
    assert small.shortlist(n) == 20 and kr.shortlist(n) == n
    I2, _ = small.rerank(np.ascontiguousarray(X[:3]), X, order[:, :20], query_rows=[0, 1, 2])
    full = complete_ranking(I2, order)
    assert (np.sort(full, axis=1) == np.arange(n)).all()
    assert set(full[0, :20]) == set(order[0, :20]) and (full[0, 20:] == order[0, 20:]).all()
    assert small.stats["ms_per_query"] > 0


def test_specs_parse_and_bad_specs_are_refused():
    kind, p = parse_rerank_spec("diffusion")
    assert kind.name == "diffusion" and p == {"k": 50, "kq": 10, "alpha": 0.9, "gamma": 3.0, "trunc": 1000,
                                              "iters": 20}
    d = get_reranker("diffusion:k=30,alpha=0.9,gamma=2,trunc=500")
    assert isinstance(d, Diffusion) and (d.k, d.alpha, d.gamma, d.trunc) == (30, 0.9, 2.0, 500)
    kr = get_reranker("kreciprocal:k1=10,k2=3,lambda=0.2")
    assert isinstance(kr, KReciprocal) and (kr.k1, kr.k2, kr.lam) == (10, 3, 0.2)
    assert get_reranker("k-reciprocal").spec == "kreciprocal:k1=20,k2=6,lambda=0.3,trunc=2000"
    for bad, msg in [("difusion", "valid: diffusion, kreciprocal"), ("diffusion:k=0", "k must be an integer >= 1"),
                     ("diffusion:alpha=1", "alpha must be a number in (0, 1)"), ("diffusion:k=2.5", "integer"),
                     ("kreciprocal:lambda=2", "lambda must be"), ("kreciprocal:k3=1", "no parameter 'k3'"),
                     ("diffusion:50", "name=value"), ("", "empty"), ("diffusion:k=nan", "integer")]:
        with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            get_reranker(bad)


# --------------------------------------------------------------------------- engine and CLI, on real photos

from .test_search import store, views  # noqa: E402,F401  (module fixtures: 5 photos x 4 edited views)

SMALL = ["diffusion:k=3,kq=3", "kreciprocal:k1=3,k2=2"]  # neighbourhoods that fit 4 views per object


@pytest.mark.parametrize("spec", SMALL)
def test_engine_search_and_rank_all_with_rerank(store, views, spec):
    from deepfeat.search import SearchEngine

    eng = SearchEngine(store)
    # a stored query and an outside image (a query that is not in the store)
    xq, _, rows = eng.resolve_queries([str(views / "rocket" / "crop.jpg")])
    for kw in ({}, {"qe": 1}, {"dba": 1}):
        hits = eng.search(xq, k=3, exclude_rows=rows, rerank=spec, **kw)[0]
        assert [h.path.split("/")[-2] for h in hits] == ["rocket"] * 3, kw
        assert rows[0] not in [h.row for h in hits]
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    ranks = eng.rank_all(eng.xb, rerank=spec, query_rows=list(range(len(eng.xb))))
    assert ranks.shape == (20, 20) and (np.sort(ranks, axis=1) == np.arange(20)).all()
    folder = np.array([p.split("/")[-2] for p in eng.paths])
    top4 = folder[ranks[:, :4]]
    assert (top4 == folder[:, None]).mean() == 1.0  # every object's four views first
    st = eng.rerank_stats()
    assert st and st[0]["rerank"].startswith(spec.split(":")[0]) and st[0]["ms_per_query"] > 0


def test_cli_search_and_eval_rerank(store, views, tmp_path, capsys):
    from deepfeat.cli import main

    q = str(views / "coffee" / "mirror.jpg")
    assert main(["search", str(store), q, "--top", "3", "--rerank", SMALL[0], "--json"]) == 0
    cap = capsys.readouterr()
    import json

    doc = json.loads(cap.out)
    assert [h["path"].split("/")[-2] for h in doc[0]["hits"]] == ["coffee"] * 3
    assert "re-ranking diffusion:k=3,kq=3,alpha=0.9" in cap.err and "ms/query" in cap.err
    out = tmp_path / "ev.json"
    assert main(["eval", str(store), "--gt", "folders", "--rerank", SMALL[1], "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["results"][0]["map"] == pytest.approx(1.0)
    assert res["rerank"]["rerank"] == "kreciprocal:k1=3,k2=2,lambda=0.3,trunc=2000" and res["rerank"]["queries"] == 20
    assert "re-ranking kreciprocal" in capsys.readouterr().out
    # bad specs: exit 2 with the valid choices, before any work
    assert main(["search", str(store), q, "--rerank", "difusion"]) == 2
    assert "valid: diffusion, kreciprocal" in capsys.readouterr().err
    assert main(["eval", str(store), "--gt", "folders", "--rerank", "kreciprocal:k1=0"]) == 2
    assert "k1 must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("spec", SMALL)
def test_oxford_eval_with_rerank(store, views, tmp_path, spec):
    """Oxford-format ground truth (a cropped query region, good/ok/junk) with re-ranking, end to end."""
    import json

    from PIL import Image

    from deepfeat.cli import main
    from deepfeat.pipeline import ExtractConfig, extract
    from deepfeat.store import FeatureStore

    gt = tmp_path / "gt"
    gt.mkdir()
    for obj in ("coffee", "rocket"):
        img = Image.open(views / obj / "dark.jpg")
        (gt / f"{obj}_1_query.txt").write_text(f"oxc1_{obj}/dark 10 10 {img.width - 10} {img.height - 10}\n")
        (gt / f"{obj}_1_good.txt").write_text(f"{obj}/dark\n{obj}/crop\n{obj}/mirror\n")
        (gt / f"{obj}_1_ok.txt").write_text(f"{obj}/small\n")
        (gt / f"{obj}_1_junk.txt").write_text("")
    st = FeatureStore(store)
    lst = tmp_path / "db.txt"
    lst.write_text("\n".join(p for p in st.paths) + "\n")  # 20 images: the two objects and three distractors
    out = tmp_path / "ox"
    extract(ExtractConfig(inputs=[f"@{lst}"], output=str(out), pooling="gem", workers=0, progress="none"))
    res_file = tmp_path / "res.json"
    assert main(["eval", str(out), "--gt", f"oxford:{gt}", "--rerank", spec, "--json", str(res_file)]) == 0
    res = json.loads(res_file.read_text())
    assert res["results"][0]["map"] == pytest.approx(1.0) and len(res["results"][0]["queries"]) == 2
    assert res["rerank"]["queries"] == 2


def test_serve_rerank_api_page_and_recipe(store, views, tmp_path, monkeypatch):
    """serve: a server-wide default re-ranking, a per-request choice (or none), 422 on a bad spec,
    the page's selector, and `serve --recipe` taking the recipe's search options."""
    pytest.importorskip("fastapi")
    pytest.importorskip("python_multipart")
    import json

    from fastapi.testclient import TestClient

    from deepfeat.serve import create_app
    from deepfeat.serve.routes import STATIC_DIR

    with TestClient(create_app(store, rerank=SMALL[0], image_root="/")) as client:
        info = client.get("/api/info").json()["search_options"]
        assert info["rerank"] == "diffusion:k=3,kq=3,alpha=0.9,gamma=3,trunc=1000,iters=20"
        assert info["rerank_choices"] == ["none", "diffusion", "kreciprocal"]
        assert info["rerank_cost"][0]["offline_seconds"] > 0  # the graph was built at start-up
        eng = client.app.state.service.engine
        row = eng.paths.index(str(views / "rocket" / "crop.jpg"))
        item = int(eng.ids[row])
        for rr, applied in [(None, info["rerank"]), ("none", None), (SMALL[1], "kreciprocal:k1=3,k2=2,lambda=0.3,"
                                                                                "trunc=2000")]:
            params = {"k": 3} if rr is None else {"k": 3, "rerank": rr}
            body = client.get(f"/api/search/item/{item}", params=params).json()
            assert body["rerank"] == applied
            assert [h["path"].split("/")[-2] for h in body["hits"]] == ["rocket"] * 3
        r = client.get(f"/api/search/item/{item}", params={"rerank": "difusion"})
        assert r.status_code == 422 and "valid: diffusion, kreciprocal" in r.json()["error"]
        vec = eng.xb[row].tolist()
        body = client.post("/api/search/vector", json={"vector": vec, "k": 2, "rerank": "kreciprocal:k1=3"}).json()
        assert body["rerank"].startswith("kreciprocal:k1=3") and len(body["hits"]) == 2
    page = (STATIC_DIR / "index.html").read_text() + (STATIC_DIR / "app.js").read_text()
    assert 'id="rerank-input"' in page and "&rerank=" in page and "rerank_choices" in page
    # serve --recipe: the recipe's re-ranking and expansion become the server's defaults
    import uvicorn

    from deepfeat import cli

    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"kind": "deepfeat-recipe", "version": 1,
                                  "extract": {"model": "efficientnet_lite0", "layer": "bn2", "pooling": "gem:p=3",
                                              "scales": [1.0], "size": "model", "post": "l2"},
                                  "search": {"qe": 1, "alpha": 0.0, "dba": 0, "rerank": SMALL[1]}}))
    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.append(self.config))
    assert cli.main(["serve", str(store), "--recipe", str(recipe)]) == 0
    cfg = seen[-1].app.state.service.cfg
    assert (cfg.qe, cfg.dba, cfg.rerank) == (1, 0, "kreciprocal:k1=3,k2=2,lambda=0.3,trunc=2000")
    assert cli.main(["serve", str(store), "--recipe", str(recipe), "--rerank", "none"]) == 0
    assert seen[-1].app.state.service.cfg.rerank is None


def test_sweep_rerank_columns(views, tmp_path, capsys):
    import json

    from deepfeat.cli import main

    out = tmp_path / "sw"
    assert main(["sweep", str(views), "--gt", "folders", "--layers", "bn2", "--pools", "gem", "--post", "none;l2",
                 "--rerank", f"none,{SMALL[0]},{SMALL[1]}", "--out", str(out), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert (f"| layer | pooling | none | none + {SMALL[0]} | none + {SMALL[1]} | l2 | l2 + {SMALL[0]} | "
            f"l2 + {SMALL[1]} |") in text
    doc = json.loads((out / "sweep_folders.json").read_text())
    cells = {c["post"]: c for c in doc["cells"]}
    assert doc["reranks"] == ["none", *SMALL] and len(cells) == 6
    rr = cells[f"l2 + {SMALL[1]}"]
    assert rr["chain"] == "l2" and rr["rerank_spec"].startswith("kreciprocal:k1=3,k2=2") and rr["rerank_ms"] > 0
    assert rr["map"] == pytest.approx(1.0) and cells["l2"]["map"] == pytest.approx(1.0)
    rows = (out / "sweep_folders.csv").read_text().splitlines()
    assert rows[0].split(",")[4] == "rerank" and len(rows) == 7
    assert main(["sweep", str(views), "--gt", "folders", "--rerank", "none,bogus", "--out", str(out)]) == 2
