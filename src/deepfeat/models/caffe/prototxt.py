"""A parser for the protobuf text format, as used by Caffe's ``.prototxt`` files.

No schema is needed: a message is parsed into a :class:`Message`, an ordered mapping
from field name to the *list* of its values (every field may repeat in the text
format; for a singular field protobuf keeps the last value, which is what
:meth:`Message.get` returns). Values are ``int``, ``float``, ``str`` (quoted strings,
escapes decoded, adjacent strings joined), :class:`Ident` (bare identifiers: enum
names such as ``MAX`` or ``CONVOLUTION``, and ``true``/``false``) or nested
:class:`Message` objects.

The grammar is that of ``google.protobuf.text_format``: ``name: value``,
``name { ... }``, ``name: { ... }``, ``name < ... >``, the list short form
``name: [v1, v2]``, optional ``,``/``;`` separators and ``#`` comments. Syntax
errors raise :class:`~deepfeat.errors.FormatError` with ``file:line:column``.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

from deepfeat.errors import FormatError

__all__ = ["Ident", "Message", "parse_prototxt", "parse_text"]


class Ident(str):
    """A bare identifier in the text (an enum value name, or true/false)."""

    __slots__ = ()


_TRUE = {"true", "True", "t", "1"}
_FALSE = {"false", "False", "f", "0"}


class Message(dict):
    """One protobuf message: ``{field name: [values...]}`` in file order.

    ``where`` describes the message for error messages (e.g. ``deploy.prototxt:12:3``)
    and ``path`` names it inside the file (e.g. ``layer 'conv1' convolution_param``).
    The typed getters convert values and raise :class:`FormatError` naming the
    field, the message and the place when a value has the wrong type.
    """

    def __init__(self, where: str = "", path: str = "") -> None:
        super().__init__()
        self.where = where
        self.path = path

    # -- raw access --------------------------------------------------------
    def add(self, name: str, value: Any) -> None:
        self.setdefault(name, []).append(value)

    def all(self, name: str) -> list[Any]:
        """Every value of a (repeated) field, in order; [] when absent."""
        return list(super().get(name, ()))

    def has(self, name: str) -> bool:
        return bool(super().get(name))

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        """The last value of a singular field (protobuf semantics), or *default*."""
        vals = super().get(name)
        return vals[-1] if vals else default

    def _where(self) -> str:
        bits = [b for b in (self.where, self.path) if b]
        return " ".join(bits) if bits else "prototxt"

    def error(self, text: str) -> FormatError:
        return FormatError(f"{self._where()}: {text}")

    # -- typed access ------------------------------------------------------
    def _convert(self, name: str, v: Any, kind: str) -> Any:
        if kind == "int":
            if isinstance(v, bool):
                return int(v)
            if isinstance(v, int):
                return v
            if isinstance(v, float) and v.is_integer():
                return int(v)
        elif kind == "float":
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        elif kind == "bool":
            if isinstance(v, Ident) and (v in _TRUE or v in _FALSE):
                return v in _TRUE
            if isinstance(v, int) and v in (0, 1):
                return bool(v)
        elif kind == "str":
            if isinstance(v, str) and not isinstance(v, Ident):
                return str(v)
        elif kind == "enum":
            if isinstance(v, Ident) or (isinstance(v, int) and not isinstance(v, bool)):
                return v
            if isinstance(v, str):  # tolerate quoted enum names
                return Ident(v)
        elif kind == "msg" and isinstance(v, Message):
            return v
        expected = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a quoted string",
                    "enum": "an enum name", "msg": "a { ... } block"}[kind]
        raise self.error(f"field '{name}' must be {expected}, got {_show(v)}")

    def int(self, name: str, default: Any = None) -> Any:
        v = self.get(name)
        return default if v is None else self._convert(name, v, "int")

    def ints(self, name: str) -> list[int]:
        return [self._convert(name, v, "int") for v in self.all(name)]

    def float(self, name: str, default: Any = None) -> Any:
        v = self.get(name)
        return default if v is None else self._convert(name, v, "float")

    def floats(self, name: str) -> list[float]:
        return [self._convert(name, v, "float") for v in self.all(name)]

    def bool(self, name: str, default: Any = None) -> Any:
        v = self.get(name)
        return default if v is None else self._convert(name, v, "bool")

    def str(self, name: str, default: Any = None) -> Any:
        v = self.get(name)
        return default if v is None else self._convert(name, v, "str")

    def strs(self, name: str) -> list[str]:
        return [self._convert(name, v, "str") for v in self.all(name)]

    def enum(self, name: str, default: Any = None) -> Any:
        v = self.get(name)
        return default if v is None else self._convert(name, v, "enum")

    def msg(self, name: str) -> Message:
        """The (last) sub-message *name*, or an empty message when absent."""
        v = self.get(name)
        if v is None:
            return Message(self.where, f"{self.path} {name}".strip())
        return self._convert(name, v, "msg")

    def msgs(self, name: str) -> list[Message]:
        return [self._convert(name, v, "msg") for v in self.all(name)]

    def check_fields(self, known: set[str] | frozenset[str]) -> None:
        """Raise for a field the schema does not have (a typo protobuf would refuse)."""
        for name in self:
            if name not in known:
                raise self.error(f"unknown field '{name}' (known fields: {', '.join(sorted(known))})")

    def __repr__(self) -> str:
        return f"Message({dict.__repr__(self)})"


def _show(v: Any) -> str:
    if isinstance(v, Message):
        return "a { ... } block"
    if isinstance(v, Ident):
        return str(v)
    return repr(v)


# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n\f\v]+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>-?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[fF]?(?![A-Za-z0-9_]))
  | (?P<ident>-?[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[{}<>\[\]:,;])
    """,
    re.VERBOSE,
)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v",
            "\\": "\\", "'": "'", '"': '"', "?": "?"}


