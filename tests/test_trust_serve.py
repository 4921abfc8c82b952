"""Issue 26, section 3 (part): every route that touches a stored file checks it the same way.

A stored image replaced by a FIFO (which would block a worker thread forever) or by a symlink
to a text file answers a JSON 404 on the image route as on the thumbnail route."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from deepfeat.pipeline import ExtractConfig, extract

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from fastapi.testclient import TestClient

    from deepfeat.data.samples import write_sample_photos
    from deepfeat.serve import create_app

    root = tmp_path_factory.mktemp("trust_serve")
    names = write_sample_photos(root / "img")
    extract(ExtractConfig(inputs=[str(root / "img")], output=str(root / "store"), workers=0, progress="none"))
    app = create_app(root / "store")
    with TestClient(app) as client:
        yield client, app.state.service, [Path(n) if os.path.isabs(n) else root / n for n in names]


def _id_of(svc, path: Path) -> int:
    return int(svc.engine.ids[svc.engine.paths.index(str(path))])


@pytest.mark.parametrize("route", ["image", "thumbnail"])
@pytest.mark.parametrize("replacement", ["fifo", "symlink-to-text"])
def test_a_stored_file_that_is_no_longer_an_image_is_a_json_404(served, tmp_path, route, replacement):
    client, svc, files = served
    victim = files[0] if route == "image" else files[1]
    backup = tmp_path / "backup"
    shutil.copy(victim, backup)
    item_id = _id_of(svc, victim)
    victim.unlink()
    if replacement == "fifo":
        os.mkfifo(victim)
    else:
        (tmp_path / "notes.txt").write_text("not an image\n")
        victim.symlink_to(tmp_path / "notes.txt")
    try:
        for _ in range(3):  # more than the worker threads: none of them may be left blocked
            r = client.get(f"/api/items/{item_id}/{route}")
            assert r.status_code == 404, (r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json") and r.json()["error"]
        assert client.get("/api/health").status_code == 200
    finally:
        victim.unlink()
        shutil.copy(backup, victim)


@pytest.mark.parametrize("range_header, status, pattern", [
    ("bytes=999999999-", 416, "starts outside the file"),
    ("chars=0-10", 400, "malformed Range header"),
    ("bytes=20-10", 400, "malformed Range header"),
])
def test_range_errors_are_json(served, range_header, status, pattern):
    client, svc, files = served
    item_id = _id_of(svc, files[2])
    r = client.get(f"/api/items/{item_id}/image", headers={"Range": range_header})
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json") and pattern in r.json()["error"]
    if status == 416:
        assert r.headers["content-range"] == f"bytes */{files[2].stat().st_size}"
    ok = client.get(f"/api/items/{item_id}/image", headers={"Range": "bytes=0-9"})
    assert ok.status_code == 206 and len(ok.content) == 10
