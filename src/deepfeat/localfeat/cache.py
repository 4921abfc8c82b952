"""Local features cached in a feature store: an optional, resumable section.

Layout, next to the store's own shards::

    local/<name>/000007.npz     the local features of store shard 7, one file per shard

Each shard file holds, for the shard's ok items in feature-row order (``offset``):
``ids`` (n), ``counts`` (n, keypoints per image), ``image_sizes`` (n x 2, original
W, H), and the concatenated keypoints ``xy`` (M x 2), ``sizes`` (M) and descriptors
``desc`` (M x D; float16 for float descriptors, uint8 for binary ones), and for
regional descriptors (``--extractor regions``) their ``boxes`` (M x 4). A file is
written atomically (temporary file + rename, :func:`deepfeat.store.atomic_write_bytes`),
so it is the shard's commit: after a crash or ``kill -9`` a shard is present in full
or absent, and running the same command again computes only the missing shards and
ends with the same bytes as an uninterrupted run. Each file is recorded in the store's checksums
when written (:func:`deepfeat.store.checksums.record_file`) and checked when read (size and
sampled digest); a run over an existing section hashes its files whole and computes a changed one
again (the repair ``deepfeat info --verify`` names). The section describes itself in the
store's ``meta.json`` under ``local_features.<name>``: extractor spec, layer, model,
maximum keypoints, frame size, descriptor dim and dtype, code version.

Keypoint sections serve spatial verification (:mod:`deepfeat.localfeat.verify`); ``regions``
sections serve regional diffusion (:mod:`deepfeat.rerank.regional`). Each use picks
its own kind: ``LocalFeatureCache(store, regions=True)`` reads the first regions section.
"""

from __future__ import annotations

import io
import logging
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deepfeat.errors import ImageError, StoreError, UsageError
from deepfeat.localfeat.features import LocalExtractor, LocalFeatures, descriptor_dim, parse_local_spec
from deepfeat.pipeline import faults
from deepfeat.store import FeatureStore, atomic_write_bytes
from deepfeat.store.checksums import content_problem, quick_problem, record_file

log = logging.getLogger(__name__)

LOCAL_DIR = "local"
#: meta keys that must agree for a run to continue an existing section
_IDENTITY = ("spec", "extractor", "layer", "model", "max_keypoints", "size", "scales", "dim", "version")


def section_meta(store: FeatureStore, name: str) -> dict[str, Any] | None:
    return (store.meta.get("local_features") or {}).get(name)


def local_feature_names(store: FeatureStore) -> list[str]:
    return list(store.meta.get("local_features") or {})


def _shard_path(store: FeatureStore, name: str, shard: int) -> Path:
    return store.path / LOCAL_DIR / name / f"{shard:06d}.npz"


def _record(store: FeatureStore, path: Path) -> dict[str, Any] | None:
    return ((store.meta.get("checksums") or {}).get("files") or {}).get(path.relative_to(store.path).as_posix())


def _kept(store: FeatureStore, path: Path) -> bool:
    """Whether a section file already written can be kept: unchanged since its record (sha256), or
    without one (a section made before records, or a run killed between the write and the record: the
    file was written whole, atomically), which is then recorded as it is."""
    record = _record(store, path)
    if record is None:
        record_file(store, path)
        return True
    problem = content_problem(path, record)
    if problem:
        log.warning("%s; computing it again", problem)
    return problem is None


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def is_regions(meta: dict[str, Any] | None) -> bool:
    """Whether a section's meta describes regional descriptors (not keypoints)."""
    return bool(meta) and meta.get("extractor") == "regions"


def open_extractor(store: FeatureStore, spec, device: str = "cpu") -> LocalExtractor:
    """A :class:`LocalExtractor` for *store* (the store's model, checked against its weights).
    Regional descriptors default to the store's own descriptor layer."""
    spec = parse_local_spec(spec)
    if spec.regions and not spec.layer and store.meta.get("layers"):
        from dataclasses import replace

        spec = replace(spec, layer=store.meta["layers"][0])
    model = None
    if spec.needs_model:
        from deepfeat.models import load_model

        mspec = store.meta["model"]["spec"]
        model = load_model(mspec, device=device)
        sha = store.meta["model"].get("weights_sha256")
        if sha and model.weights_sha256 and sha != model.weights_sha256:
            raise StoreError(f"the weights of {mspec} changed since the store was made")
    return LocalExtractor(spec, model)


