"""Index, search, eval and sweep through the library and the CLI, on real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from deepfeat.cli import main
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.search import SearchEngine, build_index
from deepfeat.store import FeatureStore


@pytest.fixture(scope="module")
def views(tmp_path_factory, photos) -> Path:
    """Four views of each sample photo, one folder per photo (relevant = same folder)."""
    root = tmp_path_factory.mktemp("views")
    for name, p in photos.items():
        img = Image.open(p).convert("RGB")
        w, h = img.size
        d = root / name
        d.mkdir()
        img.crop((w // 10, h // 10, w - w // 8, h - h // 12)).save(d / "crop.jpg")
        ImageOps.mirror(img).save(d / "mirror.jpg")
        ImageEnhance.Brightness(img).enhance(0.6).save(d / "dark.jpg")
        img.resize((w // 2, h // 2)).save(d / "small.jpg")
    return root


@pytest.fixture(scope="module")
def store(views, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("st") / "store"
    extract(ExtractConfig(inputs=[str(views)], output=str(out), pooling="gem", post="l2", workers=0,
                          progress="none"))
    return out


def test_search_by_image_id_path_and_vector(store, photos, views, tmp_path):
    eng = SearchEngine(store)
    # an image file (not in the store) finds its own views first
    xq, labels, rows = eng.resolve_queries([photos["coffee"]])
    hits = eng.search(xq, k=4, exclude_rows=rows)[0]
    assert all("/coffee/" in h.path for h in hits) and rows == [None]
    # the same vector as .npy gives the same result
    np.save(tmp_path / "q.npy", xq[0])
    xq2, _, _ = eng.resolve_queries([str(tmp_path / "q.npy")])
    assert [h.path for h in eng.search(xq2, k=4)[0]] == [h.path for h in hits]
    # a stored path, and its id: the query itself is excluded from its results
    p = str(views / "chelsea" / "dark.jpg")
    xq3, _, rows3 = eng.resolve_queries([p])
    hits3 = eng.search(xq3, k=3, exclude_rows=rows3)[0]
    assert p not in [h.path for h in hits3] and all("/chelsea/" in h.path for h in hits3)
    xq4, _, rows4 = eng.resolve_queries([str(eng.ids[rows3[0]])])
    assert rows4 == rows3


def test_query_embedding_matches_the_store(store):
    eng = SearchEngine(store)
    x = eng.embed_images(eng.paths[:3])
    assert np.allclose(x, eng.xb[:3], atol=1e-5)


def test_index_kinds_and_stale_index(store):
    st = FeatureStore(store)
    idx = build_index(st, kind="flat")
    assert (store / "index" / "index.json").is_file() and idx.ntotal == len(st)
    eng = SearchEngine(store)
    assert eng.index is not None
    hnsw_hits = None
    build_index(st, kind="hnsw")
    eng2 = SearchEngine(store)
    xq = eng2.xb[:5]
    hnsw_hits = [[h.row for h in r] for r in eng2.search(xq, k=5)]
    exact = [[h.row for h in r] for r in SearchEngine(store, use_index=False).search(xq, k=5)]
    assert hnsw_hits == exact  # tiny data: HNSW is exact


def test_qe_and_dba_keep_relevant_first(store, views):
    eng = SearchEngine(store)
    p = str(views / "rocket" / "crop.jpg")
    xq, _, rows = eng.resolve_queries([p])
    for kw in ({"qe": 2}, {"qe": 2, "alpha": 3.0}, {"dba": 2}, {"qe": 1, "dba": 1}):
        hits = eng.search(xq, k=3, exclude_rows=rows, **kw)[0]
        assert all("/rocket/" in h.path for h in hits), kw


def test_cli_index_search_grid_eval(store, views, tmp_path, capsys):
    assert main(["index", str(store)]) == 0
    out = capsys.readouterr().out
    assert "auto -> flat" in out and "exact search" in out and "expected memory" in out
    q = str(views / "astronaut" / "mirror.jpg")
    grid = tmp_path / "grid.png"
    assert main(["search", str(store), q, "--top", "3", "--grid", str(grid), "--gt", "folders", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [Path(h["path"]).parent.name for h in doc[0]["hits"]] == ["astronaut"] * 3
    im = Image.open(grid)
    assert im.width > 400 and len(np.unique(np.asarray(im.convert("L")))) > 50
    # the relevant results are framed green
    px = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert ((px == [40, 170, 60]).all(axis=1)).sum() > 1000
    out = tmp_path / "eval.json"
    assert main(["eval", str(store), "--gt", "folders", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["results"][0]
    assert res["map"] > 0.9 and len(res["queries"]) == 20
    assert main(["eval", str(store), "--gt", "folders", "--qe", "1", "--dba", "1"]) == 0
    assert "mAP" in capsys.readouterr().out
    assert main(["search", str(store), "nope.jpg"]) == 2


def test_oxford_style_eval_with_query_regions(store, views, tmp_path):
    """An Oxford-format ground truth with a query region, evaluated end to end."""
    gt = tmp_path / "gt"
    gt.mkdir()
    img = Image.open(views / "coffee" / "dark.jpg")
    (gt / "coffee_1_query.txt").write_text(f"oxc1_coffee/dark 10 10 {img.width - 10} {img.height - 10}\n")
    (gt / "coffee_1_good.txt").write_text("coffee/dark\ncoffee/crop\ncoffee/mirror\n")  # the query is good, as in Oxford
    (gt / "coffee_1_ok.txt").write_text("coffee/small\n")
    (gt / "coffee_1_junk.txt").write_text("")
    st = FeatureStore(store)
    coffee = [p for p in st.paths if "/coffee/" in p]
    lst = tmp_path / "db.txt"
    lst.write_text("\n".join(coffee + [p for p in st.paths if "/rocket/" in p]) + "\n")
    out = tmp_path / "ox"
    extract(ExtractConfig(inputs=[f"@{lst}"], output=str(out), pooling="gem", workers=0, progress="none"))
    res_file = tmp_path / "res.json"
    assert main(["eval", str(out), "--gt", f"oxford:{gt}", "--json", str(res_file)]) == 0
    res = json.loads(res_file.read_text())["results"][0]
    assert res["map"] == pytest.approx(1.0)


def test_sweep_table(views, tmp_path, capsys):
    from deepfeat.postprocess import PostChain

    out = tmp_path / "sw"
    saved = tmp_path / "fitted.npz"  # a chain fitted elsewhere, on 1280-D vectors: applies to bn2 only
    PostChain("l2,pca:4").fit(np.random.default_rng(0).normal(size=(50, 1280))).save(saved)
    rc = main(["sweep", str(views), "--gt", "folders", "--layers", "blocks.5,bn2", "--pools", "gem,mac,crow",
               "--post", f"none;l2;pca:8,l2;pca:4096;{saved}", "--out", str(out), "--workers", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert f"| layer | pooling | none | l2 | pca:8,l2 | pca:4096 | {saved} |" in text
    assert "| blocks.5 | crow:a=2,b=2 |" in text and "**" in text and "n/a" in text  # 4096 > dims: n/a
    rows = (out / "sweep_folders.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3 * 5 and sum(r.endswith(",1") for r in rows) == 1
    doc = json.loads((out / "sweep_folders.json").read_text())
    by_file = {(c["layer"], c["pooling"]): c for c in doc["cells"] if c["post"] == str(saved)}
    assert by_file[("bn2", "gem:p=3")]["dim"] == 4 and by_file[("blocks.5", "gem:p=3")]["map"] is None
    best = doc["best"]
    cell = next(c for c in doc["cells"] if [c["layer"], c["pooling"], c["post"]] == best)
    assert cell["map"] == max(c["map"] for c in doc["cells"] if c["map"] is not None)
