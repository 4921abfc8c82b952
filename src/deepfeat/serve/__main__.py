"""``python -m deepfeat.serve STORE [options]``: the same as ``deepfeat serve``."""

from __future__ import annotations

import argparse
import logging
import sys

from deepfeat.cli import cmd_serve, dispatch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepfeat.serve")
    sub = parser.add_subparsers(dest="command")
    cmd_serve.register(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
