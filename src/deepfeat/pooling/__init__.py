"""Pooling (being split into a package; see ``registry``)."""

from .registry import *  # noqa: F401,F403
from .registry import EPS, MOP_FILE_KIND, MOP_FORMAT_VERSION, __all__  # noqa: F401
