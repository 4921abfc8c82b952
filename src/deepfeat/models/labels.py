"""Class labels: ImageNet-1k from timm's bundled tables, or a user's labels file."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from deepfeat.errors import UsageError


@lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class descriptions in index order (e.g. 281 -> 'tabby, tabby cat')."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))


def read_labels(path: str | os.PathLike) -> list[str]:
    """One label per line. Caffe's ``synset_words.txt`` form ``n01440764 tench, Tinca tinca``
    is recognised and the WordNet id dropped."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"labels file not found: {p}")
    labels = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        head, _, rest = line.partition(" ")
        if rest and len(head) == 9 and head[0] == "n" and head[1:].isdigit():
            line = rest.strip()
        labels.append(line)
    if not labels:
        raise UsageError(f"labels file is empty: {p}")
    return labels


def default_labels(num_classes: int | None) -> list[str] | None:
    """ImageNet labels for a 1000-way classifier, else None."""
    return list(imagenet_labels()) if num_classes == 1000 else None
