"""The one spec grammar: ``name[:key=value,key=value][+name...]``.

Every spec kind (poolings, re-rankers, local features, spatial verification,
post-processing steps, model options) is parsed here, by one tokenizer and one set of
typed parameters, so they share these rules (``docs/specs.md`` has examples):

1. **Parts.** A spec is one part, or several joined by ``+`` where the kind allows
   concatenation (poolings: ``rmac:L=3+mac``). A ``+`` starts a new part only when a
   name follows it, so a number such as ``1e+3`` stays one value.
2. **Names.** A part starts with a name from the kind's registry. Case, ``-`` and ``_``
   do not matter (``R-MAC`` = ``rmac``, ``k_reciprocal`` = ``kreciprocal``); aliases
   are listed in each registry. An unknown name is an error that lists the valid ones.
3. **Parameters.** After ``:``, parameters joined by ``,``, each ``key=value``. Keys
   are case-insensitive. Kinds that allow it also take bare values, in the order of
   their parameters, before any ``key=value`` (``gem:3`` = ``gem:p=3``). Spaces around
   tokens are ignored; ``name:`` with nothing after the colon is the defaults.
4. **Values** are typed: ``int`` (``3``; ``3.0`` is accepted), ``float`` (a finite
   number; a fraction ``a/b`` such as ``1/255`` is accepted wherever one number is
   expected), ``bool`` (``1/0``, ``true/false``, ``yes/no``, ``on/off``), ``choice``
   (one of a listed set, case-insensitive), ``text`` (anything without ``,``), and the
   lists ``ints`` and ``floats``, whose items are joined by ``/`` (``windows=128/64``,
   ``scales=1/0.707``): inside a spec ``,`` already separates parameters, so a list
   item cannot itself be a fraction. A list that stands alone (``--scales``) joins its
   items by ``,`` and each may be a fraction (:func:`parse_scales`).
5. **Canonical form.** Parsing then formatting gives the canonical spec: the registry
   name, then the parameters in registry order, each ``key=value``; a parameter marked
   ``shown=False`` only when it differs from its default. This is the string stores,
   indexes and results record, and it parses back to the same thing.

Two documented variants keep the spellings README and docs show, parsed with the same
typed parameters: the post-processing chain joins *steps* by ``,`` and a step's
arguments by ``:`` (``l2,pca-whiten:128:shrink=0.5,l2``), and model options follow the
model spec as a query, ``SPEC?key=value&key=value`` (:func:`parse_query`).

Errors are :class:`~deepfeat.errors.UsageError`\\ s that name the valid names or
parameters. :data:`SPEC_KINDS` lists every registered spec kind (each registers
itself when its module is imported) with a function that returns a spec's canonical
form, so the tests run over all of them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deepfeat.errors import UsageError, suggest

KINDS = ("int", "float", "bool", "choice", "text", "ints", "floats")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _always(v: Any) -> bool:
    return True


@dataclass(frozen=True)
class Param:
    """One typed parameter of a spec: its name, type (one of :data:`KINDS`), default, the
    rule valid values follow (said in error messages) and the check of that rule."""

    name: str
    kind: str
    default: Any
    rule: str  # what valid values are, for error messages
    check: Callable[[Any], bool] = _always
    shown: bool = True  # always in the canonical spec (else only when not the default)
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    doc: str = ""
    bare: bool = False  # written as a bare value in the canonical spec (post-processing steps)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"parameter {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")


def name_key(name: str) -> str:
    """How names are compared: case, '-' and '_' do not matter."""
    return name.strip().lower().replace("-", "").replace("_", "")


def parse_number(text: Any, what: str, positive: bool = False) -> float:
    """A finite number from a number or text; text may be a fraction ``a/b`` (``1/255``)."""
    try:
        if isinstance(text, str) and "/" in text:
            num, den = text.split("/", 1)
            f = float(num) / float(den)
        else:
            f = float(text)
    except (TypeError, ValueError, ZeroDivisionError):
        raise UsageError(f"{what} must be a number (or a fraction such as 1/255), not {text!r}") from None
    if not math.isfinite(f):
        raise UsageError(f"{what} must be finite, not {text!r}")
    if positive and f <= 0:
        raise UsageError(f"{what} must be positive, not {text!r}")
    return f


def _convert(p: Param, t: str) -> Any:
    """*t* as *p*'s type; ValueError when it is not one."""
    if p.kind in ("int", "float"):
        try:
            f = parse_number(t, p.name)
        except UsageError:
            raise ValueError(t) from None
        if p.kind == "float":
            return f
        if not f.is_integer():
            raise ValueError(t)
        return int(f)
    if p.kind == "bool":
        if t.lower() in _TRUE:
            return True
        if t.lower() in _FALSE:
            return False
        raise ValueError(t)
    if p.kind == "choice":
        if t.lower() not in p.choices:
            raise ValueError(t)
        return t.lower()
    if p.kind == "text":
        if not t:
            raise ValueError(t)
        return t
    items = t.split("/")  # ints, floats
    cast = int if p.kind == "ints" else float
    vals = tuple(cast(s.strip()) for s in items)
    if p.kind == "floats" and not all(math.isfinite(v) for v in vals):
        raise ValueError(t)
    return vals


