"""The append contract: what must agree for two extractions to share a store.

A store's vectors are comparable only if every row was made the same way: the
:data:`IDENTITY_KEYS` of its meta (model and weights, layers, pooling, size policy,
scales, dtype, dims) must be equal, or the run is refused, naming what differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepfeat.errors import StoreError

#: meta keys that must agree for two extractions to share a store
IDENTITY_KEYS = ("model", "layers", "pooling", "size", "scales", "scale_combine", "dtype", "features")


def identity_differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """``key: store has A, this run has B`` for each identity key that differs."""
    diffs = []
    for k in IDENTITY_KEYS:
        a, b = have.get(k), want.get(k)
        if k == "model":
            a = {x: (a or {}).get(x) for x in ("spec", "weights_sha256")}
            b = {x: (b or {}).get(x) for x in ("spec", "weights_sha256")}
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            diffs.append(f"{k}: store has {a!r}, this run has {b!r}")
    return diffs


def check_compatible(store_path: Path, have: dict[str, Any], want: dict[str, Any]) -> None:
    """Refuse to mix features made differently in one store, naming what differs."""
    diffs = identity_differences(have, want)
    if diffs:
        raise StoreError(
            f"{store_path} holds features made differently; refusing to mix them:\n  " + "\n  ".join(diffs)
            + "\nUse a new output directory, or the store's own settings."
        )
