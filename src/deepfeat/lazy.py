"""A package's public names resolved lazily (PEP 562): its submodule is imported when a name is
first asked for, so that importing the package (``deepfeat`` in a decode worker,
``deepfeat.finetune`` from a model source) does not pay for what is not used."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str], names: list[str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of *package*: ``name`` comes from the submodule
    ``exports[name]`` (relative to *package*), imported on first use and then kept."""

    def __getattr__(name: str) -> Any:
        mod = exports.get(name)
        if mod is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{mod}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__
