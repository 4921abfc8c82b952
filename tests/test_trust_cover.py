"""Issue 26, the checksum cover beyond the store's own files: everything deepfeat writes beside
the shards (a local-feature section, DBA vectors saved with the index, an on-disk index's lists)
is recorded when written, refused or not used when it was changed at the same size, and named
by ``deepfeat info --verify`` with its repair.

The stores are the 24-real-photo, PCA-whitened store of test_store_integrity, with a SIFT
section (OpenCV, no model: fast) and saved DBA vectors added, and a copy with an on-disk index."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from deepfeat import cli
from deepfeat.errors import StoreError
from deepfeat.localfeat.cache import LocalFeatureCache, build_local_features
from deepfeat.search import SearchEngine
from deepfeat.store import FeatureStore
from deepfeat.store.lock import LOCK_NAME

from .test_store_integrity import pristine  # noqa: F401  (module fixture: the store, 3 shards of 8)
from .test_trust_store import _bad, _edit_same_size, _verify

SIFT = "sift:max=200"


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != LOCK_NAME}


def _dba_answers(path: Path) -> list[list[tuple[int, float]]]:
    engine = SearchEngine(path)
    return [[(h.id, round(h.score, 5)) for h in hits] for hits in engine.search(engine.xb[[0, 9, 17]], k=5, dba=2)]


@pytest.fixture(scope="module")
def beside(pristine, tmp_path_factory) -> Path:  # noqa: F811
    """The store with a local-feature section (3 shard files) and DBA vectors saved beside its index."""
    out = tmp_path_factory.mktemp("beside") / "store"
    shutil.copytree(pristine, out)
    assert build_local_features(out, SIFT, name="sift")["shards_done"] == 3
    _dba_answers(out)
    return out


@pytest.fixture(scope="module")
def ondisk(pristine, tmp_path_factory) -> Path:  # noqa: F811
    """The store with an on-disk IVF index (index.faiss, lists.ivfdata, index.json)."""
    out = tmp_path_factory.mktemp("ondisk") / "store"
    shutil.copytree(pristine, out)
    assert cli.main(["index", str(out), "--kind", "ivf", "--max-memory", "64M"]) == 0
    return out


@pytest.fixture()
def copy(request, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(request.getfixturevalue(request.param), dst)
    return dst


@pytest.mark.parametrize("which", ["beside", "ondisk"])
def test_every_file_beside_the_store_is_recorded_and_verified(which, request, capsys):
    root = request.getfixturevalue(which)
    expect = {"beside": {"local/sift/000000.npz", "local/sift/000002.npz", "index/dba-n2-a0.npy",
                         "index/dba-n2-a0.faiss", "index/dba-n2-a0.json"},
              "ondisk": {"index/lists.ivfdata", "index/index.faiss"}}[which]
    assert expect <= _files(root)
    capsys.readouterr()  # what the fixture printed
    rc, report = _verify(root, capsys)
    assert rc == 0 and report["counts"]["bad"] == report["counts"]["unchecked"] == 0, _bad(report)
    assert {c["file"] for c in report["checks"]} == _files(root)


def test_an_append_keeps_the_records_of_a_local_section(beside, tmp_path, capsys):
    """An extraction run ends by re-recording the shards (consolidation): the section's records stay."""
    store = tmp_path / "store"
    shutil.copytree(beside, store)
    FeatureStore(store).consolidate()
    files = FeatureStore(store).meta["checksums"]["files"]
    assert {f"local/sift/{s:06d}.npz" for s in range(3)} <= set(files)
    rc, report = _verify(store, capsys)
    assert rc == 0 and report["counts"]["unchecked"] == 0


