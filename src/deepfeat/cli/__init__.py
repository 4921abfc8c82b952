"""The ``deepfeat`` command: parse arguments, call the library, print.

Each command lives in its own ``cmd_*`` module with ``register(subparsers)``; this
module only assembles them and maps errors to exit codes (:func:`dispatch`, the one boundary):
0 success, 1 failure (nothing could be done / a file was bad: a :class:`DeepfeatError`, an
``OSError`` from the file system, a ``MemoryError``), 2 usage error, 130 interrupted,
143 terminated (SIGTERM; `extract` stops as cleanly as on Ctrl-C). Anything else is a bug
in deepfeat and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from deepfeat import __version__
from deepfeat.errors import DeepfeatError

COMMAND_MODULES = (
    "cmd_models",
    "cmd_layers",
    "cmd_classify",
    "cmd_fit_classifier",
    "cmd_clusters",
    "cmd_outliers",
    "cmd_map",
    "cmd_check_images",
    "cmd_extract",
    "cmd_sync",
    "cmd_export",
    "cmd_remove",
    "cmd_postprocess",
    "cmd_compute_ap",
    "cmd_search",
    "cmd_local_features",
    "cmd_duplicates",
    "cmd_sweep",
    "cmd_recipe",
    "cmd_densemap",
    "cmd_visualize",
    "cmd_finetune",
    "cmd_serve",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepfeat",
        description="Pretrained CNNs as image retrieval and classification systems.",
    )
    parser.add_argument("--version", action="version", version=f"deepfeat {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(levelname)s %(name)s: %(message)s",
    )
    return dispatch(args)


def dispatch(args: argparse.Namespace) -> int:
    """Run a parsed command (``args.func``) and turn what it raises into an exit code and a line on stderr."""
    try:
        return int(args.func(args) or 0)
    except DeepfeatError as e:
        return _one_line(args.command, str(e), e.exit_code)
    except KeyboardInterrupt:
        print(f"deepfeat {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `deepfeat ... | head`
        return 0
    except OSError as e:  # the file system said no: full disk, read-only, missing, a folder for a file...
        return _one_line(args.command, os_error_line(e), 1)
    except MemoryError as e:
        return _one_line(args.command, f"out of memory{': ' + str(e) if str(e) else ''} (a smaller input, "
                                       "batch or index, or a machine with more memory)", 1)


def os_error_line(e: OSError) -> str:
    """``cannot write /x/meta.json: No space left on device``: the file and the system's reason."""
    name = str(e.filename or "")
    if "/." in name and ".tmp-" in name:  # an atomic write's temporary name: say the real file's
        head, _, tail = name.rpartition("/.")
        name = f"{head}/{tail.split('.tmp-')[0]}"
    what = f" {name}" if name else ""
    if e.filename2:
        what += f" -> {e.filename2}"
    return f"cannot use{what}: {e.strerror or e}" if what else f"{e.strerror or e}"


def _one_line(command: str, message: str, code: int) -> int:
    """The error on stderr as ``deepfeat COMMAND: error: MESSAGE`` (one line; a message that lists
    several differences, like a refused append, continues on indented lines)."""
    print(f"deepfeat {command}: error: {message}", file=sys.stderr)
    return code


def run() -> None:
    sys.exit(main())