class _Tok:
    __slots__ = ("col", "kind", "line", "text")

    def __init__(self, kind: str, text: str, line: int, col: int) -> None:
        self.kind, self.text, self.line, self.col = kind, text, line, col


def _tokenize(text: str, name: str) -> list[_Tok]:
    toks: list[_Tok] = []
    pos, line, line_start, n = 0, 1, 0, len(text)
    while pos < n:
        m = _TOKEN.match(text, pos)
        if m is None:
            col = pos - line_start + 1
            raise FormatError(f"{name}:{line}:{col}: unexpected character {text[pos]!r}")
        kind = m.lastgroup
        tok_text = m.group()
        if kind not in ("ws", "comment"):
            toks.append(_Tok(kind, tok_text, line, pos - line_start + 1))
        nl = tok_text.count("\n")
        if nl:
            line += nl
            line_start = pos + tok_text.rindex("\n") + 1
        pos = m.end()
    toks.append(_Tok("eof", "", line, pos - line_start + 1))
    return toks


def _unescape(tok: _Tok, name: str) -> str:
    """The value of a quoted string token: C escapes; ``\\x``/octal escapes are bytes,
    decoded as UTF-8 together with the rest."""
    body = tok.text[1:-1]
    if "\\" not in body:
        return body
    raw = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            raw.extend(c.encode("utf-8"))
            i += 1
            continue
        e = body[i + 1]
        if e in _ESCAPES:
            raw.extend(_ESCAPES[e].encode())
            i += 2
        elif e in "xX":
            m = re.match(r"[0-9a-fA-F]{1,2}", body[i + 2:])
            if not m:
                raise FormatError(f"{name}:{tok.line}:{tok.col}: bad \\x escape in string {tok.text}")
            raw.append(int(m.group(), 16))
            i += 2 + len(m.group())
        elif e in "01234567":
            digits = re.match(r"[0-7]{1,3}", body[i + 1:]).group()  # type: ignore[union-attr]
            raw.append(int(digits, 8) & 0xFF)
            i += 1 + len(digits)
        else:
            raise FormatError(f"{name}:{tok.line}:{tok.col}: unknown escape '\\{e}' in string {tok.text}")
    return raw.decode("utf-8", errors="replace")


def _number(tok: _Tok) -> int | float:
    t = tok.text
    if t[-1] in "fF" and not t.lower().startswith(("0x", "-0x")):
        return float(t[:-1])
    if "x" in t.lower():
        return int(t, 16)
    if any(c in t for c in ".eE"):
        return float(t)
    return int(t)


