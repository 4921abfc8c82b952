"""A parsed deploy prototxt as a plain net definition, whatever the Caffe format.

Caffe has written three syntaxes over the years; deploy files in the wild use two:

* current (2015-): ``layer { name: "conv1" type: "Convolution" ... }``, inputs given
  by an ``Input`` layer, by ``input: "data"`` + ``input_shape { dim: ... }`` or by the
  legacy ``input_dim`` list (four numbers per input);
* V1 (2014): ``layers { name: "conv1" type: CONVOLUTION ... }`` with enum types and
  ``input_dim``.

Both become a :class:`NetDef`: the inputs with their shapes and the layers, in file
order, with current type names, after Caffe's ``NetState`` filtering (phase TEST,
level 0, no stages unless given) of ``include``/``exclude`` rules. The even older V0
syntax (``layers { layer { ... } }``) is refused with a clear message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from deepfeat.models.caffe.prototxt import Ident, Message, parse_prototxt
from deepfeat.models.caffe.v1types import V1_ENUM_NAMES, V1_TYPES

NET_FIELDS = frozenset({"name", "input", "input_shape", "input_dim", "force_backward", "state", "debug_info",
                        "layer", "layers"})
LAYER_FIELDS = frozenset({"name", "type", "bottom", "top", "phase", "loss_weight", "param", "blobs",
                          "propagate_down", "include", "exclude"})
V1_LAYER_FIELDS = frozenset({"name", "type", "bottom", "top", "include", "exclude", "blobs", "param",
                             "blob_share_mode", "blobs_lr", "weight_decay", "loss_weight"})
RULE_FIELDS = frozenset({"phase", "min_level", "max_level", "stage", "not_stage"})


@dataclass
class LayerDef:
    """One layer of the net: Caffe name and type, blob connections, its whole message."""

    name: str
    type: str
    bottoms: list[str]
    tops: list[str]
    msg: Message
    index: int

    @property
    def label(self) -> str:
        """How error messages name this layer: ``layer 'conv1' (Convolution, deploy.prototxt:12)``."""
        return f"layer '{self.name}' ({self.type}, {self.msg.where})" if self.msg.where else \
            f"layer '{self.name}' ({self.type})"

    def param(self, name: str, known: frozenset[str] | None = None) -> Message:
        """The ``<name>`` parameter block (empty if absent), its fields checked against *known*."""
        p = self.msg.msg(name)
        p.path = f"layer '{self.name}' {name}"
        if known is not None:
            p.check_fields(known)
        return p


@dataclass
class InputDef:
    """A net input: blob name, declared shape (None if not declared), the Input layer if any."""

    blob: str
    shape: tuple[int, ...] | None
    layer: str | None = None


@dataclass
class NetDef:
    name: str
    inputs: list[InputDef]
    layers: list[LayerDef]
    format: str  # "v2" or "v1"
    source: str = ""
    notes: list[str] = field(default_factory=list)


def _shape_of(msg: Message) -> tuple[int, ...]:
    dims = msg.ints("dim")
    if any(d < 0 for d in dims):
        raise msg.error(f"negative dimension in shape {dims}")
    return tuple(dims)


def _phase(v: object, where: Message) -> int:
    if isinstance(v, Ident):
        if v == "TRAIN":
            return 0
        if v == "TEST":
            return 1
    if isinstance(v, int) and v in (0, 1):
        return v
    raise where.error(f"phase must be TRAIN or TEST, not {v!r}")


def _meets(rule: Message, phase: int, level: int, stages: Sequence[str]) -> bool:
    """Caffe's ``StateMeetsRule``."""
    rule.check_fields(RULE_FIELDS)
    if rule.has("phase") and _phase(rule.get("phase"), rule) != phase:
        return False
    if rule.has("min_level") and level < rule.int("min_level"):
        return False
    if rule.has("max_level") and level > rule.int("max_level"):
        return False
    if any(s not in stages for s in rule.strs("stage")):
        return False
    return not any(s in stages for s in rule.strs("not_stage"))


def _included(msg: Message, phase: int, level: int, stages: Sequence[str]) -> bool:
    includes, excludes = msg.msgs("include"), msg.msgs("exclude")
    if includes and excludes:
        raise msg.error("a layer may have include or exclude rules, not both")
    if includes:
        return any(_meets(r, phase, level, stages) for r in includes)
    return not any(_meets(r, phase, level, stages) for r in excludes)


