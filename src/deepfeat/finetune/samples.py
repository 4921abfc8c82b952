"""The two values the fine-tuning data flows in: a usable labelled image, and one entry of an
epoch (an image or one of its augmented copies)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelledImage:
    """One usable training image: its path and its class index."""

    path: str
    label: int


@dataclass(frozen=True)
class Sample:
    """One entry of an epoch: train image *index*, its *label*, and *copy* (0 = the
    image itself, k >= 1 = its k-th augmented fill-up copy)."""

    index: int
    label: int
    copy: int = 0