_SPECIAL_FLOATS = {"inf": math.inf, "-inf": -math.inf, "infinity": math.inf, "-infinity": -math.inf,
                   "nan": math.nan, "-nan": math.nan}


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, name: str) -> None:
        self.name = name
        self.toks = _tokenize(text, name)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def fail(self, tok: _Tok, what: str) -> FormatError:
        got = "end of file" if tok.kind == "eof" else repr(tok.text)
        return FormatError(f"{self.name}:{tok.line}:{tok.col}: expected {what}, got {got}")

    def expect(self, text: str) -> _Tok:
        t = self.next()
        if t.kind != "punct" or t.text != text:
            raise self.fail(t, f"'{text}'")
        return t

    def message(self, close: str | None, path: str, start: _Tok | None) -> Message:
        where = f"{self.name}:{start.line}" if start is not None else self.name
        msg = Message(where, path)
        while True:
            t = self.peek()
            if close is None and t.kind == "eof":
                return msg
            if close is not None and t.kind == "punct" and t.text == close:
                self.next()
                return msg
            if t.kind == "eof":
                raise FormatError(
                    f"{self.name}:{t.line}:{t.col}: unexpected end of file: the block opened at "
                    f"line {start.line if start else '?'} is not closed with '{close}'"
                )
            self.field(msg, path)
            t = self.peek()
            if t.kind == "punct" and t.text in ",;":
                self.next()

    def field(self, msg: Message, path: str) -> None:
        t = self.next()
        if t.kind == "punct" and t.text == "[":  # [extension.name] or [type.googleapis.com/x]
            raise FormatError(f"{self.name}:{t.line}:{t.col}: extensions and Any fields are not supported")
        if t.kind != "ident" or t.text.startswith("-"):
            raise self.fail(t, "a field name")
        fname = t.text
        sub_path = f"{path} {fname}".strip() if path else fname
        nxt = self.peek()
        if nxt.kind == "punct" and nxt.text == ":":
            self.next()
            nxt = self.peek()
            if nxt.kind == "punct" and nxt.text == "[":
                self.next()
                self.list_values(msg, fname, sub_path)
                return
            if nxt.kind == "punct" and nxt.text in "{<":
                self.next()
                msg.add(fname, self.message("}" if nxt.text == "{" else ">", sub_path, nxt))
                return
            msg.add(fname, self.scalar())
            return
        if nxt.kind == "punct" and nxt.text in "{<":
            self.next()
            msg.add(fname, self.message("}" if nxt.text == "{" else ">", sub_path, nxt))
            return
        raise self.fail(nxt, f"':' or '{{' after field name '{fname}'")

    def list_values(self, msg: Message, fname: str, path: str) -> None:
        t = self.peek()
        if t.kind == "punct" and t.text == "]":
            self.next()
            return
        while True:
            t = self.peek()
            if t.kind == "punct" and t.text in "{<":
                self.next()
                msg.add(fname, self.message("}" if t.text == "{" else ">", path, t))
            else:
                msg.add(fname, self.scalar())
            t = self.next()
            if t.kind == "punct" and t.text == "]":
                return
            if not (t.kind == "punct" and t.text == ","):
                raise self.fail(t, "',' or ']' in a list")

    def scalar(self) -> Any:
        t = self.next()
        if t.kind == "string":
            s = _unescape(t, self.name)
            while self.peek().kind == "string":  # "abc" "def" is "abcdef"
                s += _unescape(self.next(), self.name)
            return s
        if t.kind == "number":
            try:
                return _number(t)
            except ValueError:
                raise self.fail(t, "a number") from None
        if t.kind == "ident":
            low = t.text.lower()
            if low in _SPECIAL_FLOATS:
                return _SPECIAL_FLOATS[low]
            if t.text.startswith("-"):
                raise self.fail(t, "a value")
            return Ident(t.text)
        raise self.fail(t, "a value")


def parse_text(text: str, name: str = "<prototxt>") -> Message:
    """Parse protobuf text format into a :class:`Message` (*name* is used in errors)."""
    text = text.removeprefix("\ufeff")
    p = _Parser(text, name)
    return p.message(None, "", None)


def parse_prototxt(path: str | os.PathLike) -> Message:
    """Read and parse a ``.prototxt`` file; a missing or binary file is a clear error."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FormatError(f"prototxt not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(
            f"{path} is not a text prototxt (not UTF-8 text); is it a binary .caffemodel? "
            "The spec is caffe:DEPLOY.prototxt@WEIGHTS.caffemodel"
        ) from None
    return parse_text(text, os.path.basename(path))

