"""``--recipe FILE`` for extract/search/eval/serve: the recipe fills in what the user did not give.

Defaults of the flags a recipe can set are marked (a ``str``/``int``/``float`` subclass, so
commands without a recipe see ordinary values); after parsing, :func:`apply_recipe` replaces
the marked ones by the recipe's values and says on stderr which explicit flags override it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


class _DefaultStr(str):
    pass


class _DefaultInt(int):
    pass


class _DefaultFloat(float):
    pass


def _mark(v: Any) -> Any:
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, str):
        return _DefaultStr(v)
    if isinstance(v, int):
        return _DefaultInt(v)
    if isinstance(v, float):
        return _DefaultFloat(v)
    return v


def add_recipe_arg(p: argparse.ArgumentParser, dests: dict[str, str]) -> None:
    """Add ``--recipe`` to *p*; *dests* maps each flag's dest to the recipe value it takes
    (``"extract.pooling"``, ``"search.qe"``...)."""
    p.add_argument("--recipe", metavar="FILE",
                   help="a recipe made by `deepfeat recipe` (explicit flags override it: "
                        + ", ".join("--" + d.replace("_", "-") for d in dests) + ")")
    for action in p._actions:
        if action.dest in dests:
            action.default = _mark(action.default)
    p.set_defaults(_recipe_dests=dests)


def given(v: Any) -> bool:
    """Whether a parsed value came from the command line (not a marked default, not None)."""
    return v is not None and not isinstance(v, (_DefaultStr, _DefaultInt, _DefaultFloat))


def apply_recipe(args: argparse.Namespace, command: str) -> dict[str, Any] | None:
    """Load ``args.recipe`` (if any) and fill the flags the user left at their defaults."""
    if not getattr(args, "recipe", None):
        return None
    from deepfeat.tune.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    for dest, where in args._recipe_dests.items():
        section, key = where.split(".")
        value = recipe[section][key]
        if isinstance(value, list):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        cur = getattr(args, dest)
        if given(cur):
            if str(cur) != str(value if value is not None else ""):
                print(f"deepfeat {command}: --{dest.replace('_', '-')} {cur} overrides the recipe's "
                      f"{value if value is not None else 'none'}", file=sys.stderr)
            continue
        setattr(args, dest, value)
    return recipe
