"""The command-line reference, docs/cli.md, rendered from the argparse parsers themselves.

``python -m deepfeat.cli.docgen > docs/cli.md`` refreshes it; tests/test_cli_doc.py
fails when the committed file and the parsers disagree. Usage lines are wrapped at a
fixed width, so the output does not depend on the terminal.
"""

from __future__ import annotations

import argparse
import sys

from deepfeat.cli import build_parser

WIDTH = 100
REFRESH = "python -m deepfeat.cli.docgen > docs/cli.md"


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) for every subcommand, in the order `deepfeat --help` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, helps.get(name, ""), p) for name, p in action.choices.items()]
    return []


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=WIDTH, max_help_position=32)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=WIDTH)
    text = formatter._expand_help(action) if action.help else ""
    return " ".join(text.split())


def _invocation(action: argparse.Action) -> str:
    """`-o, --output STORE`, `--resume`, `INPUT`: the option strings with the metavar once."""
    if not action.option_strings:
        return action.metavar or action.dest
    flags = ", ".join(action.option_strings)
    if action.nargs == 0:
        return flags
    if action.metavar is not None:
        metavar = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        metavar = action.dest.upper()
    return f"{flags} {metavar}"


def _details(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    text = _help_text(parser, action)
    extra = []
    if action.choices is not None and action.option_strings and (action.metavar is None or "{" not in text):
        listed = all(str(c) in text for c in action.choices)
        if not listed and action.metavar is not None:
            extra.append("one of " + ", ".join(f"`{c}`" for c in action.choices))
    default = action.default
    shown = default not in (None, False, argparse.SUPPRESS) and not (isinstance(default, list) and not default)
    if shown and action.option_strings and action.nargs != 0 and "default" not in text.lower():
        extra.append(f"default `{default}`")
    if action.required and action.option_strings:
        extra.append("required")
    if extra:
        text = f"{text} ({'; '.join(extra)})" if text else "; ".join(extra)
    return text


def _description(parser: argparse.ArgumentParser) -> str:
    text = parser.description or ""
    if parser.formatter_class is argparse.RawDescriptionHelpFormatter:
        return f"```text\n{text.strip()}\n```"
    return " ".join(text.split())


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.help is not argparse.SUPPRESS
                   and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
        if not actions:
            continue
        title = group.title or "options"
        lines += ["", f"{title[0].upper()}{title[1:]}:", ""]
        for action in actions:
            details = _details(parser, action)
            lines.append(f"- `{_invocation(action)}`" + (f": {details}" if details else ""))
    return lines


def render() -> str:
    """docs/cli.md: every subcommand's usage, description and options, as Markdown."""
    parser = build_parser()
    commands = _subparsers(parser)
    out = [
        "# Command-line reference",
        "",
        f"Generated from the argparse parsers by `{REFRESH}`; do not edit by hand",
        "(tests/test_cli_doc.py fails when this file and the parsers disagree).",
        "Exit codes: 0 success, 1 failure (for batch commands: nothing could be processed),",
        "2 bad usage, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM, `extract`).",
        "",
        "```text",
        _usage(parser),
        "```",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    out += [f"| [`{name}`](#deepfeat-{name}) | {help_} |" for name, help_, _ in commands]
    out += _options(parser)
    for name, help_, sub in commands:
        out += ["", f"## deepfeat {name}", "", f"{help_[0].upper()}{help_[1:]}." if help_ else "",
                "", "```text", _usage(sub), "```"]
        description = _description(sub)
        if description:
            out += ["", description]
        out += _options(sub)
    return "\n".join(line for line in _squeeze(out)) + "\n"


def _squeeze(lines: list[str]) -> list[str]:
    """No two blank lines in a row."""
    kept: list[str] = []
    for line in lines:
        if line == "" and kept and kept[-1] == "":
            continue
        kept.append(line.rstrip())
    return kept


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
