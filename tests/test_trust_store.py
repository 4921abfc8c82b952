"""Issue 26, section 1: nothing that deepfeat did not write as it is answers a query.

Every file of a real store (real photos, the real embedded model, a fitted PCA, a saved
index) is edited at the same size, and each time the store either refuses, naming the
file, or answers exactly as before; ``info --verify`` reports every one. Then each case
of the issue: an index copied from another store, a lost commit marker, an edited or
future meta, a NaN row (search, export, and serve in a real process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from deepfeat import cli
from deepfeat.errors import StoreError
from deepfeat.search import SearchEngine
from deepfeat.store import FeatureStore
from deepfeat.store.checksums import SHARD_KEY, file_digest, meta_digest, sample_digest
from deepfeat.store.lock import LOCK_NAME

SRC = Path(__file__).resolve().parents[1] / "src"


# a store of 24 real photos in 3 shards, PCA-whitened (post.npz), with a saved flat index; a fresh copy per test
from .test_store_integrity import pristine, store  # noqa: E402,F401  (module fixtures)


def _answers(path: Path) -> list[list[tuple[int, str, float]]]:
    engine = SearchEngine(path)
    assert engine.index is not None  # the saved index answers, not a fallback
    xq = engine.xb[[0, 9, 17]]
    return [[(h.id, h.path, round(h.score, 5)) for h in hits] for hits in engine.search(xq, k=5)]


def _verify(path: Path, capsys) -> tuple[int, dict]:
    rc = cli.main(["info", str(path), "--verify", "--json"])
    return rc, json.loads(capsys.readouterr().out)


def _bad(report: dict) -> dict[str, str]:
    return {c["file"]: c["detail"] for c in report["checks"] if c["status"] == "bad"}


def _edit_same_size(f: Path) -> None:
    """Change *f* without changing its size: a JSON file stays valid JSON (a digit of a date),
    any other file gets one bit flipped in its middle."""
    data = bytearray(f.read_bytes())
    if f.suffix == ".json":
        text = data.decode()
        key = '"created"' if '"created"' in text else '"saved_at"'
        i = text.index(key) + len(key) + 3  # the first digit of the year
        data[i: i + 1] = b"1" if text[i] != "1" else b"2"
    else:
        data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def _store_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != LOCK_NAME)


def test_every_file_of_a_store_is_covered_by_verify(pristine, capsys):
    rc, report = _verify(pristine, capsys)
    assert rc == 0 and report["counts"]["bad"] == report["counts"]["unchecked"] == 0
    assert {c["file"] for c in report["checks"]} == set(_store_files(pristine))


@pytest.mark.parametrize("rel", [
    "meta.json", "plan.parquet", "items.parquet", "post.npz", "index/index.faiss", "index/index.json",
    "shards/000000.bn2.npy", "shards/000001.items.parquet", "shards/000002.bn2.npy",
])
def test_a_file_edited_at_the_same_size_is_refused_or_not_used(pristine, store, rel, capsys):
    """The general promise, file kind by file kind: refused naming the file, or the same answers."""
    assert rel in _store_files(store)
    before = _answers(pristine)
    f = store / rel
    size = f.stat().st_size
    _edit_same_size(f)
    assert f.stat().st_size == size
    try:
        after = _answers(store)
    except StoreError as e:
        assert Path(rel).name in str(e)
        # every command says it in one line, with the exit code of a bad file
        assert cli.main(["search", str(store), "0", "--top", "3"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("deepfeat search: error: ") and Path(rel).name in err and "Traceback" not in err
    else:
        assert rel in ("plan.parquet", "items.parquet", "shards/000001.items.parquet")  # not what answers
        assert after == before
    rc, report = _verify(store, capsys)
    assert rc == 1 and list(_bad(report)) == [rel]


def test_sampled_digest_sees_a_same_size_swap_and_full_sha256_sees_one_bit(tmp_path):
    """The open-time check reads 64 KiB at any size; a bit between its blocks is verify's job."""
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    rng = np.random.default_rng(0)
    np.save(a, rng.standard_normal((4096, 128), dtype=np.float32))  # 2 MiB
    np.save(b, rng.standard_normal((4096, 128), dtype=np.float32))
    assert a.stat().st_size == b.stat().st_size and sample_digest(a) != sample_digest(b)
    rec = file_digest(a)
    data = bytearray(a.read_bytes())
    data[len(data) // 2 + 2048 + 7] ^= 1  # between two sampled blocks
    a.write_bytes(bytes(data))
    assert sample_digest(a) == rec["sample"] and file_digest(a)["sha256"] != rec["sha256"]


def _swap_index(store: Path) -> None:
    """Put another store's index file (same count and dims, so the same size) in *store*'s place."""
    from deepfeat.index import Index

    meta = json.loads((store / "index/index.json").read_text())
    x = np.random.default_rng(1).standard_normal((meta["ntotal"], meta["d"]), dtype=np.float32)
    Index.build(x, kind="flat", metric="ip", ids=np.arange(len(x), dtype=np.int64)).save(store.parent / "other")
    os.replace(store.parent / "other/index.faiss", store / "other.faiss")
    assert (store / "other.faiss").stat().st_size == (store / "index/index.faiss").stat().st_size
    os.replace(store / "other.faiss", store / "index/index.faiss")


def test_an_index_file_copied_from_another_store_of_the_same_size_is_refused(store, capsys):
    _swap_index(store)
    with pytest.raises(StoreError, match=r"index\.faiss is not the index its meta .* was written with .* rebuild"):
        SearchEngine(store)
    assert cli.main(["search", str(store), "0"]) == 1
    assert "rebuild the index" in capsys.readouterr().err
    rc, report = _verify(store, capsys)
    assert rc == 1 and list(_bad(report)) == ["index/index.faiss"]
    assert cli.main(["index", str(store), "--kind", "flat"]) == 0  # the repair it names
    capsys.readouterr()
    assert len(SearchEngine(store).search(SearchEngine(store).xb[:1], k=3)[0]) == 3


def test_an_index_built_from_other_vectors_is_not_used(store, caplog):
    """The index records the store's fingerprint; one built from other vectors is stale (exact search)."""
    im = json.loads((store / "index/index.json").read_text())
    im["source_meta"]["store_fingerprint"] = "0" * 64
    im["meta_sha256"] = meta_digest(im)  # as if deepfeat had built it so
    (store / "index/index.json").write_text(json.dumps(im))
    assert SearchEngine(store).index is None
    assert "store_fingerprint" in caplog.text and "deepfeat index" in caplog.text


def test_a_lost_commit_marker_is_refused_by_every_reader_and_resume_repairs_it(pristine, store, capsys):
    before = _answers(pristine)
    (store / "shards/000001.items.parquet").unlink()
    with pytest.raises(StoreError, match=r"000001\.items\.parquet is missing: it is the commit marker of shard 1"):
        FeatureStore(store).vectors()
    for argv in (["search", str(store), "0"], ["export", str(store), "-o", str(store.parent / "x.npz")],
                 ["eval", str(store), "--gt", "folders"]):
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "commit marker of shard 1" in err and "extract --resume" in err, err
    assert not (store.parent / "x.npz").exists()
    rc, report = _verify(store, capsys)
    bad = _bad(report)
    assert rc == 1 and "shards/000001.items.parquet" in bad and "items.parquet" in bad
    assert "reads the shards instead" not in json.dumps(report)  # no longer claimed: it was false
    assert cli.main(["extract", "--resume", "-o", str(store), "--workers", "0", "--progress", "none"]) == 0
    capsys.readouterr()
    assert _answers(store) == before
    rc, report = _verify(store, capsys)
    assert rc == 0, _bad(report)


def _rewrite_meta(store: Path, **changes) -> None:
    meta = json.loads((store / "meta.json").read_text())
    meta.update(changes)
    meta["meta_sha256"] = meta_digest(meta)
    (store / "meta.json").write_text(json.dumps(meta))


def test_an_edited_meta_is_refused_and_verify_names_it(store, capsys):
    meta = json.loads((store / "meta.json").read_text())
    text = (store / "meta.json").read_text().replace(f'"pooling": "{meta["pooling"]}"', '"pooling": "mac"')
    assert text != (store / "meta.json").read_text()
    (store / "meta.json").write_text(text)
    with pytest.raises(StoreError, match=r"meta\.json was edited after deepfeat wrote it"):
        FeatureStore(store)
    assert cli.main(["search", str(store), "0"]) == 1
    assert "meta.json was edited" in capsys.readouterr().err
    rc, report = _verify(store, capsys)
    assert rc == 1 and list(_bad(report)) == ["meta.json"]


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "holds a JSON list, not an object"),
    ("null", "holds a JSON NoneType, not an object"),
    ('{"format": "deepfeat-store", "format_version": 99}', "store format version 99; .* upgrade deepfeat"),
    (None, "feature 'bn2' has dim 'wide', not a positive whole number"),
])
def test_a_damaged_or_future_meta_is_one_line_in_every_command(store, capsys, content, message):
    if content is None:
        meta = json.loads((store / "meta.json").read_text())
        _rewrite_meta(store, features={"bn2": {**meta["features"]["bn2"], "dim": "wide"}})
    else:
        (store / "meta.json").write_text(content)
    with pytest.raises(StoreError, match=message):
        FeatureStore(store)
    for argv in (["info", str(store), "--verify"], ["info", str(store)], ["search", str(store), "0"],
                 ["export", str(store), "-o", str(store.parent / "x.npz")]):
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err, err


