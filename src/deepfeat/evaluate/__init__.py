"""Retrieval evaluation (being split into a package; see ``loaders``)."""

from .loaders import *  # noqa: F401,F403
from .loaders import __all__  # noqa: F401