def build_local_features(store: FeatureStore | str, spec: Any = "cnn", name: str | None = None, device: str = "cpu",
                         on_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Compute (or continue computing) the local features of every ok item of *store*.

    Shards already written are skipped, so an interrupted run continues where it
    stopped. A section of the same *name* made with different settings is refused.
    Returns a small report (shards done/skipped, images, keypoints, seconds, failures)."""
    from deepfeat.store.lock import StoreLock

    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    with StoreLock(store.path, create=False):  # one writer at a time (an extract appending, another run)
        return _build(store, spec, name, device, on_shard)


def _build(store: FeatureStore, spec: Any, name: str | None, device: str,
           on_shard: Callable[[int], None] | None) -> dict[str, Any]:
    store = FeatureStore(store.path)  # the meta and items as they are now, under the lock
    extractor = open_extractor(store, spec, device)
    name = name or extractor.spec.extractor
    if not name.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"local-feature section name {name!r}: use letters, digits, '-' and '_'")
    desc = {**extractor.describe(), "dim": descriptor_dim(extractor),
            "dtype": "uint8" if extractor.spec.binary else "float16"}
    have = section_meta(store, name)
    if have is not None:
        diffs = [f"{k}: store has {have.get(k)!r}, this run has {desc.get(k)!r}" for k in _IDENTITY
                 if have.get(k) != desc.get(k)]
        if diffs:
            raise StoreError(f"{store.path} already has local features {name!r} made differently:\n  "
                             + "\n  ".join(diffs) + f"\nGive another --name, or the same spec ({have.get('spec')}).")
    else:
        sections = dict(store.meta.get("local_features") or {})
        sections[name] = {**desc, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        store.update_meta(local_features=sections)
    section = store.path / LOCAL_DIR / name
    section.mkdir(parents=True, exist_ok=True)
    for stale in section.glob(".*.npz.tmp-*"):  # left by a run killed while writing (kill -9)
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    report = {"name": name, "spec": desc["spec"], "shards_done": 0, "shards_skipped": 0, "images": 0,
              "keypoints": 0, "failed": []}
    for shard in store.committed_shards():
        out = _shard_path(store, name, shard)
        if out.is_file() and _kept(store, out):
            report["shards_skipped"] += 1
            continue
        t = store.shard_items(shard)
        ok = [(i, p, o) for i, p, s, o in zip(t.column("id").to_pylist(), t.column("path").to_pylist(),
                                              t.column("status").to_pylist(), t.column("offset").to_pylist())
              if s == "ok"]
        ok.sort(key=lambda r: r[2])
        feats = []
        for item_id, path, _ in ok:
            try:
                feats.append(extractor.extract(store.resolve_path(path)))
            except ImageError as e:  # the image moved or broke since extraction: no keypoints, reported
                log.warning("local features of %s: %s", path, e)
                report["failed"].append(f"{path}: {e}")
                feats.append(LocalFeatures.empty(desc["dim"], extractor.spec.binary, extractor.spec.regions))
        ddtype = np.uint8 if desc["dtype"] == "uint8" else np.float16
        arrays = {
            "ids": np.array([r[0] for r in ok], np.int64),
            "counts": np.array([len(f) for f in feats], np.int64),
            "image_sizes": np.array([f.image_size for f in feats], np.int64).reshape(-1, 2),
            "xy": np.concatenate([f.xy for f in feats]).astype(np.float32) if feats else np.zeros((0, 2), np.float32),
            "sizes": np.concatenate([f.sizes for f in feats]).astype(np.float32) if feats else np.zeros(0, np.float32),
            "desc": (np.concatenate([f.desc for f in feats]).astype(ddtype) if feats
                     else np.zeros((0, desc["dim"]), ddtype)),
        }
        if extractor.spec.regions:
            arrays["boxes"] = (np.concatenate([f.boxes for f in feats]).astype(np.float32) if feats
                               else np.zeros((0, 4), np.float32))
        faults.before_commit()
        atomic_write_bytes(out, _npz_bytes(**arrays))
        record_file(store, out)
        report["shards_done"] += 1
        report["images"] += len(ok)
        report["keypoints"] += int(arrays["counts"].sum())
        if on_shard is not None:
            on_shard(shard)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return report


class LocalFeatureCache:
    """Read the cached local features of a store section, by feature row.

    *regions*: the section holds regional descriptors (``--extractor regions``, for
    regional diffusion) rather than keypoints (for verification); without a *name*, the
    first section of that kind. Raises :class:`UsageError` (saying how to make them)
    when the store has none, and :class:`StoreError` when a shard of the section is
    missing (an unfinished run)."""

    def __init__(self, store: FeatureStore, name: str | None = None, regions: bool = False):
        self.store = store
        every = local_feature_names(store)
        names = [n for n in every if is_regions(section_meta(store, n)) == regions]
        if name is not None and name in every and name not in names:
            what, other = ("regional descriptors", "keypoints") if regions else ("keypoints", "regional descriptors")
            raise UsageError(f"{store.path}: local features {name!r} hold {other}, not {what}"
                             + (f"; sections of {what}: {', '.join(names)}" if names else ""))
        if not names:
            if regions:
                raise UsageError(f"{store.path} has no regional descriptors; compute them once with "
                                 f"`deepfeat local-features {store.path} --extractor regions` "
                                 f"(or extract with --local-features regions)")
            raise UsageError(f"{store.path} has no cached local features; compute them once with "
                             f"`deepfeat local-features {store.path}` (or extract with --local-features)")
        if name is None:
            name = names[0]
        if name not in names:
            what = "regional descriptors" if regions else "local features"
            raise UsageError(f"{store.path} has no {what} {name!r}; it has: {', '.join(names)}")
        self.name = name
        self.meta = section_meta(store, name)
        self.binary = bool(self.meta.get("binary"))
        items = store.ok_items()
        self._where = list(zip(items.column("shard").to_pylist(), items.column("offset").to_pylist()))
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    @property
    def spec(self) -> str:
        return self.meta["spec"]

    def _shard(self, shard: int) -> dict[str, np.ndarray]:
        if shard not in self._shards:
            p = _shard_path(self.store, self.name, shard)
            again = f"`deepfeat local-features {self.store.path} --name {self.name} --extractor {self.spec}`"
            if not p.is_file():
                raise StoreError(f"{self.store.path}: local features {self.name!r} of shard {shard} are missing; "
                                 f"finish them with {again}")
            problem = quick_problem(p, _record(self.store, p))
            if problem:
                raise StoreError(f"{problem}; {again} computes it again")
            try:  # each array of an .npz carries a CRC-32, checked as it is read: an edit inside is caught here
                with np.load(p, allow_pickle=False) as z:
                    arr = {k: z[k] for k in z.files}
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise StoreError(f"{p} is damaged ({type(e).__name__}: {e}); {again} computes it again") from None
            arr["starts"] = np.concatenate([[0], np.cumsum(arr["counts"])])
            self._shards[shard] = arr
        return self._shards[shard]

    def __getitem__(self, row: int) -> LocalFeatures:
        shard, offset = self._where[int(row)]
        a = self._shard(shard)
        s, e = a["starts"][offset], a["starts"][offset + 1]
        desc = a["desc"][s:e]
        if not self.binary:
            desc = desc.astype(np.float32)
        w, h = a["image_sizes"][offset]
        return LocalFeatures(a["xy"][s:e], a["sizes"][s:e], desc, (int(w), int(h)), self.binary,
                             boxes=a["boxes"][s:e] if "boxes" in a else None)

    def all_descriptors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row's descriptors in feature-row order: ``(desc, counts)``, desc an M x D
        float32 array (M = counts.sum()) and counts the number of vectors of each row."""
        parts, counts = [], np.zeros(len(self._where), np.int64)
        for row, (shard, offset) in enumerate(self._where):
            a = self._shard(shard)
            s, e = a["starts"][offset], a["starts"][offset + 1]
            parts.append(a["desc"][s:e])
            counts[row] = e - s
        dim = int(self.meta.get("dim") or 0)
        desc = np.concatenate(parts) if parts else np.zeros((0, dim), np.float16)
        return np.ascontiguousarray(desc, dtype=np.float32), counts


def carry_over_sections(store: FeatureStore) -> list[str]:
    """After a compaction (:mod:`deepfeat.store.compaction`): each local-feature section's entries of the
    kept rows copied from the old shards' files into the new shards' (by item id), the old files
    deleted. A new shard whose rows cannot all be found is left for ``deepfeat local-features``.
    Returns one line per section that changed."""
    out = []
    committed = set(store.committed_shards())
    for name in local_feature_names(store):
        folder = store.path / LOCAL_DIR / name
        old = [f for f in sorted(folder.glob("*.npz")) if f.stem.isdigit() and int(f.stem) not in committed]
        if not old:
            continue
        todo = [s for s in sorted(committed) if not _shard_path(store, name, s).is_file()]
        entries: dict[int, dict[str, np.ndarray]] = {}
        for f in old:
            with np.load(f, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
            starts = np.concatenate([[0], np.cumsum(a["counts"])])
            for j, item in enumerate(a["ids"].tolist()):
                s, e = starts[j], starts[j + 1]
                entries[item] = {k: (a[k][j] if k in ("ids", "counts", "image_sizes") else a[k][s:e])
                                 for k in a}
        done, left = 0, []
        for shard in todo:
            t = store.shard_items(shard)
            ok = sorted((o, i) for i, st, o in zip(t.column("id").to_pylist(), t.column("status").to_pylist(),
                                                   t.column("offset").to_pylist()) if st == "ok")
            rows = [entries.get(i) for _, i in ok]
            if not rows or any(r is None for r in rows):
                left.append(shard)
                continue
            arrays = {k: (np.stack([r[k] for r in rows]) if k in ("ids", "counts", "image_sizes")
                          else np.concatenate([r[k] for r in rows])) for k in rows[0]}
            atomic_write_bytes(_shard_path(store, name, shard), _npz_bytes(**arrays))
            done += 1
        for f in old:
            f.unlink(missing_ok=True)
        out.append(f"{name}: {done} shard(s) carried over from {len(old)} compacted one(s)"
                   + (f"; shard(s) {left} to compute with `deepfeat local-features {store.path} --name {name}`"
                      if left else ""))
    return out
