"""Start-up of a small run (issue 30, "a fast first answer"): what a one-photo extract no longer pays
for. The descriptor length comes from the cache after the first run (no forward pass), and a few
images are decoded in this process (no decode worker processes) unless --workers asks for them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deepfeat.backends import export_cache

pytest.importorskip("onnxruntime")


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(export_cache.ENV_ROOT, str(root))
    return root


@pytest.fixture
def one_photo(photos, tmp_path) -> Path:
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(photos["chelsea"], folder / "chelsea.jpg")
    return folder


def _extract(folder: Path, out: Path, *extra: str) -> None:
    from deepfeat.cli import main

    assert main(["extract", str(folder), "-o", str(out), "--backend", "onnx", "--pool", "gem", "--progress", "none",
                 *extra]) == 0


def test_descriptor_length_comes_from_the_cache_after_the_first_run(one_photo, tmp_path, private_cache, monkeypatch):
    from deepfeat.backends import featurenet
    from deepfeat.store import FeatureStore

    _extract(one_photo, tmp_path / "s1")
    [entry] = (private_cache / export_cache.DIMS_DIR).glob("*.json")
    assert json.loads(entry.read_text())["dims"] == [1280]

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("pooled_dims ran: the cached length was not used")

    # a run that builds the network (no prepared one: tests/test_prepared.py) takes the length from here
    shutil.rmtree(private_cache / "prepared")
    with monkeypatch.context() as m:
        m.setattr(featurenet, "pooled_dims", no_forward_pass)
        _extract(one_photo, tmp_path / "s2")
    s1, s2 = FeatureStore(tmp_path / "s1"), FeatureStore(tmp_path / "s2")
    assert s1.meta["features"] == s2.meta["features"]
    np.testing.assert_array_equal(s1.raw(), s2.raw())

    entry.write_text("{damaged")  # a damaged entry is computed again and rewritten
    shutil.rmtree(private_cache / "prepared")
    _extract(one_photo, tmp_path / "s3")
    assert json.loads(entry.read_text())["dims"] == [1280]

    with monkeypatch.context() as m:  # --no-cache: neither read nor written
        m.setattr(featurenet, "pooled_dims", lambda *a, **k: [1280])
        m.setenv(export_cache.ENV_ROOT, str(tmp_path / "other"))
        _extract(one_photo, tmp_path / "s4", "--no-cache")
    assert not (tmp_path / "other").exists()


def test_a_few_images_are_decoded_in_process_unless_workers_are_asked_for(one_photo, tmp_path, private_cache,
                                                                         monkeypatch):
    from deepfeat.pipeline import decode
    from deepfeat.store import FeatureStore

    pools = []
    real = decode.SupervisedPool

    def recording_pool(*args, **kwargs):
        pools.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "SupervisedPool", recording_pool)
    _extract(one_photo, tmp_path / "inline")
    assert pools == []
    _extract(one_photo, tmp_path / "pool", "--workers", "1")
    assert len(pools) == 1 and pools[0][0] == 1
    np.testing.assert_array_equal(FeatureStore(tmp_path / "inline").raw(), FeatureStore(tmp_path / "pool").raw())