def _nan_in_shard(store: Path, shard: int, row: int) -> str:
    """Put NaN in a row of a shard and re-record its checksums, as if deepfeat had written it: the
    read-time finiteness check, not the digest, must catch it. Returns the row's image path."""
    f = store / f"shards/{shard:06d}.bn2.npy"
    x = np.load(f)
    x[row, 3] = np.nan
    np.save(f, x)
    rec = file_digest(f)
    marker = store / f"shards/{shard:06d}.items.parquet"
    t = pq.read_table(marker)
    pq.write_table(t.replace_schema_metadata({SHARD_KEY: json.dumps({f.name: rec})}), marker)
    meta = json.loads((store / "meta.json").read_text())
    files = meta["checksums"]["files"]
    files[f"shards/{f.name}"], files[f"shards/{marker.name}"] = rec, file_digest(marker)
    _rewrite_meta(store, checksums=meta["checksums"])
    ok = [p for p, s in zip(t.column("path").to_pylist(), t.column("status").to_pylist()) if s == "ok"]
    return ok[row]


def test_a_nan_row_is_named_with_its_file_image_and_repair(store, capsys):
    path = _nan_in_shard(store, 0, 5)
    with pytest.raises(StoreError, match=rf"000000\.bn2\.npy row 5 \({path}\) holds NaN or infinity"):
        FeatureStore(store).vectors()
    for argv in (["search", str(store), "0"], ["export", str(store), "-o", str(store.parent / "x.npz")]):
        assert cli.main(argv) == 1, argv
        err = capsys.readouterr().err
        assert "row 5" in err and "extract --resume" in err and err.count("\n") == 1, err
    assert not (store.parent / "x.npz").exists()  # export wrote nothing


@pytest.mark.parametrize("damage, expect", [
    ("nan", "row 2"),
    ("index", "rebuild the index"),
    ("marker", "commit marker of shard 1"),
])
def test_serve_refuses_a_damaged_store_at_start_in_one_line(store, damage, expect):
    """A real `deepfeat serve` process: exit 1 and one line naming the file and the repair, not a traceback
    and exit 3 (a NaN row), nor a service that starts and answers wrongly with "ok" (another store's index,
    a lost commit marker)."""
    if damage == "nan":
        _nan_in_shard(store, 1, 2)
    elif damage == "index":
        _swap_index(store)
    else:
        (store / "shards/000001.items.parquet").unlink()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.run([sys.executable, "-m", "deepfeat", "serve", str(store), "--port", "0"], env=env, check=False,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith("deepfeat serve: error: ") and expect in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1, p.stderr
