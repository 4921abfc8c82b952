"""Exception types raised at deepfeat's boundaries.

Every error a user can cause (a bad spec, a missing file, an unreadable image, a
malformed prototxt) is a :class:`DeepfeatError` subclass with a message that says
what was wrong and, where it helps, what the valid choices are. The CLI turns them
into one line on stderr and an exit code instead of a traceback.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class DeepfeatError(Exception):
    """Base class of every error deepfeat raises on purpose."""

    exit_code = 1


class UsageError(DeepfeatError, ValueError):
    """A bad option or argument value."""

    exit_code = 2


class ModelError(DeepfeatError):
    """A model spec that cannot be resolved or weights that do not fit."""


class LayerError(DeepfeatError, KeyError):
    """A layer name that the model does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class ImageError(DeepfeatError):
    """An image that cannot be read or decoded."""


class StoreError(DeepfeatError):
    """A feature store that is missing, corrupt, or incompatible."""


class FormatError(DeepfeatError):
    """A file in a foreign format (prototxt, caffemodel, ground truth) that is malformed."""


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """A ' Did you mean ...?' hint for *name* among *choices*, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""
