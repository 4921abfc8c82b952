"""Matching the names ground-truth files use to database rows, and reading the
name lists (one name a line; Oxford's good / ok / junk lists)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from deepfeat.errors import FormatError, UsageError


def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


class _NameIndex:
    """Finds database items by the names ground-truth files use.

    A name matches a database path when it is that path, or when it has the same file
    name or the same stem (Oxford names have no extension); a name with folders
    (``daffodil/image_0001.jpg``) must also match the path's last folders.
    """

    def __init__(self, db_paths: Sequence[str | os.PathLike]):
        self.paths = [os.fspath(p) for p in db_paths]
        if not self.paths:
            raise UsageError("the database is empty: no item paths to match the ground truth against")
        self._exact: dict[str, int] = {}
        self._by_name: dict[str, list[int]] = {}
        self._by_stem: dict[str, list[int]] = {}
        self._parts: list[list[str]] = []
        for i, p in enumerate(self.paths):
            self._exact.setdefault(p, i)
            parts = _split_path(p)
            self._parts.append(parts)
            base = parts[-1] if parts else p
            self._by_name.setdefault(base, []).append(i)
            self._by_stem.setdefault(_stem(base), []).append(i)

    def candidates(self, name: str) -> list[int]:
        if name in self._exact:
            return [self._exact[name]]
        parts = _split_path(name)
        if not parts:
            return []
        base = parts[-1]
        cands = self._by_name.get(base) or self._by_stem.get(base) or self._by_stem.get(_stem(base)) or []
        if len(parts) > 1:
            dirs = parts[:-1]
            cands = [i for i in cands if self._parts[i][:-1][-len(dirs):] == dirs]
        return cands

    def resolve(self, names: Iterable[str], what: str, fallbacks: dict[str, str] | None = None) -> dict[str, int]:
        """Map every name to one database index, or raise listing the missing/ambiguous."""
        found: dict[str, int] = {}
        missing: list[str] = []
        ambiguous: list[str] = []
        for name in dict.fromkeys(names):
            cands = self.candidates(name)
            if not cands and fallbacks and name in fallbacks:
                cands = self.candidates(fallbacks[name])
            if len(cands) == 1:
                found[name] = cands[0]
            elif cands:
                ambiguous.append(f"{name} ({', '.join(self.paths[i] for i in cands[:3])})")
            else:
                missing.append(name)
        total = len(found) + len(missing) + len(ambiguous)
        if missing:
            raise UsageError(
                f"{len(missing)} of the {total} images named in {what} are not in the database of "
                f"{len(self.paths)} items (e.g. {', '.join(missing[:5])}); names are matched to database "
                f"paths by file name or stem. Use a store built from the full image set this ground truth "
                f"describes (database e.g. {self.paths[0]})")
        if ambiguous:
            raise UsageError(
                f"{len(ambiguous)} images named in {what} match several database items by name: "
                f"{'; '.join(ambiguous[:3])}; give paths with their folders to tell them apart")
        return found


def _split_path(p: str) -> list[str]:
    return [x for x in p.strip().replace("\\", "/").split("/") if x not in ("", ".")]


def read_name_list(path: str | os.PathLike, what: str = "list file") -> list[str]:
    """Non-blank lines of a text file of names, surrounding whitespace (and CR) removed."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give the text file")
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first name
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    return [s for s in (line.strip() for line in text.splitlines()) if s]


def read_gt_lists(prefix: str | os.PathLike) -> tuple[set[str], set[str]]:
    """Positives (good + ok) and junk names of one Oxford/Paris query, given its prefix
    (``gt_files_170407/all_souls_1`` reads ``all_souls_1_good.txt``, ``_ok.txt``, ``_junk.txt``)."""
    prefix = os.fspath(prefix)
    if os.path.isdir(prefix):
        raise UsageError(f"GT_PREFIX {prefix} is a folder; it names one query's files, e.g. "
                         f"{os.path.join(prefix, 'all_souls_1')} (read as all_souls_1_good.txt, _ok.txt, _junk.txt)")
    lists = {}
    for kind in ("good", "ok", "junk"):
        path = Path(prefix + f"_{kind}.txt")
        if not path.is_file():
            m = re.search(r"_(good|ok|junk|query)(\.txt)?$", prefix)
            hint = f"; give the prefix without the suffix, e.g. {prefix[:m.start()]}" if m else ""
            raise UsageError(f"ground-truth file not found: {path} (GT_PREFIX names the query, the "
                             f"program reads GT_PREFIX_good.txt, _ok.txt and _junk.txt){hint}")
        lists[kind] = read_name_list(path)
    return set(lists["good"]) | set(lists["ok"]), set(lists["junk"])
