"""Issue 26, section 2: the append contract, real photos, the real embedded model, the real CLI.

An append keeps every setting of the store unless asked (and then says what changes, or
refuses with the reason); ``--resume`` with other settings refuses; files are identified by
their real path; a run that stores nothing leaves nothing behind."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from deepfeat import cli
from deepfeat.store import FeatureStore

FAST = ["--workers", "0", "--progress", "none", "--shard-size", "4"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, collection) -> dict[str, Path]:
    """Three folders of 4 distinct real photos each: the first store, an append, a fitting store."""
    root = tmp_path_factory.mktemp("append")
    files = sorted(p for p in collection.rglob("*") if p.is_file())
    out = {}
    for i, name in enumerate(("first", "more", "fit")):
        d = root / name
        d.mkdir()
        for p in files[i * 4: i * 4 + 4]:
            shutil.copy(p, d / p.name)
        out[name] = d
    return out


@pytest.fixture(scope="module")
def whitened(tmp_path_factory, folders) -> Path:
    """A store post-processed with `--post pca-whiten:3,l2 --fit-on OTHER` (a fitted post.npz)."""
    base = tmp_path_factory.mktemp("whitened")
    assert cli.main(["extract", str(folders["fit"]), "-o", str(base / "other"), *FAST]) == 0
    assert cli.main(["extract", str(folders["first"]), "-o", str(base / "store"), "--post", "pca-whiten:3,l2",
                     "--fit-on", str(base / "other"), *FAST]) == 0
    return base / "store"


@pytest.fixture()
def store(whitened, tmp_path) -> Path:
    shutil.copytree(whitened, tmp_path / "store")
    shutil.copytree(whitened.parent / "other", tmp_path / "other")
    return tmp_path / "store"


def test_an_append_without_flags_keeps_the_fitted_post_processing(store, folders, capsys):
    before = FeatureStore(store)
    x0, post0 = before.vectors(), (store / "post.npz").read_bytes()
    assert cli.main(["extract", str(folders["more"]), "-o", str(store), *FAST]) == 0
    capsys.readouterr()
    after = FeatureStore(store)
    assert after.meta["post"] == "pca-whiten:3,l2" and (store / "post.npz").read_bytes() == post0
    assert len(after) == 8 and np.allclose(after.vectors()[:4], x0, atol=1e-6)


def test_an_append_that_changes_post_says_what_changes_and_what_is_lost(store, folders, capsys, caplog):
    with caplog.at_level(logging.WARNING, logger="deepfeat.pipeline"):
        assert cli.main(["extract", str(folders["more"]), "-o", str(store), "--post", "none", *FAST]) == 0
    capsys.readouterr()
    msg = caplog.text
    assert "--post none changes the post-processing of every vector" in msg and "from pca-whiten:3,l2 to none" in msg
    assert "post.npz, fitted on" in msg and "--fit-on" in msg  # how to get it back
    assert FeatureStore(store).meta["post"] == "none" and not (store / "post.npz").exists()


def test_an_append_without_pool_adopts_the_stores_pooling(tmp_path, folders, capsys):
    out = tmp_path / "mac"
    assert cli.main(["extract", str(folders["first"]), "-o", str(out), "--pool", "mac", *FAST]) == 0
    assert cli.main(["extract", str(folders["more"]), "-o", str(out), *FAST]) == 0  # was refused: gem != mac
    capsys.readouterr()
    assert FeatureStore(out).meta["pooling"] == "mac" and len(FeatureStore(out)) == 8
    # a given setting that defines the vectors and differs is refused, naming it
    assert cli.main(["extract", str(folders["fit"]), "-o", str(out), "--pool", "gem", *FAST]) == 1
    assert "pooling: store has 'mac'" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [(["--pool", "mac"], "--pool"), (["--size", "long:160"], "--size"),
                                          (["--post", "none"], "--post")])
def test_resume_with_other_settings_refuses_naming_them(store, flags, named, capsys):
    meta0 = (store / "meta.json").read_bytes()
    assert cli.main(["extract", "--resume", "-o", str(store), *flags, *FAST]) == 2
    err = capsys.readouterr().err
    assert f"{named}: the store has" in err and "Leave those flags out" in err and err.count("error:") == 1
    assert (store / "meta.json").read_bytes() == meta0
    assert cli.main(["extract", "--resume", "-o", str(store), *FAST]) == 0  # without them it continues


def test_the_same_files_through_a_symlinked_folder_are_not_stored_twice(store, folders, tmp_path, capsys):
    link = tmp_path / "linked"
    link.symlink_to(folders["first"], target_is_directory=True)
    assert cli.main(["extract", str(link), "-o", str(store), "--json", *FAST]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["processed"] == 0 and rep["planned"] == 4
    s = FeatureStore(store)
    assert len(s) == 4
    # a query by a stored image finds itself once, not a copy at 1.0 as well
    from deepfeat.search import SearchEngine

    hits = SearchEngine(store).search(s.vectors()[:1], k=2)[0]
    assert hits[1].score < 0.999


def test_a_run_that_stores_nothing_leaves_nothing_behind(tmp_path, folders, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "store"
    assert cli.main(["extract", str(empty), "-o", str(out), "--pool", "mac", *FAST]) == 2
    assert "no images found" in capsys.readouterr().err
    assert not out.exists()
    # the same folder then takes a correct run with other settings
    assert cli.main(["extract", str(folders["first"]), "-o", str(out), "--pool", "gem", *FAST]) == 0
    capsys.readouterr()
    assert FeatureStore(out).meta["pooling"].startswith("gem")
    # an existing empty folder is left as it was, but for the writer's lock file (which no run minds)
    pre = tmp_path / "pre"
    pre.mkdir()
    assert cli.main(["extract", str(empty), "-o", str(pre), *FAST]) == 2
    assert [f.name for f in pre.iterdir()] in ([], [".extract.lock"])
    assert cli.main(["extract", str(folders["first"]), "-o", str(pre), "--pool", "mac", *FAST]) == 0
