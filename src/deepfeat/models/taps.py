"""List a network's layers with shapes; capture any layer's activations in one pass.

Names are the module names of ``net.named_modules()`` (``blocks.5``,
``conv_head``, ``features.28``, Caffe layer names), plus:

* ``output``: the network's final output (logits or probabilities);
* ``<module>:in``: the *input* of a module, captured before the module runs. This
  is how to get a value that an in-place or fused activation overwrites, e.g.
  ``bn2.act:in`` is the BatchNorm output of timm's fused BN+ReLU6 before the ReLU6.

Captured tensors are cloned at the moment they are produced, so a later in-place
ReLU or Dropout cannot change them: tapping ``fc7`` of a Caffe model or
``classifier.3`` of torchvision's VGG gives the pre-ReLU value, while the ReLU
module's own name gives the post-ReLU value (what Caffe users lose with
``relu7`` running in place, they keep here). The forward pass stops as soon as the
last requested layer has been captured, so early layers are cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch

from deepfeat.errors import LayerError, suggest

OUTPUT = "output"
INPUT_SUFFIX = ":in"

_ACTIVATIONS = (
    torch.nn.ReLU,
    torch.nn.ReLU6,
    torch.nn.LeakyReLU,
    torch.nn.PReLU,
    torch.nn.ELU,
    torch.nn.SELU,
    torch.nn.CELU,
    torch.nn.GELU,
    torch.nn.SiLU,
    torch.nn.Mish,
    torch.nn.Hardswish,
    torch.nn.Hardsigmoid,
    torch.nn.Hardtanh,
    torch.nn.Sigmoid,
    torch.nn.Tanh,
    torch.nn.Dropout,
    torch.nn.Dropout2d,
    torch.nn.Dropout1d,
    torch.nn.AlphaDropout,
)


def _is_activation(m: torch.nn.Module) -> bool:
    name = type(m).__name__
    return isinstance(m, _ACTIVATIONS) or name in ("Swish", "HardSwish", "HardSigmoid", "GELUTanh", "QuickGELU")


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(x, dict):
        for v in x.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


@dataclass
class LayerInfo:
    """One row of the layer table (Caffe's ``net.blobs``)."""

    name: str
    type: str
    shape: list[int] | None  # output shape without the batch dimension; None if never run
    params: int  # parameters owned directly by this module (not its children)
    depth: int
    calls: int = 1
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ParamInfo:
    """One row of the parameter table (Caffe's ``net.params``)."""

    name: str
    shape: list[int]
    kind: str  # "param" or "buffer"
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerTable:
    input_shape: list[int]
    layers: list[LayerInfo] = field(default_factory=list)
    params: list[ParamInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_shape": self.input_shape,
            "layers": [l.to_dict() for l in self.layers],
            "params": [p.to_dict() for p in self.params],
            "total_params": sum(p.shape and _numel(p.shape) or 0 for p in self.params if p.kind == "param"),
        }


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _input_rows_wanted(name: str, module: torch.nn.Module, parents: dict[str, torch.nn.Module]) -> bool:
    """Whether the layer table should offer ``name:in`` (the value an activation overwrites)."""
    if not _is_activation(module):
        return False
    if getattr(module, "inplace", False):
        return True
    parent = parents.get(name)
    return parent is not None and not isinstance(parent, (torch.nn.Sequential, torch.nn.ModuleList))


def _parents(net: torch.nn.Module) -> dict[str, torch.nn.Module]:
    out = {}
    for pname, p in net.named_modules():
        for cname, _ in p.named_children():
            out[f"{pname}.{cname}" if pname else cname] = p
    return out


def layer_table(net: torch.nn.Module, input_shape: Sequence[int], aliases: dict[str, str] | None = None) -> LayerTable:
    """Run one dummy forward pass of *input_shape* (C, H, W) and record every module's
    output shape in the order modules start, plus every parameter and buffer."""
    modules = dict(net.named_modules())
    parents = _parents(net)
    order: list[str] = []
    shapes: dict[str, list[int] | None] = {}
    in_shapes: dict[str, list[int] | None] = {}
    calls: dict[str, int] = {}
    handles = []

    def pre(name: str):
        def hook(_m, args):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
                t = _first_tensor(args)
                in_shapes[name] = list(t.shape[1:]) if t is not None else None

        return hook

    def post(name: str):
        def hook(_m, _args, out):
            if name not in shapes:
                t = _first_tensor(out)
                shapes[name] = list(t.shape[1:]) if t is not None else None

        return hook

    for name, m in modules.items():
        if name == "":
            continue
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post(name)))
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            out = net(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
        net.train(was_training)
    table = LayerTable(input_shape=list(input_shape))
    for name in order:
        m = modules[name]
        own = sum(p.numel() for p in m.parameters(recurse=False))
        depth = name.count(".")
        if _input_rows_wanted(name, m, parents):
            table.layers.append(
                LayerInfo(name + INPUT_SUFFIX, "(input of " + type(m).__name__ + ")", in_shapes.get(name), 0, depth,
                          note="value before the activation")
            )
        note = "called %d times; taps see the first call" % calls[name] if calls[name] > 1 else ""
        if getattr(m, "inplace", False):
            note = (note + "; " if note else "") + "in place"
        table.layers.append(LayerInfo(name, type(m).__name__, shapes.get(name), own, depth, calls[name], note))
    t = _first_tensor(out)
    table.layers.append(LayerInfo(OUTPUT, "(network output)", list(t.shape[1:]) if t is not None else None, 0, 0))
    for alias, target in (aliases or {}).items():
        if alias not in modules:
            row = next((l for l in table.layers if l.name == target), None)
            shape = row.shape if row else in_shapes.get(target.removesuffix(INPUT_SUFFIX))
            table.layers.append(LayerInfo(alias, "(alias of " + target + ")", shape, 0, 0, note="alias"))
    for name, p in net.named_parameters():
        table.params.append(ParamInfo(name, list(p.shape), "param", str(p.dtype).replace("torch.", "")))
    for name, b in net.named_buffers():
        table.params.append(ParamInfo(name, list(b.shape), "buffer", str(b.dtype).replace("torch.", "")))
    return table


def tappable_names(net: torch.nn.Module, aliases: dict[str, str] | None = None) -> list[str]:
    names = [n for n, _ in net.named_modules() if n]
    return names + [OUTPUT] + list(aliases or {})


def resolve_layers(net: torch.nn.Module, layers: Iterable[str], aliases: dict[str, str] | None = None) -> list[str]:
    """Validate layer names (resolving aliases); raise :class:`LayerError` naming close matches."""
    modules = dict(net.named_modules())
    aliases = aliases or {}
    out = []
    for raw in layers:
        name = raw.strip()
        base = name[: -len(INPUT_SUFFIX)] if name.endswith(INPUT_SUFFIX) else name
        base = aliases.get(base, base)
        if base.endswith(INPUT_SUFFIX) and base[: -len(INPUT_SUFFIX)] in modules:  # an alias of an input
            out.append(base)
            continue
        if name == OUTPUT or (base in modules and base != ""):
            out.append(base + INPUT_SUFFIX if name.endswith(INPUT_SUFFIX) else base)
            continue
        raise LayerError(
            f"layer {raw!r} not found.{suggest(base, tappable_names(net, aliases))} "
            "Run `deepfeat layers --model SPEC` for the full list."
        )
    return out


class _Stop(Exception):
    pass


class Taps:
    """Capture named layers of *net* during a forward pass.

    >>> taps = Taps(model.net, ["blocks.5", "conv_head", "bn2.act:in"])
    >>> feats = taps(x)            # dict name -> tensor (batch first)

    Reusable for many batches; hooks are attached only while a pass runs.
    """

    def __init__(self, net: torch.nn.Module, layers: Sequence[str], aliases: dict[str, str] | None = None,
                 stop_early: bool = True):
        self.net = net
        self.requested = list(layers)
        self.layers = resolve_layers(net, layers, aliases)
        self.stop_early = stop_early and OUTPUT not in self.layers
        self._modules = dict(net.named_modules())

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        wanted = set(self.layers)
        handles = []

        def done() -> None:
            if self.stop_early and len(captured) == len(wanted):
                raise _Stop

        def on_input(name: str):
            def hook(_m, args):
                if name not in captured:
                    captured[name] = _first_tensor(args).clone()
                    done()

            return hook

        def on_output(name: str):
            def hook(_m, _args, out):
                if name not in captured:
                    captured[name] = _first_tensor(out).clone()
                    done()

            return hook

        try:
            for name in wanted:
                if name == OUTPUT:
                    continue
                if name.endswith(INPUT_SUFFIX):
                    m = self._modules[name[: -len(INPUT_SUFFIX)]]
                    handles.append(m.register_forward_pre_hook(on_input(name)))
                else:
                    handles.append(self._modules[name].register_forward_hook(on_output(name)))
            try:
                out = self.net(x)
                if OUTPUT in wanted:
                    captured[OUTPUT] = _first_tensor(out)
            except _Stop:
                pass
        finally:
            for h in handles:
                h.remove()
        missing = wanted - set(captured)
        if missing:
            raise LayerError(f"layer(s) {', '.join(sorted(missing))} did not run in the forward pass")
        # return under the names the caller used
        return {req: captured[res] for req, res in zip(self.requested, self.layers)}


def make_taps(model, layers: Sequence[str]):
    """A taps callable for *model*: module hooks for torch networks, or the model's own
    ``tapper`` (e.g. ONNX models tap by adding graph outputs)."""
    tapper = getattr(model, "tapper", None)
    if tapper is not None:
        return tapper(list(layers))
    return Taps(model.net, layers, getattr(model, "layer_aliases", None))


def model_layer_table(model, input_shape: Sequence[int]) -> LayerTable:
    """The layer table of any model (torch module hooks, or the model's own lister)."""
    lister = getattr(model, "layer_lister", None)
    if lister is not None:
        return lister(tuple(input_shape))
    return layer_table(model.net, input_shape, getattr(model, "layer_aliases", None))


def capture(model, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """One-shot: normalised batch *x* through the model, returning the named layers."""
    with torch.inference_mode():
        return make_taps(model, layers)(x)
