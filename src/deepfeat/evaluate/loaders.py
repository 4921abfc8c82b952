"""Ground-truth loaders: class folders, a groups CSV, UKBench and Oxford 5k / Paris 6k
(the revisited protocols are in :mod:`deepfeat.evaluate.revisited`)."""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepfeat.errors import FormatError, UsageError
from deepfeat.evaluate.names import _NameIndex, _split_path, _stem, read_gt_lists
from deepfeat.evaluate.values import GroundTruth, Query

_OXFORD_QUERY_PREFIX = "oxc1_"  # the Oxford release prefixes query image names with it


def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _parse_oxford_query(path: Path) -> tuple[str, tuple[float, float, float, float]]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the image name
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise FormatError(f"{path}: empty query file; expected one line 'IMAGE x1 y1 x2 y2'")
    lineno, line = lines[0]
    tokens = line.split()
    try:
        if len(tokens) != 5:
            raise ValueError
        x1, y1, x2, y2 = (float(t) for t in tokens[1:])
    except ValueError:
        raise FormatError(f"{path}:{lineno}: expected 'IMAGE x1 y1 x2 y2' (e.g. 'oxc1_all_souls_000013 136.5 "
                          f"34.1 648.5 955.7'), got {line.strip()!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        raise FormatError(f"{path}:{lineno}: the query box must have x1 < x2 and y1 < y2, got {line.strip()!r}")
    return tokens[0], (x1, y1, x2, y2)


def load_oxford_gt(gt_dir: str | os.PathLike, db_paths: Sequence[str]) -> GroundTruth:
    """Oxford 5k / Paris 6k ground truth from a ``gt_files`` folder.

    Each query has ``<name>_query.txt`` (``oxc1_<image> x1 y1 x2 y2``; the ``oxc1_``
    prefix is dropped) and ``_good.txt``, ``_ok.txt``, ``_junk.txt`` lists. Relevant =
    good + ok, junk ignored. The query image is a database image, is listed as good,
    and stays in its own ranking (the standard protocol; its region is what is
    queried). Queries are in natural order of their names.
    """
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise UsageError(f"Oxford/Paris ground-truth folder not found: {gt_dir}")
    query_files = sorted(gt_dir.glob("*_query.txt"), key=lambda p: _natural_key(p.name))
    if not query_files:
        raise UsageError(f"no *_query.txt files in {gt_dir}; expected an Oxford/Paris gt_files folder with "
                         f"<landmark>_<n>_query.txt, _good.txt, _ok.txt and _junk.txt per query")
    raw = []
    for qf in query_files:
        name = qf.name[: -len("_query.txt")]
        image, bbox = _parse_oxford_query(qf)
        try:
            positives, junk = read_gt_lists(gt_dir / name)
        except UsageError as e:
            raise FormatError(f"incomplete ground truth for query {name} in {gt_dir}: {e}") from None
        raw.append((name, image, bbox, positives, junk))
    index = _NameIndex(db_paths)
    fallbacks = {im: im[len(_OXFORD_QUERY_PREFIX):] for _, im, *_ in raw if im.startswith(_OXFORD_QUERY_PREFIX)}
    names = [n for _, im, _, pos, jk in raw for n in (im, *sorted(pos), *sorted(jk))]
    found = _resolve_oxford(index, names, fallbacks, f"the ground truth {gt_dir}")
    queries = tuple(
        Query(name=name, image=fallbacks.get(image, image), index=found[image], path=index.paths[found[image]],
              relevant=frozenset(found[n] for n in pos), junk=frozenset(found[n] for n in jk), bbox=bbox)
        for name, image, bbox, pos, jk in raw
    )
    return GroundTruth("oxford", queries, len(index.paths), exclude_query=False, source=str(gt_dir))


def _resolve_oxford(index: _NameIndex, names: list[str], fallbacks: dict[str, str], what: str) -> dict[str, int]:
    # Query names carry 'oxc1_'; prefer the name without it, keep the full name as a fallback.
    preferred = {n: fallbacks.get(n, n) for n in names}
    back = {v: k for k, v in fallbacks.items()}
    found = index.resolve(preferred.values(), what, fallbacks=back)
    return {n: found[p] for n, p in preferred.items()}


def class_folder_gt(db_paths: Sequence[str]) -> GroundTruth:
    """Every image is a query; relevant = the other images in the same parent folder.

    The query itself is removed from its ranking (``exclude_query``), as is standard
    for class-folder retrieval benchmarks (e.g. Oxford Flowers 17: mAP and P@10).
    A query alone in its folder has no relevant item and is left out of the means.
    """
    paths = [os.fspath(p) for p in db_paths]
    if not paths:
        raise UsageError("the database is empty: no item paths to take class folders from")
    folders: dict[str, list[int]] = {}
    parts = [_split_path(p) for p in paths]
    for i, pp in enumerate(parts):
        folders.setdefault("/".join(pp[:-1]), []).append(i)
    if len(folders) < 2:
        raise UsageError(f"class-folder ground truth needs images in at least two class folders, but all "
                         f"{len(paths)} database images are in {next(iter(folders)) or 'one folder'!r}; "
                         f"use groups:FILE.csv to give classes explicitly")
    members = {f: frozenset(ix) for f, ix in folders.items()}
    queries = []
    for i, pp in enumerate(parts):
        folder = "/".join(pp[:-1])
        queries.append(Query(name="/".join(pp[-2:]), image=paths[i], index=i, path=paths[i],
                             relevant=members[folder] - {i}))
    return GroundTruth("folders", tuple(queries), len(paths), exclude_query=True, source="folders")


def groups_gt(csv_path: str | os.PathLike, db_paths: Sequence[str], exclude_query: bool = True) -> GroundTruth:
    """Groups from a CSV file of ``path,group`` rows (an optional ``path,group`` header).

    Every listed image is a query; relevant = the other images of its group. Paths
    are matched to the database by path, file name or stem (with folders when given);
    database images not listed are distractors. With *exclude_query* (default) the
    query is removed from its ranking; otherwise it stays and counts as relevant.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UsageError(f"groups file not found: {csv_path}")
    rows: dict[str, str] = {}
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            for lineno, row in enumerate(csv.reader(f), 1):
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if lineno == 1 and [c.strip().lower() for c in row] == ["path", "group"]:
                    continue
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise FormatError(f"{csv_path}:{lineno}: expected 'path,group', got {','.join(row)!r} "
                                      f"(quote paths that contain commas)")
                path, group = row[0].strip(), row[1].strip()
                if rows.get(path, group) != group:
                    raise FormatError(f"{csv_path}:{lineno}: {path} is listed in two groups, "
                                      f"{rows[path]!r} and {group!r}")
                rows[path] = group
    except UnicodeDecodeError as e:
        raise FormatError(f"{csv_path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise FormatError(f"{csv_path}: {e}") from None
    if not rows:
        raise FormatError(f"{csv_path}: no 'path,group' rows")
    index = _NameIndex(db_paths)
    found = index.resolve(rows, f"the groups file {csv_path}")
    if len(set(found.values())) != len(found):
        seen: dict[int, str] = {}
        for name, i in found.items():
            if i in seen:
                raise FormatError(f"{csv_path}: {seen[i]!r} and {name!r} both name database item {index.paths[i]}")
            seen[i] = name
    by_group: dict[str, set[int]] = {}
    for name, group in rows.items():
        by_group.setdefault(group, set()).add(found[name])
    members = {g: frozenset(ix) for g, ix in by_group.items()}
    queries = tuple(
        Query(name=name, image=name, index=found[name], path=index.paths[found[name]],
              relevant=members[group] - {found[name]} if exclude_query else members[group])
        for name, group in rows.items()
    )
    return GroundTruth("groups", queries, len(index.paths), exclude_query=exclude_query, source=str(csv_path))


def ukbench_gt(db_paths: Sequence[str]) -> GroundTruth:
    """UKBench (Nister & Stewenius 2006): ``ukbenchNNNNN.jpg``, group = NNNNN // 4.

    Every image is a query and stays in its own ranking: relevant = the whole group
    including the query, so a perfect ranking scores N-S 4.0 and AP 1.
    """
    paths = [os.fspath(p) for p in db_paths]
    if not paths:
        raise UsageError("the database is empty: no UKBench images")
    numbers: list[int] = []
    bad: list[str] = []
    for p in paths:
        m = re.search(r"(\d+)$", _stem(os.path.basename(p.replace("\\", "/"))))
        if m:
            numbers.append(int(m.group(1)))
        else:
            bad.append(p)
    if bad:
        raise UsageError(f"{len(bad)} of {len(paths)} database images have no UKBench number in their name "
                         f"(e.g. {', '.join(bad[:3])}); expected names like ukbench00012.jpg (group = 12 // 4)")
    if len(set(numbers)) != len(numbers):
        dup = sorted({n for n in numbers if numbers.count(n) > 1})[:3]
        raise UsageError(f"several database images share a UKBench number (e.g. {dup}); one image per number")
    groups: dict[int, set[int]] = {}
    for i, n in enumerate(numbers):
        groups.setdefault(n // 4, set()).add(i)
    members = {g: frozenset(ix) for g, ix in groups.items()}
    queries = tuple(
        Query(name=_stem(os.path.basename(p.replace("\\", "/"))), image=p, index=i, path=p,
              relevant=members[n // 4])
        for i, (p, n) in enumerate(zip(paths, numbers))
    )
    return GroundTruth("ukbench", queries, len(paths), exclude_query=False, source="ukbench")