@pytest.mark.parametrize("copy", ["beside"], indirect=True)
def test_a_local_section_file_edited_at_the_same_size_is_refused_and_computed_again(beside, copy, capsys):
    capsys.readouterr()
    rel = "local/sift/000001.npz"
    f = copy / rel
    size = f.stat().st_size
    _edit_same_size(f)
    assert f.stat().st_size == size
    cache = LocalFeatureCache(FeatureStore(copy), "sift")
    assert len(cache[0].xy) > 0  # shard 0 still reads
    row = FeatureStore(copy).row_of_path(FeatureStore(copy).shard_items(1).column("path")[0].as_py())
    # a bit between the sampled blocks: caught by the CRC-32 of the .npz's array as it is read
    with pytest.raises(StoreError, match=r"000001\.npz is damaged \(BadZipFile: Bad CRC-32 .*\); "
                                         r"`deepfeat local-features .* --name sift --extractor sift:max=200,size=640` computes"):
        cache[row]
    rc, report = _verify(copy, capsys)
    assert rc == 1 and list(_bad(report)) == [rel]
    assert "deepfeat local-features" in _bad(report)[rel]
    # the repair it names: the same command computes that file again (it hashes the others whole)
    assert cli.main(["local-features", str(copy), "--name", "sift", "--extractor", SIFT, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["shards_done"] == 1 and rep["shards_skipped"] == 2
    assert f.read_bytes() == (beside / rel).read_bytes()
    rc, report = _verify(copy, capsys)
    assert rc == 0, _bad(report)


@pytest.mark.parametrize("rel", ["index/dba-n2-a0.npy", "index/dba-n2-a0.faiss", "index/dba-n2-a0.json"])
@pytest.mark.parametrize("copy", ["beside"], indirect=True)
def test_saved_dba_vectors_edited_at_the_same_size_are_not_used(beside, copy, rel, capsys, caplog):
    _edit_same_size(copy / rel)
    rc, report = _verify(copy, capsys)
    assert rc == 1 and list(_bad(report)) == [rel]
    with caplog.at_level(logging.INFO):
        after = _dba_answers(copy)
    assert after == _dba_answers(beside)  # recomputed: the same answers
    assert "dba-n2-a0" in caplog.text
    rc, report = _verify(copy, capsys)  # and saved again
    assert rc == 0, _bad(report)


@pytest.mark.parametrize("rel", ["index/lists.ivfdata", "index/index.faiss", "index/index.json"])
@pytest.mark.parametrize("copy", ["ondisk"], indirect=True)
def test_an_ondisk_index_file_edited_at_the_same_size_is_refused(copy, rel, capsys):
    capsys.readouterr()
    _edit_same_size(copy / rel)
    with pytest.raises(StoreError, match=rf"{Path(rel).name}.*rebuild the index"):
        SearchEngine(copy)
    assert cli.main(["search", str(copy), "0", "--top", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and Path(rel).name in err and "rebuild the index" in err, err
    rc, report = _verify(copy, capsys)
    assert rc == 1 and list(_bad(report)) == [rel]
    assert cli.main(["index", str(copy), "--kind", "ivf", "--max-memory", "64M"]) == 0  # the repair it names
    capsys.readouterr()
    rc, report = _verify(copy, capsys)
    assert rc == 0, _bad(report)


@pytest.mark.parametrize("copy", ["beside"], indirect=True)
def test_a_section_written_before_records_reads_as_before_and_is_recorded_by_the_next_run(copy, capsys):
    from deepfeat.store.checksums import META_DIGEST_KEY, meta_digest

    meta = json.loads((copy / "meta.json").read_text())
    files = meta["checksums"]["files"]
    for rel in [r for r in files if r.startswith("local/")]:
        del files[rel]
    meta[META_DIGEST_KEY] = meta_digest(meta)
    (copy / "meta.json").write_text(json.dumps(meta))
    cache = LocalFeatureCache(FeatureStore(copy), "sift")
    assert all(len(cache[r].xy) >= 0 for r in range(len(FeatureStore(copy))))
    rc, report = _verify(copy, capsys)
    unchecked = sorted(c["file"] for c in report["checks"] if c["status"] == "unchecked")
    assert rc == 0 and unchecked == [f"local/sift/{s:06d}.npz" for s in range(3)]
    assert build_local_features(copy, SIFT, name="sift")["shards_skipped"] == 3  # nothing computed again
    rc, report = _verify(copy, capsys)
    assert rc == 0 and report["counts"]["unchecked"] == 0
    assert np.array_equal(LocalFeatureCache(FeatureStore(copy), "sift")[0].xy, cache[0].xy)


def test_dba_with_an_ondisk_index_is_one_line(ondisk, capsys):
    """FAISS cannot rebuild on-disk lists with augmented vectors: a usage error, not its RuntimeError."""
    capsys.readouterr()
    assert cli.main(["search", str(ondisk), "0", "--dba", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "on-disk lists" in err and "without --dba" in err, err


@pytest.mark.parametrize("copy", ["ondisk"], indirect=True)
def test_an_in_memory_index_replacing_an_ondisk_one_leaves_no_unused_lists(copy, capsys):
    assert cli.main(["index", str(copy), "--kind", "flat"]) == 0
    assert not (copy / "index/lists.ivfdata").exists()
    capsys.readouterr()
    rc, report = _verify(copy, capsys)
    assert rc == 0 and {c["file"] for c in report["checks"]} == _files(copy)
