"""A running `deepfeat serve` follows its store when another writer changes it: a removal
(`deepfeat remove`), new files (`extract --sync`), a damaged file (the old answers are kept, and
said so), a writer holding the store's lock (waited for). Real photos, the real embedded model,
the server through FastAPI's test client, the store changed by the library and the CLI."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image, ImageOps

pytest.importorskip("fastapi")
pytest.importorskip("python_multipart")
from fastapi.testclient import TestClient

from deepfeat.cli import main
from deepfeat.errors import UsageError
from deepfeat.index.update import refresh_index
from deepfeat.search import SearchEngine
from deepfeat.serve import create_app
from deepfeat.store import FeatureStore
from deepfeat.store.lock import StoreLock, writer_active
from deepfeat.store.removal import remove_items

#: one image at a time in this process, as tests/test_sync.py extracts
FLAGS = ["--backend", "torch", "--workers", "0", "--batch-size", "1", "--progress", "none"]
NAMES = ("astronaut", "chelsea", "coffee", "rocket", "hubble")


@pytest.fixture()
def world(tmp_path, photos) -> tuple[Path, Path]:
    """(photo folder, store): five photos extracted (absolute paths) and indexed flat, for one test."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in NAMES:
        shutil.copy(photos[name], folder / f"{name}.jpg")
    assert main(["extract", str(folder), "-o", str(tmp_path / "store"), *FLAGS]) == 0
    assert main(["index", str(tmp_path / "store"), "--kind", "flat"]) == 0
    return folder, tmp_path / "store"


