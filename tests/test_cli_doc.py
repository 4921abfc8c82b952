"""docs/cli.md stays true: it is exactly what the argparse parsers render today."""

from __future__ import annotations

import difflib
from pathlib import Path

from deepfeat.cli import docgen

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_matches_the_parsers():
    committed = DOC.read_text(encoding="utf-8")
    generated = docgen.render()
    if committed != generated:
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), generated.splitlines(True),
                                                 "docs/cli.md (committed)", "docs/cli.md (from the parsers)"))[:40])
        raise AssertionError(f"docs/cli.md is out of date with the command-line parsers; refresh it with\n"
                             f"    PYTHONPATH=src python -m deepfeat.cli.docgen > docs/cli.md\n{diff}")


def test_cli_reference_names_every_command_and_option():
    text = docgen.render()
    for name, _, parser in docgen._subparsers(docgen.build_parser()):
        assert f"## deepfeat {name}\n" in text
        for action in parser._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert flag in text, f"deepfeat {name} {flag} is missing from docs/cli.md"
