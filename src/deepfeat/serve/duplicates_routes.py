"""The Duplicates view of ``deepfeat serve``: ``/duplicates`` (a page) and
``/api/duplicates`` (the groups of :func:`deepfeat.collection.duplicates.find_duplicates`,
with each member's item id so the page shows its thumbnail). The groups are computed once
per setting (off the event loop) and kept until the store is reloaded; nothing is moved here."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse

from deepfeat.serve.routes import STATIC_DIR
from deepfeat.serve.service import SearchService
from deepfeat.serve.uploads import read_multipart_file


def add_duplicate_routes(app: FastAPI, svc: SearchService) -> None:
    cache: dict[tuple, dict[str, Any]] = {}
    lock = threading.Lock()

    def compute(verify: bool, threshold: float | None) -> dict[str, Any]:
        from deepfeat.collection.duplicates import DuplicateSettings, find_duplicates

        view = svc.view
        key = (view.generation, verify, threshold)
        with lock:  # one computation per setting and view of the store, even under concurrent requests
            if key not in cache:
                for old in [k for k in cache if k[0] != view.generation]:  # the store was reloaded
                    del cache[old]
                eng = view.engine
                rep = find_duplicates(eng.store, DuplicateSettings(threshold=threshold, verify=verify))
                doc = rep.to_dict()
                for g, group in zip(doc["groups"], rep.groups):
                    g["ids"] = [int(eng.ids[r]) for r in group.rows]
                    g["keeper_id"] = int(eng.ids[group.keeper])
                cache[key] = doc
            return cache[key]

    @app.get("/duplicates", include_in_schema=False)
    async def duplicates_page():
        return FileResponse(STATIC_DIR / "duplicates.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    def check(view, data: bytes, filename: str | None, xq: np.ndarray, verify: bool) -> dict[str, Any]:
        from deepfeat.collection.duplicates import DuplicateSettings
        from deepfeat.collection.query import query_duplicates

        suffix = os.path.splitext(filename or "")[1][:10] or ".img"
        with tempfile.TemporaryDirectory() as tmp:  # the local-feature extractor and the hashes read a file
            path = os.path.join(tmp, "upload" + suffix)
            with open(path, "wb") as f:
                f.write(data)
            res = query_duplicates(view.engine.store, [path], DuplicateSettings(verify=verify), xq=xq)[0].to_dict()
        res["query"] = filename
        return res

    @app.post("/api/duplicates/query", summary="is this uploaded image (multipart field 'file') already in the store?")
    async def duplicates_query(request: Request, verify: bool = True):
        up = await read_multipart_file(request.headers.get("content-type"), request.stream(), "file",
                                       svc.cfg.max_upload_bytes)
        view = svc.view
        with svc.batcher.announce() as ticket:
            _, px = await svc.in_pool(svc.decode_upload, up.data, None)
            xq = view.post(await ticket.submit(px))
        return await asyncio.to_thread(check, view, up.data, up.filename, xq, verify)

    @app.get("/api/duplicates", summary="groups of duplicate images of the store (docs/duplicates.md)")
    async def duplicates(verify: bool = True, threshold: float | None = Query(None, ge=-1.0, le=1.0)):
        return await asyncio.to_thread(compute, verify, threshold)