def _v1_type(v: object, msg: Message) -> str:
    if isinstance(v, Ident):
        if v in V1_ENUM_NAMES:
            return V1_TYPES[V1_ENUM_NAMES[v]]
        raise msg.error(f"unknown V1 layer type {v} (V1 types are enum names such as CONVOLUTION, POOLING)")
    if isinstance(v, int) and not isinstance(v, bool):
        if v in V1_TYPES:
            return V1_TYPES[v]
        raise msg.error(f"unknown V1 layer type number {v}")
    if isinstance(v, str):  # a current-style string type inside a V1 layers block; accept it
        return v
    raise msg.error("layer has no type")


def netdef_from_message(net: Message, source: str = "", *, phase: str = "TEST", level: int = 0,
                        stages: Sequence[str] = ()) -> NetDef:
    """Turn a parsed prototxt into a :class:`NetDef` (see the module docstring)."""
    net.check_fields(NET_FIELDS)
    ph = {"TRAIN": 0, "TEST": 1}.get(phase)
    if ph is None:
        raise ValueError(f"phase must be TRAIN or TEST, not {phase!r}")
    v2, v1 = net.msgs("layer"), net.msgs("layers")
    if v2 and v1:
        raise net.error("the prototxt mixes 'layer { }' (current) and 'layers { }' (V1) blocks; Caffe refuses that too")
    fmt = "v1" if v1 else "v2"
    notes: list[str] = []

    # -- header inputs ---------------------------------------------------------
    names = net.strs("input")
    shapes = [_shape_of(m) for m in net.msgs("input_shape")]
    dims = net.ints("input_dim")
    if shapes and dims:
        raise net.error("give input shapes with input_shape or input_dim, not both")
    if dims:
        if len(dims) != 4 * len(names):
            raise net.error(f"{len(names)} input(s) need {4 * len(names)} input_dim values (4 each), "
                            f"got {len(dims)}")
        shapes = [tuple(dims[4 * i:4 * i + 4]) for i in range(len(names))]
    if shapes and len(shapes) != len(names):
        raise net.error(f"{len(names)} input(s) but {len(shapes)} input_shape blocks")
    inputs = [InputDef(n, shapes[i] if shapes else None) for i, n in enumerate(names)]

    # -- layers ------------------------------------------------------------------
    layers: list[LayerDef] = []
    for i, lm in enumerate(v1 or v2):
        if fmt == "v1" and lm.has("layer"):
            raise lm.error("this is the V0 prototxt format (layers { layer { ... } }), from before 2014; "
                           "upgrade it with Caffe's upgrade_net_proto_text tool")
        name = lm.str("name", "")
        lm.path = f"layer '{name}'" if name else f"layer #{i}"
        for k in lm:
            known = V1_LAYER_FIELDS if fmt == "v1" else LAYER_FIELDS
            if k not in known and not k.endswith("_param"):
                raise lm.error(f"unknown field '{k}' in a layer")
        if not lm.has("type"):
            raise lm.error("layer has no type")
        typ = _v1_type(lm.get("type"), lm) if fmt == "v1" else lm.str("type")
        if not _included(lm, ph, level, stages):
            notes.append(f"layer '{name}' ({typ}) skipped by its include/exclude rules")
            continue
        ld = LayerDef(name or f"{typ.lower()}{i}", typ, lm.strs("bottom"), lm.strs("top"), lm, len(layers))
        if typ == "Input":
            p = ld.param("input_param", frozenset({"shape"}))
            in_shapes = [_shape_of(m) for m in p.msgs("shape")]
            if not ld.tops:
                raise lm.error("Input layer has no top")
            if ld.bottoms:
                raise lm.error("Input layer cannot have bottoms")
            if in_shapes and len(in_shapes) not in (1, len(ld.tops)):
                raise lm.error(f"Input layer has {len(ld.tops)} tops but {len(in_shapes)} shapes "
                               "(give one shape, or one per top)")
            for j, top in enumerate(ld.tops):
                shp = (in_shapes[j] if len(in_shapes) > 1 else in_shapes[0]) if in_shapes else None
                inputs.append(InputDef(top, shp, ld.name))
            continue
        layers.append(ld)
    if not layers:
        raise net.error("the prototxt defines no layers")
    return NetDef(net.str("name", ""), inputs, layers, fmt, source, notes)


def read_netdef(path: str | os.PathLike, *, stages: Sequence[str] = ()) -> NetDef:
    """Parse a deploy prototxt file into a :class:`NetDef` (phase TEST)."""
    msg = parse_prototxt(path)
    return netdef_from_message(msg, os.path.basename(os.fspath(path)), stages=stages)
