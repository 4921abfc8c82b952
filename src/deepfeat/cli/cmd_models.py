"""``deepfeat models``: the model sources and which specs are ready offline."""

from __future__ import annotations

import importlib.util

from deepfeat.cli.common import format_table, print_json


def register(sub) -> None:
    p = sub.add_parser("models", help="list model sources and the specs ready offline",
                       description="List model sources, their spec syntax, and the specs usable offline now.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _status(requires: tuple[str, ...]) -> str:
    missing = [r for r in requires if importlib.util.find_spec(r) is None]
    return "ok" if not missing else "needs " + ", ".join(missing)


def run(args) -> int:
    rows = []
    from deepfeat.models.registry import sources

    for s in sources():
        rows.append({
            "source": s.name,
            "spec": s.example if s.prefix != "embedded" else "efficientnet_lite0 | _lite1 | _lite2",
            "status": _status(s.requires),
            "description": s.description,
            "ready": s.ready() if _status(s.requires) == "ok" else [],
        })
    if args.json:
        print_json(rows)
        return 0
    print(format_table([[r["source"], r["spec"], r["status"], r["description"]] for r in rows],
                       ["source", "spec", "status", "what"]))
    ready = [spec for r in rows for spec in r["ready"]]
    print("\nready offline: " + (", ".join(ready) if ready else "(none)"))
    return 0