def format_float_repr(v: float) -> str:
    """``3.0`` -> ``3``, ``0.25`` -> ``0.25`` (the shortest exact form)."""
    v = float(v)
    return repr(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def format_float_g(v: float) -> str:
    """Six significant digits (``0.9``, ``3``)."""
    return f"{float(v):g}"


#: the messages a spec kind gives; each may be replaced per kind (fields in braces)
MESSAGES = {
    "empty": "empty {what} spec; valid {plural}: {names}",
    "unknown_name": "unknown {what} {name!r}; valid {plural}: {names}.{hint}",
    "no_params": "{what} {kind!r} takes no parameters, got {raw!r}",
    "unknown_param": "{what} {kind!r} has no parameter {key!r}; its parameters are: {params}{hint}",
    "positional": "{what} spec {raw!r}: write parameters as name=value ({params}), e.g. {syntax}",
    "empty_param": "{what} spec {raw!r} has an empty parameter",
    "twice": "{what} spec {raw!r} sets {key} twice",
    "bad_value": "{what} {kind!r}: {key} must be {rule}, got {value!r}",
}


@dataclass
class Part:
    """One parsed part: the registry entry, every parameter's value, and those given."""

    kind: Any
    params: dict[str, Any]
    given: set[str]
    text: str


@dataclass
class SpecKind:
    """One kind of spec: its registry (name -> entry with ``name``, ``params`` and
    optionally ``aliases``), what joins its parts and arguments, and its messages.

    The registry is read at every parse, so entries added at run time count.
    """

    what: str  # "pooling", for messages
    registry: Mapping[str, Any]
    plural: str = ""
    joiner: str | None = None  # "+" where parts concatenate
    arg_sep: str = ","
    positional: bool = False  # bare values allowed (in parameter order, before key=value)
    float_format: Callable[[float], str] = format_float_repr
    messages: dict[str, str] = field(default_factory=dict)

    def _msg(self, which: str, **kw: Any) -> UsageError:
        kw.setdefault("what", self.what)
        kw.setdefault("plural", self.plural or self.what + "s")
        kw.setdefault("names", ", ".join(self.registry))
        return UsageError(self.messages.get(which, MESSAGES[which]).format(**kw))

    def lookup(self, name: str) -> Any:
        """The registry entry called *name* (or one of its aliases)."""
        key = name_key(name)
        for entry in self.registry.values():
            if key == name_key(entry.name) or key in (name_key(a) for a in getattr(entry, "aliases", ())):
                return entry
        raise self._msg("unknown_name", name=name.strip(), raw=name.strip(),
                        hint=suggest(name.strip().lower(), self.registry))

    def split(self, spec: str) -> list[str]:
        """The parts of *spec* (one unless the kind joins parts)."""
        if not isinstance(spec, str) or not spec.strip():
            raise self._msg("empty")
        spec = spec.strip()
        if self.joiner == "+":
            return _SPLIT_PLUS.split(spec)
        if self.joiner:
            return spec.split(self.joiner)
        return [spec]

    def format_value(self, p: Param, v: Any) -> str:
        if p.kind == "bool":
            return "1" if v else "0"
        if p.kind == "ints":
            return "/".join(str(int(w)) for w in v)
        if p.kind == "floats":
            return "/".join(self.float_format(w) for w in v)
        if p.kind == "float":
            return self.float_format(v)
        return str(v)

    def params_of(self, kind: Any) -> tuple[Param, ...]:
        return tuple(kind.params)

    def syntax(self, kind: Any) -> str:
        """``name:key=default,...`` with the parameters always shown."""
        shown = [p for p in self.params_of(kind) if p.shown]
        if not shown:
            return kind.name
        return kind.name + ":" + ",".join(
            f"{p.name}={self.format_value(p, p.default) if p.default is not None else '...'}" for p in shown)

    def parse_value(self, kind: Any, p: Param, text: str, raw: str) -> Any:
        """*text* as parameter *p* of *kind*, checked against its rule."""
        t = text.strip()
        try:
            v = _convert(p, t)
        except ValueError:
            v = None
            ok = False
        else:
            ok = p.check(v)
        if not ok:
            raise self._msg("bad_value", kind=kind.name, key=p.name, rule=p.rule, value=t, raw=raw)
        return v

    def parse_args(self, kind: Any, argstr: str, raw: str) -> tuple[dict[str, Any], set[str]]:
        """``key=value,...`` (after the name) -> (every parameter's value, those given)."""
        params_ = self.params_of(kind)
        params = {p.name: p.default for p in params_}
        given: set[str] = set()
        if not argstr.strip():
            return params, given
        names = ", ".join(p.name for p in params_)
        keyed = ", ".join(p.name + "=..." for p in params_)
        fields = {"kind": kind.name, "raw": raw, "params": names, "keyed": keyed, "syntax": self.syntax(kind)}
        if not params_:
            raise self._msg("no_params", **fields)
        by_key: dict[str, Param] = {}
        for p in params_:
            for k in (p.name, *p.aliases):
                by_key[k.lower()] = p
        order = [p for p in params_ if p.shown]
        positional_ok = self.positional
        for i, arg in enumerate(a.strip() for a in argstr.split(self.arg_sep)):
            if not arg:
                raise self._msg("empty_param", **fields)
            if "=" in arg:
                k, _, v = arg.partition("=")
                p_ = by_key.get(k.strip().lower())
                if p_ is None:
                    raise self._msg("unknown_param", key=k.strip(), arg=arg,
                                    hint=suggest(k.strip(), [q.name for q in params_]), **fields)
                positional_ok = False
            else:
                if not positional_ok or i >= len(order):
                    raise self._msg("positional", key=arg, arg=arg, hint="", **fields)
                p_, v = order[i], arg
            if p_.name in given:
                raise self._msg("twice", key=p_.name, **fields)
            params[p_.name] = self.parse_value(kind, p_, v, raw)
            given.add(p_.name)
        return params, given

    def parse_part(self, text: str) -> Part:
        """``name[:key=value,...]`` -> :class:`Part`."""
        raw = text.strip()
        name, _, argstr = raw.partition(":")
        kind = self.lookup(name)
        params, given = self.parse_args(kind, argstr, raw)
        return Part(kind, params, given, raw)

    def parse(self, spec: str) -> list[Part]:
        """Every part of *spec*."""
        return [self.parse_part(t) for t in self.split(spec)]

    def canonical(self, kind: Any, params: Mapping[str, Any]) -> str:
        """The canonical spec of one part (rule 5 of the module docstring)."""
        args = []
        for p in self.params_of(kind):
            v = params.get(p.name)
            if v is None or v == "":
                continue
            if p.shown or v != p.default:
                value = self.format_value(p, v)
                args.append(value if p.bare else f"{p.name}={value}")
        return kind.name + (":" + self.arg_sep.join(args) if args else "")


_SPLIT_PLUS = re.compile(r"\+(?=\s*[A-Za-z])")


@dataclass(frozen=True)
class RegisteredSpecKind:
    """A spec kind in :data:`SPEC_KINDS`: its grammar and *canonical* (a spec -> its canonical
    form, through the kind's own parser)."""

    name: str
    grammar: SpecKind | None
    canonical: Callable[[str], str]


#: every spec kind, by name; each adds itself when its module is imported
SPEC_KINDS: dict[str, RegisteredSpecKind] = {}


def register_spec_kind(name: str, grammar: SpecKind | None, canonical: Callable[[str], str]) -> None:
    SPEC_KINDS[name] = RegisteredSpecKind(name, grammar, canonical)


def parse_scales(text: str | Any | None) -> tuple[float, ...]:
    """A scale list: ``"1,0.707,1/2"`` -> ``(1.0, 0.707, 0.5)``.

    Items are joined by ``,`` and each is a number or a fraction ``a/b``; every scale is
    in (0, 4]. A sequence of numbers is checked the same way; None or ``""`` is ``(1.0,)``.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        return (1.0,)
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    vals = []
    for s in items:
        try:
            vals.append(parse_number(s, "scale"))
        except UsageError:
            raise UsageError(f"scales {text!r}: {s!r} is not a number (use e.g. 1,0.707,0.5 or 1,1/2)") from None
    if not vals or any(not 0 < v <= 4 for v in vals):
        raise UsageError(f"scales {text!r}: every scale must be in (0, 4]")
    return tuple(vals)


def parse_query(query: str, spec: str, params: Mapping[str, Param] | None = None) -> dict[str, Any]:
    """Model options: ``a=1&b=x`` -> ``{"a": "1", "b": "x"}`` (values as text), or typed and
    checked against *params* (name -> :class:`Param`) when given."""
    from urllib.parse import parse_qsl

    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise UsageError(f"options after '?' in {spec!r} must be key=value pairs joined by '&'") from None
    if params is None:
        return dict(pairs)
    out: dict[str, Any] = {}
    for k, v in pairs:
        p = params.get(k.lower())
        if p is None:
            raise UsageError(f"model spec {spec!r}: unknown option {k!r}; options: {', '.join(params)}"
                             f"{suggest(k, params)}")
        try:
            val = _convert(p, v.strip())
        except ValueError:
            val, ok = None, False
        else:
            ok = p.check(val)
        if not ok:
            raise UsageError(f"model spec {spec!r}: {p.name} must be {p.rule}, got {v!r}")
        out[p.name] = val
    return out


def canonical_query(options: Mapping[str, Any]) -> str:
    """Options as ``key=value&...`` in the given order (the inverse of :func:`parse_query`)."""
    return "&".join(f"{k}={v}" for k, v in options.items())