def upload(client, path: Path, k: int = 5) -> list[dict]:
    r = client.post("/api/search/upload", params={"k": k}, files={"file": (path.name, path.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    return r.json()["hits"]


def exact_ids(store: Path, query: Path, k: int = 5) -> list[int]:
    """The ids an exact search of the store as it is on disk returns for *query* (a fresh engine)."""
    eng = SearchEngine(store, use_index=False)
    return [h.id for h in eng.search(eng.embed_images([str(query)]), k=k)[0]]


def test_removed_images_go_and_synced_ones_come_without_a_restart(world, photos):
    folder, store = world
    coffee = folder / "coffee.jpg"
    with TestClient(create_app(store, reload_check_s=0, map_method="pca")) as c:
        svc = c.app.state.service
        first = svc.view
        hits = upload(c, coffee)
        assert hits[0]["path"] == str(coffee) and len(hits) == 5
        coffee_id = hits[0]["id"]
        assert c.get(f"/api/items/{coffee_id}").status_code == 200
        assert coffee_id in json.loads(_map_data(c))["ids"]

        # another process's removal (the CLI: tombstones, then the index updated in place)
        assert main(["remove", str(store), str(coffee)]) == 0
        hits = upload(c, coffee)
        assert coffee_id not in [h["id"] for h in hits] and len(hits) == 4
        assert [h["id"] for h in hits] == exact_ids(store, coffee)
        assert c.get(f"/api/items/{coffee_id}").status_code == 404
        assert c.get(f"/api/search/item/{coffee_id}").status_code == 404
        assert coffee_id not in json.loads(_map_data(c))["ids"]  # the map is laid out again
        info = c.get("/api/info").json()
        assert info["count"] == 4 and info["index"] == "flat"  # the saved index, brought up to date, is used
        assert info["reload"]["generation"] == 2 and info["reload"]["status"] == "ok"
        assert info["reload"]["reloads"] == 1
        assert svc.view.engine.feature_net is first.engine.feature_net  # the model was kept, not loaded again

        # a request that took the first view before the reload keeps it: its rows, ids and index
        old = svc.search(first, first.engine.xb[first.item_row(coffee_id)], 1)
        assert old[0].id == coffee_id

        # the folder changes (coffee.jpg deleted, new.jpg added) and the CLI syncs the store: the new file is found
        ImageOps.mirror(Image.open(photos["coffee"])).save(folder / "new.jpg", quality=90)
        coffee.unlink()
        assert main(["extract", str(folder), "-o", str(store), "--sync", *FLAGS]) == 0
        hits = upload(c, folder / "new.jpg")
        assert hits[0]["path"] == str(folder / "new.jpg")
        assert [h["id"] for h in hits] == exact_ids(store, folder / "new.jpg")
        health = c.get("/api/health").json()
        assert health["items"] == 5 and health["store"]["generation"] >= 3 and health["store"]["status"] == "ok"


def _map_data(client) -> str:
    page = client.get("/map")
    assert page.status_code == 200
    return re.search(r"<script type=application/json id=map-data>(.*)</script>", page.text, re.DOTALL).group(1)


def test_a_reload_that_fails_keeps_the_old_answers_and_says_so(world, caplog):
    folder, store = world
    rocket = folder / "rocket.jpg"
    with TestClient(create_app(store, reload_check_s=0)) as c:
        before = upload(c, rocket)
        rocket_id = before[0]["id"]
        assert before[0]["path"] == str(rocket)
        remove_items(FeatureStore(store), [rocket_id], "test")
        tombstones = store / "removed.parquet"
        whole = tombstones.read_bytes()
        tombstones.write_bytes(whole[: len(whole) // 2])  # half written
        with caplog.at_level(logging.WARNING, logger="deepfeat.serve.reload"):
            for _ in range(3):
                assert upload(c, rocket) == before  # the store as it was, rocket included
        lines = [r for r in caplog.records if r.name == "deepfeat.serve.reload"]
        assert len(lines) == 1, [r.getMessage() for r in lines]  # one line, not one per request
        assert "could not be reloaded" in lines[0].getMessage() and "removed.parquet" in lines[0].getMessage()
        state = c.get("/api/health").json()["store"]
        assert state["status"] == "failed" and "removed.parquet" in state["error"] and state["generation"] == 1
        assert c.get("/api/info").json()["reload"]["status"] == "failed"

        tombstones.write_bytes(whole)  # the writer finished: the next check loads it
        after = upload(c, rocket)
        assert rocket_id not in [h["id"] for h in after] and len(after) == 4
        state = c.get("/api/health").json()["store"]
        assert state["status"] == "ok" and state["error"] is None and state["generation"] == 2


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="the writer's lock is seen through /proc/locks")
def test_no_reload_while_a_writer_holds_the_lock(world):
    folder, store = world
    chelsea = folder / "chelsea.jpg"
    with TestClient(create_app(store, reload_check_s=0)) as c:
        chelsea_id = upload(c, chelsea)[0]["id"]
        assert writer_active(store) is None
        with StoreLock(store, create=False):  # a removal and its index update, as `deepfeat remove` makes them
            assert writer_active(store)["pid"] == os.getpid()
            remove_items(FeatureStore(store), [chelsea_id], "test")
            hits = upload(c, chelsea)
            assert hits[0]["id"] == chelsea_id  # not half way: the store as it was before the writer
            state = c.get("/api/health").json()["store"]
            assert state["status"] == "waiting" and state["writer"]["pid"] == os.getpid()
            refresh_index(FeatureStore(store))
        assert writer_active(store) is None
        hits = upload(c, chelsea)
        assert chelsea_id not in [h["id"] for h in hits]
        state = c.get("/api/health").json()["store"]
        assert state["status"] == "ok" and state["generation"] == 2
        assert c.get("/api/info").json()["index"] == "flat"


def test_no_reload_when_switched_off_and_bad_intervals(world):
    _, store = world
    with TestClient(create_app(store, reload_check_s=None)) as c:
        item = int(FeatureStore(store).ids[0])
        remove_items(FeatureStore(store), [item], "test")
        assert c.get(f"/api/items/{item}").status_code == 200  # as it was at start-up, as asked
        state = c.get("/api/health").json()["store"]
        assert state["status"] == "off" and state["generation"] == 1 and state["check_seconds"] is None
    with pytest.raises(UsageError, match="reload check interval"):
        create_app(store, reload_check_s=-1)


def test_a_request_in_flight_finishes_on_the_store_it_started_with(world):
    """An upload waiting for the model while the store changes and another request reloads it:
    it answers from the state it started with; the next upload from the new one."""
    folder, store = world
    coffee = folder / "coffee.jpg"
    with TestClient(create_app(store, reload_check_s=0, max_batch=1, self_check=False)) as c:
        svc = c.app.state.service
        coffee_id = upload(c, coffee)[0]["id"]
        real, entered, release = svc.batcher.embed, threading.Event(), threading.Event()

        def gated(pixels):
            entered.set()
            assert release.wait(60), "the test never released the model"
            return real(pixels)

        svc.batcher.embed = gated
        results: list = []
        t = threading.Thread(target=lambda: results.append(upload(c, coffee)))
        t.start()
        assert entered.wait(60)  # the upload is in the model, holding the first view
        assert main(["remove", str(store), str(coffee)]) == 0
        r = c.get("/api/search/item/" + str(upload_id_of(c, folder / "rocket.jpg")), params={"k": 5})
        assert r.status_code == 200 and coffee_id not in [h["id"] for h in r.json()["hits"]]
        assert svc.view.generation == 2
        release.set()
        t.join(60)
        assert results and results[0][0]["id"] == coffee_id and len(results[0]) == 5  # the first view's answer
        svc.batcher.embed = real
        assert coffee_id not in [h["id"] for h in upload(c, coffee)]


def upload_id_of(client, path: Path) -> int:
    r = client.get("/api/search/item", params={"path": str(path), "k": 1})
    assert r.status_code == 200, r.text
    return r.json()["query"]["id"]


def test_a_new_post_processing_is_used_for_uploads_and_another_model_is_refused(world, caplog):
    folder, store = world
    chelsea = folder / "chelsea.jpg"
    with TestClient(create_app(store, reload_check_s=0)) as c:
        svc = c.app.state.service
        first = svc.view
        assert main(["postprocess", str(store), "--post", "pca:3,l2"]) == 0  # fitted on the store: 3-d now
        hits = upload(c, chelsea)
        info = c.get("/api/info").json()
        assert info["dim"] == 3 and info["post"] == "pca:3,l2" and info["reload"]["generation"] == 2
        assert hits[0]["path"] == str(chelsea) and hits[0]["score"] > 0.999  # embedded as the store is now
        assert [h["id"] for h in hits] == exact_ids(store, chelsea)
        r = c.post("/api/search/vector", json={"vector": [1.0, 0.0, 0.0], "k": 2})
        assert r.status_code == 200 and len(r.json()["hits"]) == 2
        assert svc.view.engine.model is first.engine.model  # the model was kept

        # the same folder made into a store of other descriptors (MAC pooling): not served, said so
        shutil.rmtree(store)
        assert main(["extract", str(folder), "-o", str(store), "--pool", "mac", *FLAGS]) == 0
        with caplog.at_level(logging.WARNING, logger="deepfeat.serve.reload"):
            assert upload(c, chelsea) == hits  # still the state before
        state = c.get("/api/health").json()["store"]
        assert state["status"] == "failed" and "restart the server" in state["error"], state
        assert any("restart the server" in r.getMessage() for r in caplog.records)


def test_readers_do_not_make_the_server_reload(world):
    """Searches, info and DBA vectors saved beside the index by another process are no change of the store."""
    folder, store = world
    with TestClient(create_app(store, reload_check_s=0)) as c:
        assert main(["search", str(store), str(folder / "rocket.jpg"), "--dba", "2", "--top", "2"]) == 0
        assert main(["info", str(store), "--verify"]) == 0
        assert any(p.name.startswith("dba-") for p in (store / "index").iterdir())
        upload(c, folder / "rocket.jpg")
        assert c.get("/api/health").json()["store"]["generation"] == 1
