"""The Duplicates view of ``deepfeat serve``: ``/duplicates`` (a page) and
``/api/duplicates`` (the groups of :func:`deepfeat.collection.duplicates.find_duplicates`,
with each member's item id so the page shows its thumbnail). The groups are computed once
per setting (off the event loop) and kept while the server runs; nothing is moved here."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse

from deepfeat.serve.routes import STATIC_DIR
from deepfeat.serve.service import SearchService


def add_duplicate_routes(app: FastAPI, svc: SearchService) -> None:
    cache: dict[tuple, dict[str, Any]] = {}
    lock = threading.Lock()

    def compute(verify: bool, threshold: float | None) -> dict[str, Any]:
        from deepfeat.collection.duplicates import DuplicateSettings, find_duplicates

        key = (verify, threshold)
        with lock:  # one computation per setting, even under concurrent requests
            if key not in cache:
                rep = find_duplicates(svc.engine.store, DuplicateSettings(threshold=threshold, verify=verify))
                doc = rep.to_dict()
                for g, group in zip(doc["groups"], rep.groups):
                    g["ids"] = [int(svc.engine.ids[r]) for r in group.rows]
                    g["keeper_id"] = int(svc.engine.ids[group.keeper])
                cache[key] = doc
            return cache[key]

    @app.get("/duplicates", include_in_schema=False)
    async def duplicates_page():
        return FileResponse(STATIC_DIR / "duplicates.html", media_type="text/html",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/api/duplicates", summary="groups of duplicate images of the store (docs/duplicates.md)")
    async def duplicates(verify: bool = True, threshold: float | None = Query(None, ge=-1.0, le=1.0)):
        return await asyncio.to_thread(compute, verify, threshold)
