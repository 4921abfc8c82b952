"""Truncated or edited store and index files are detected, naming the file; old stores still open.

Stores are extracted from real photos by the real embedded model; the damage is done to
the files on disk the way a full disk, a bad copy or a stray editor would."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from deepfeat import cli
from deepfeat.errors import StoreError
from deepfeat.pipeline import ExtractConfig, extract
from deepfeat.search import build_index
from deepfeat.store import FeatureStore
from deepfeat.store.checksums import file_digest


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, collection) -> Path:
    """A store of 24 real photos in 3 shards, PCA-whitened (a fitted post.npz), with a saved index."""
    out = tmp_path_factory.mktemp("integrity") / "store"
    extract(ExtractConfig(inputs=[str(collection)], output=str(out), workers=0, progress="none", shard_size=8,
                          post="pca:16,l2"))
    build_index(FeatureStore(out), kind="flat")
    return out


@pytest.fixture()
def store(pristine, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(pristine, dst)
    return dst


def _verify(path: Path, capsys) -> tuple[int, dict]:
    rc = cli.main(["info", str(path), "--verify", "--json"])
    return rc, json.loads(capsys.readouterr().out)


def _write_meta_as_deepfeat(store: Path, meta: dict) -> None:
    """Write *meta* with its own record recomputed, as deepfeat would (a forgery that passes the meta check)."""
    from deepfeat.store.checksums import META_DIGEST_KEY, meta_digest

    meta[META_DIGEST_KEY] = meta_digest(meta)
    (store / "meta.json").write_text(json.dumps(meta))


def _bad(report: dict) -> dict[str, str]:
    return {c["file"]: c["detail"] for c in report["checks"] if c["status"] == "bad"}


def test_a_fresh_store_verifies_and_records_every_file(store, capsys):
    meta = json.loads((store / "meta.json").read_text())
    files = meta["checksums"]["files"]
    shards = sorted(p.name for p in (store / "shards").iterdir())
    assert len(shards) == 6  # 3 shards x (items + bn2 features)
    assert {f"shards/{n}" for n in shards} | {"items.parquet", "post.npz", "plan.parquet"} == set(files)
    for rel, rec in files.items():
        assert rec["bytes"] == (store / rel).stat().st_size and len(rec["sha256"]) == 64
    # each shard's commit marker carries its arrays' checksums (committed with the shard)
    own = json.loads(pq.read_schema(store / "shards/000001.items.parquet").metadata[b"deepfeat.checksums"])
    assert own == {"000001.bn2.npy": files["shards/000001.bn2.npy"]}
    assert "index_sha256" in json.loads((store / "index/index.json").read_text())
    rc, report = _verify(store, capsys)
    assert rc == 0 and report["ok"] and report["counts"] == {"ok": 13, "bad": 0, "unchecked": 0}
    assert {c["file"] for c in report["checks"]} >= {"index/index.faiss", "index/rows.npy", "post.npz",
                                                     "items.parquet", "meta.json"}  # rows.npy: the index's item ids
    assert cli.main(["info", str(store), "--verify"]) == 0
    assert "13 files ok, 0 bad, 0 unchecked" in capsys.readouterr().out


def test_a_truncated_shard_is_refused_on_open_naming_the_file(store, capsys):
    f = store / "shards/000001.bn2.npy"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(StoreError, match=r"000001\.bn2\.npy has \d+ bytes but was written with \d+: truncated"):
        FeatureStore(store).vectors()
    rc, report = _verify(store, capsys)
    assert rc == 1 and list(_bad(report)) == ["shards/000001.bn2.npy"]
    assert cli.main(["info", str(store), "--verify"]) == 1
    assert "BAD  shards/000001.bn2.npy" in capsys.readouterr().out


def test_an_edited_shard_passes_the_size_check_and_fails_verify(store, capsys):
    f = store / "shards/000002.bn2.npy"
    data = bytearray(f.read_bytes())
    data[-7] ^= 0x40  # one bit of one float: same size, another vector
    f.write_bytes(bytes(data))
    # opening checks sizes and a sampled digest (16 blocks of 4 KiB): this 40 KiB file is covered whole;
    # in a large file a bit between the blocks is verify's job (tests/test_trust_store.py)
    with pytest.raises(StoreError, match=r"000002\.bn2\.npy has the size it was written with but other content"):
        FeatureStore(store).vectors()
    rc, report = _verify(store, capsys)
    assert rc == 1 and "was edited: its sha256" in _bad(report)["shards/000002.bn2.npy"]


def test_damaged_items_table_post_and_index(store, capsys, caplog):
    # items.parquet is a cache of the shards' items: a damaged one is reported and read around
    t = store / "items.parquet"
    t.write_bytes(t.read_bytes()[:50])
    with caplog.at_level(logging.WARNING, logger="deepfeat.store"):
        s = FeatureStore(store)
        assert len(s) == 24 and len(s.vectors()) == 24
    assert "items.parquet has 50 bytes" in caplog.text and "reading the items from the shards" in caplog.text
    # the fitted PCA: refused, naming the file
    p = store / "post.npz"
    p.write_bytes(p.read_bytes() + b"junk")
    with pytest.raises(StoreError, match=r"post\.npz has \d+ bytes"):
        FeatureStore(store).post
    # the index: a flipped byte (same size) is only seen by verify
    i = store / "index/index.faiss"
    data = bytearray(i.read_bytes())
    data[len(data) // 2] ^= 1
    i.write_bytes(bytes(data))
    rc, report = _verify(store, capsys)
    assert rc == 1 and set(_bad(report)) == {"items.parquet", "post.npz", "index/index.faiss"}
    assert "was edited" in _bad(report)["index/index.faiss"]


def test_a_missing_shard_array_and_a_wrong_shape(store, capsys):
    (store / "shards/000000.bn2.npy").unlink()
    # a valid .npy of the wrong shape whose checksum records were updated too: the shape check catches it
    f = store / "shards/000001.bn2.npy"
    np.save(f, np.zeros((3, 1280), np.float32))
    rec = file_digest(f)
    marker = store / "shards/000001.items.parquet"
    pq.write_table(pq.read_table(marker).replace_schema_metadata(
        {b"deepfeat.checksums": json.dumps({f.name: rec})}), marker)
    meta = json.loads((store / "meta.json").read_text())
    meta["checksums"]["files"].update({"shards/000001.bn2.npy": rec, "shards/000001.items.parquet":
                                       file_digest(marker)})
    _write_meta_as_deepfeat(store, meta)
    rc, report = _verify(store, capsys)
    bad = _bad(report)
    assert rc == 1 and set(bad) == {"shards/000000.bn2.npy", "shards/000001.bn2.npy"}
    assert "missing" in bad["shards/000000.bn2.npy"]
    assert bad["shards/000001.bn2.npy"] == "shape (3, 1280), but the shard has 8 ok items of 1280 dims"
    with pytest.raises(StoreError, match=r"000000\.bn2\.npy is missing"):
        FeatureStore(store).vectors()


def test_stores_without_checksums_still_open_and_verify_as_unchecked(store, capsys):
    """A store written before checksums existed: no meta record, no shard footer record, no index sha256."""
    meta = json.loads((store / "meta.json").read_text())
    del meta["checksums"], meta["meta_sha256"]
    (store / "meta.json").write_text(json.dumps(meta))
    for f in (store / "shards").glob("*.items.parquet"):
        pq.write_table(pq.read_table(f).replace_schema_metadata(None), f)
    im = json.loads((store / "index/index.json").read_text())
    del im["index_sha256"], im["index_sample"], im["meta_sha256"]
    (store / "index/index.json").write_text(json.dumps(im))
    s = FeatureStore(store)
    assert len(s.vectors()) == 24 and s.post.fitted
    rc, report = _verify(store, capsys)
    assert rc == 0 and report["counts"]["bad"] == 0 and report["counts"]["unchecked"] == 11
    assert all("before deepfeat recorded checksums" in c["detail"] for c in report["checks"])


def test_appending_to_a_store_records_the_new_shards(store, collection, capsys):
    extra = store.parent / "more"
    extra.mkdir()
    for p in sorted((collection / "a").iterdir())[:3]:
        shutil.copy(p, extra / f"x_{p.name}")
    extract(ExtractConfig(inputs=[str(extra)], output=str(store), workers=0, progress="none", shard_size=8))
    files = json.loads((store / "meta.json").read_text())["checksums"]["files"]
    assert "shards/000003.bn2.npy" in files and "shards/000003.items.parquet" in files
    rc, report = _verify(store, capsys)
    assert rc == 0, _bad(report)
