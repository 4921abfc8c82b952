"""A Caffe net as one PyTorch module: layers run in prototxt order over named blobs.

:func:`build_net` turns a :class:`~.netdef.NetDef` (and optionally the weights of a
``.caffemodel``) into a :class:`CaffeNet`. Its child modules are the Caffe layers,
named after them, so ``named_modules()``, deepfeat's taps and layer tables speak
Caffe: ``conv1``, ``pool5``, ``fc7``, ``relu7``.

Names and blobs
    A module name cannot contain ``.`` (and ``/`` or ``:`` would break paths and
    deepfeat's ``layer:in`` syntax), so every character other than a letter, digit,
    ``_`` or ``-`` becomes ``_``: GoogLeNet's ``inception_3a/1x1`` is the module
    ``inception_3a_1x1``. The original name is kept as an alias.

    Each layer computes out of place, so every layer module's output is that
    layer's own result even when Caffe runs it in place: ``fc7`` is the value before
    ``relu7`` and ``relu7`` the value after, and both can be tapped. A *blob* name
    that is not also a layer name is an alias for the layer that last writes the
    blob, i.e. the blob's value after the forward pass, as ``net.blobs[name]`` is in
    Caffe. (Where a name is both, the layer wins: ``fc7`` is pre-ReLU.) The second and
    later tops of a multi-top layer (``Slice``) are child modules ``<layer>.<top>``.

Weights
    Copied by layer name, as Caffe's ``CopyTrainedLayersFrom`` does: caffemodel
    layers the prototxt does not have (data, loss, auto-inserted splits) are
    ignored; a prototxt layer with parameters but no weights in the file is an
    error naming it (``@random`` weights exist for architecture work); blob counts
    and shapes are checked against what the prototxt implies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from deepfeat.errors import ModelError, UsageError, suggest
from deepfeat.models.caffe.layers import (
    TRAINING_TYPES,
    BatchNorm,
    Bias,
    Convolution,
    Deconvolution,
    InnerProduct,
    Input,
    PReLU,
    Scale,
    Shape,
    Top,
    build_layer,
)
from deepfeat.models.caffe.netdef import LayerDef, NetDef
from deepfeat.models.caffe.wire import CaffeModelFile
from deepfeat.models.caffe.writer import LayerBlobs, write_caffemodel

_BAD_CHARS = re.compile(r"[^0-9A-Za-z_\-]")


def sanitize(name: str) -> str:
    """A Caffe layer/blob name as a torch module name (see the module docstring)."""
    out = _BAD_CHARS.sub("_", name)
    return out or "_"


class CaffeNet(nn.Module):
    """A Caffe network. ``forward(x)`` takes the first input blob (the preprocessed
    N x C x H x W batch) and returns the output blob (``output_blob``); other input
    blobs, if the net has several, are passed as keyword arguments by blob name.

    Attributes: ``name`` (the prototxt's net name), ``input_blobs``, ``output_blob``,
    ``blob_shapes`` (every blob's shape at the declared input size, batch 1),
    ``layer_names`` (Caffe layer names in order), ``module_names`` (Caffe layer name
    -> module name), ``layer_aliases`` (extra tappable names -> module names),
    ``layer_types``.
    """

    def __init__(self, netdef: NetDef, inputs: list[tuple[str, str, Input]],
                 layers: list[tuple[str, LayerDef, nn.Module, list[tuple[str, Top]]]],
                 blob_shapes: dict[str, Shape], output_blob: str, aliases: dict[str, str]):
        super().__init__()
        self.name = netdef.name
        self.format = netdef.format
        self.input_blobs = [blob for _, blob, _ in inputs]
        self.output_blob = output_blob
        self.blob_shapes = dict(blob_shapes)
        self.layer_names = [ld.name for _, ld, _, _ in layers]
        self.layer_types = {ld.name: ld.type for _, ld, _, _ in layers}
        self.module_names = {m.layer or m.blob: mname for mname, _, m in inputs}
        self.module_names.update({ld.name: mname for mname, ld, _, _ in layers})
        self.layer_aliases = dict(aliases)
        self._inputs = [(mname, blob) for mname, blob, _ in inputs]
        self._steps: list[tuple[str, str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = []
        for mname, _, m in inputs:
            self.add_module(mname, m)
        for mname, ld, m, tops in layers:
            self.add_module(mname, m)
            for cname, child in tops:
                m.add_module(cname, child)
            self._steps.append((mname, ld.name, tuple(ld.bottoms), tuple(ld.tops), tuple(c for c, _ in tops)))
        self._stop = self._last_writer_index(output_blob)

    # -- running --------------------------------------------------------------
    def _last_writer_index(self, blob: str) -> int:
        last = -1
        for i, (_, _, _, tops, _) in enumerate(self._steps):
            if blob in tops:
                last = i
        return last

    def _feed(self, x: torch.Tensor | None, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        blobs: dict[str, torch.Tensor] = {}
        for i, (mname, blob) in enumerate(self._inputs):
            v = inputs.get(blob)
            if v is None and i == 0:
                v = x
            if v is None:
                raise UsageError(f"the net needs input blob '{blob}'; pass it as a keyword argument")
            blobs[blob] = self._modules[mname](v)
        unknown = set(inputs) - set(self.input_blobs)
        if unknown:
            raise UsageError(f"unknown input blob(s) {', '.join(sorted(unknown))}; inputs are "
                             f"{', '.join(self.input_blobs)}")
        return blobs

    def _step(self, i: int, blobs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        mname, _, bottoms, tops, children = self._steps[i]
        m = self._modules[mname]
        out = m(*[blobs[b] for b in bottoms])
        if not tops:
            return []
        if len(tops) == 1:
            outs = [out]
        else:
            outs = list(out)
            if children:  # tops 1.. go through their own (tappable) modules
                outs = [outs[0]] + [m._modules[c](o) for c, o in zip(children, outs[1:])]
        for t, o in zip(tops, outs):
            blobs[t] = o
        return outs

    def forward(self, x: torch.Tensor | None = None, **inputs: torch.Tensor) -> torch.Tensor:
        blobs = self._feed(x, inputs)
        for i in range(self._stop + 1):
            self._step(i, blobs)
        return blobs[self.output_blob]

    def forward_blobs(self, x: torch.Tensor | None = None, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every blob after the full forward pass, as Caffe's ``net.blobs`` (in-place
        layers have overwritten their blob)."""
        blobs = self._feed(x, inputs)
        for i in range(len(self._steps)):
            self._step(i, blobs)
        return blobs

    def forward_layers(self, x: torch.Tensor | None = None, **inputs: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Each layer's own outputs (one per top), by Caffe layer name, in order: what a
        tap on the layer gives, i.e. the value before any later in-place layer."""
        blobs = self._feed(x, inputs)
        out: dict[str, list[torch.Tensor]] = {}
        for i in range(len(self._steps)):
            out[self._steps[i][1]] = self._step(i, blobs)
        return out

    @property
    def output_layer(self) -> str | None:
        """Caffe name of the layer that last writes the output blob (None if it is an input)."""
        return self._steps[self._stop][1] if self._stop >= 0 else None

    def classifier_module(self) -> str | None:
        """Module name of the last layer with parameters at or before the output
        (``fc8``, SqueezeNet's ``conv10``): what surgery or fine-tuning replaces."""
        for mname, _, _, _, _ in reversed(self._steps[: self._stop + 1]):
            if any(True for _ in self._modules[mname].parameters()):
                return mname
        return None

    # -- weights ----------------------------------------------------------------
    def caffe_layers(self) -> list[LayerBlobs]:
        """Every layer with parameters as (name, type, blobs in Caffe's layout), ready
        for :func:`~.wire.write_caffemodel`."""
        out = []
        for mname, lname, bottoms, tops, _ in self._steps:
            m = self._modules[mname]
            blobs = m.caffe_blobs() if hasattr(m, "caffe_blobs") else []
            if blobs:
                out.append(LayerBlobs(lname, self.layer_types[lname], blobs, bottoms, tops))
        return out

    def save_caffemodel(self, path: str, *, format: str = "v2") -> str:
        """Write the current weights as a ``.caffemodel`` Caffe and OpenCV can read."""
        return write_caffemodel(path, self.caffe_layers(), name=self.name, format=format)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, inputs={self.input_blobs}, output={self.output_blob!r}"


def _unique(name: str, used: set[str], owner: nn.Module) -> str:
    base = sanitize(name)
    cand, i = base, 1
    while cand in used or hasattr(owner, cand) or cand == "output":
        cand = f"{base}_{i}"
        i += 1
    used.add(cand)
    return cand


def build_net(netdef: NetDef, weights: CaffeModelFile | None = None, *,
              input_shapes: dict[str, Sequence[int]] | None = None, output: str | None = None) -> CaffeNet:
    """Build the :class:`CaffeNet` for *netdef*, with *weights* (or untrained when None).

    *input_shapes* overrides declared input shapes (by blob name); *output* names the
    blob ``forward`` returns (default: the last blob no later layer consumes).
    """
    probe = nn.Module()  # for attribute-name collisions, like CaffeNet's own attributes
    for attr in ("name", "format", "input_blobs", "output_blob", "blob_shapes", "layer_names", "layer_types",
                 "module_names", "layer_aliases", "forward_blobs", "forward_layers", "caffe_layers",
                 "save_caffemodel"):
        setattr(probe, attr, None)
    used: set[str] = set()
    shapes: dict[str, Shape] = {}
    inputs = _build_inputs(netdef, input_shapes, shapes, used, probe)
    layers, writers, available = _build_layers(netdef, weights, inputs, shapes, used, probe)
    if output is None:  # the last written of the net's outputs (or, if none, the last blob written)
        output = max(available or list(writers), key=lambda b: writers[b][1])
    elif output not in shapes:
        raise UsageError(f"output blob {output!r} is not a blob of this net.{suggest(output, list(shapes))}")
    aliases = _aliases(netdef, inputs, layers, writers)
    return CaffeNet(netdef, inputs, layers, shapes, output, aliases).eval()  # a deploy net runs in TEST phase


def _build_inputs(netdef: NetDef, input_shapes: dict[str, Sequence[int]] | None, shapes: dict[str, Shape],
                  used: set[str], probe: nn.Module) -> list[tuple[str, str, Input]]:
    """The input modules (module name, blob, :class:`Input`), their shapes (batch 1) put into *shapes*."""
    overrides = {k: tuple(int(v) for v in s) for k, s in (input_shapes or {}).items()}
    unknown = set(overrides) - {i.blob for i in netdef.inputs}
    if unknown:
        raise UsageError(f"input shape given for unknown input blob(s) {', '.join(sorted(unknown))}; the net's "
                         f"inputs are {', '.join(i.blob for i in netdef.inputs) or 'none'}")
    if not netdef.inputs:
        train = next((ld for ld in netdef.layers if ld.type in TRAINING_TYPES), None)
        if train is not None:
            build_layer(train, [], None)  # raises the clear "training-only layer" error
        raise ModelError(f"{netdef.source or 'prototxt'}: the net declares no input (no Input layer and no "
                         "input:/input_shape/input_dim); is this a train_val prototxt? Use the deploy prototxt")

    inputs: list[tuple[str, str, Input]] = []
    for inp in netdef.inputs:
        shape = overrides.get(inp.blob, inp.shape)
        if shape is None:
            raise ModelError(f"{netdef.source}: input '{inp.blob}' has no declared shape; give input_size=HxW "
                             "(or input_shapes) when loading")
        if any(d <= 0 for d in shape):
            raise ModelError(f"{netdef.source}: input '{inp.blob}' has shape {list(shape)}; every dimension must "
                             "be positive")
        shape = (1,) + tuple(shape[1:]) if len(shape) >= 1 else tuple(shape)
        if inp.blob in shapes:
            raise ModelError(f"{netdef.source}: input blob '{inp.blob}' is declared twice")
        shapes[inp.blob] = shape
        mname = _unique(inp.layer or inp.blob, used, probe)
        inputs.append((mname, inp.blob, Input(inp.blob, shape, inp.layer)))
    return inputs


def _build_layers(netdef: NetDef, weights: CaffeModelFile | None, inputs: list[tuple[str, str, Input]],
                  shapes: dict[str, Shape], used: set[str], probe: nn.Module):
    """Every layer's module, in prototxt order, with its weights copied by layer name; the
    blob shapes go into *shapes*. Returns (layers, writers: blob -> (module name, step),
    available: the blobs no later layer reads, in the order last written)."""
    by_name = weights.by_name() if weights is not None else {}
    used_weights: set[str] = set()
    missing: list[str] = []
    layers: list[tuple[str, LayerDef, nn.Module, list[tuple[str, Top]]]] = []
    writers: dict[str, tuple[str, int]] = {inp.blob: (mname, 0) for mname, inp in
                                           zip((i[0] for i in inputs), netdef.inputs)}
    available: list[str] = list(shapes)  # Caffe's notion of net outputs: blobs no later layer reads
    for ld in netdef.layers:
        for b in ld.bottoms:
            if b not in shapes:
                raise ModelError(f"{ld.label}: bottom blob '{b}' is not produced by any earlier layer or input."
                                 f"{suggest(b, list(shapes))}")
        if len(set(ld.tops)) != len(ld.tops):
            raise ModelError(f"{ld.label}: a top blob is named twice")
        in_shapes = [shapes[b] for b in ld.bottoms]
        wl = by_name.get(ld.name)
        module, out_shapes = build_layer(ld, in_shapes, wl.blobs if wl is not None else None)
        if wl is not None:
            used_weights.add(ld.name)
        elif weights is not None and hasattr(module, "caffe_blobs") and module.caffe_blobs():
            missing.append(ld.name)
        mname = _unique(ld.name, used, probe)
        children: list[tuple[str, Top]] = []
        if len(ld.tops) > 1 and ld.type != "Split":
            cused: set[str] = set()
            for t in ld.tops[1:]:
                children.append((_unique(t, cused, module), Top(t)))
        layers.append((mname, ld, module, children))
        available = [b for b in available if b not in ld.bottoms]
        for j, (t, s) in enumerate(zip(ld.tops, out_shapes)):
            shapes[t] = tuple(int(v) for v in s)
            writers[t] = (mname if j == 0 or not children else f"{mname}.{children[j - 1][0]}", len(layers))
            available = [b for b in available if b != t] + [t]
    if missing:
        spare = sorted(set(by_name) - used_weights)
        hint = f" Layers in the caffemodel not used by the prototxt: {', '.join(spare[:12])}." if spare else ""
        raise ModelError(
            f"the caffemodel {weights.path or weights.name!r} has no weights for layer(s) "  # type: ignore[union-attr]
            f"{', '.join(repr(m) for m in missing)} of the prototxt (Caffe copies weights by layer name).{hint}"
        )
    return layers, writers, available


def _aliases(netdef: NetDef, inputs: list[tuple[str, str, Input]],
             layers: list[tuple[str, LayerDef, nn.Module, list[tuple[str, Top]]]],
             writers: dict[str, tuple[str, int]]) -> dict[str, str]:
    """Extra tappable names: original layer names, then blob names that are not layer names."""
    aliases: dict[str, str] = {}
    module_set = {m for m, _, _ in inputs} | {m for m, _, _, _ in layers}
    module_set |= {f"{m}.{c}" for m, _, _, ch in layers for c, _ in ch}
    layer_name_set = {ld.name for ld in netdef.layers} | {i.layer for i in netdef.inputs if i.layer}
    for mname, ld, _, _ in layers:
        if ld.name != mname and ld.name not in module_set:
            aliases.setdefault(ld.name, mname)
    for mname, blob, _ in inputs:
        inp = next(i for i in netdef.inputs if i.blob == blob)
        if inp.layer and inp.layer != mname and inp.layer not in module_set:
            aliases.setdefault(inp.layer, mname)
    for blob, (target, _) in writers.items():
        if blob in layer_name_set or blob in module_set or blob in aliases:
            continue
        aliases[blob] = target
    return aliases


# ---------------------------------------------------------------------------
# Random weights (for @random and for tests)
# ---------------------------------------------------------------------------


@torch.no_grad()
def init_random(net: CaffeNet, seed: int = 0) -> CaffeNet:
    """Give every parameter a random, well-scaled value (He-normal weights, small
    biases, BatchNorm statistics with a moving-average factor != 1)."""
    g = torch.Generator().manual_seed(seed)

    def u(t: torch.Tensor, lo: float, hi: float) -> None:
        t.uniform_(lo, hi, generator=g)

    for m in net.modules():
        if isinstance(m, (Convolution, Deconvolution, InnerProduct)):
            w = m.weight
            fan_in = w[0].numel() if not isinstance(m, Deconvolution) else w.shape[0] * w[0, 0].numel() // max(
                1, m.groups)
            w.normal_(0.0, math.sqrt(2.0 / max(1, fan_in)), generator=g)
            if m.bias is not None:
                u(m.bias, -0.1, 0.1)
        elif isinstance(m, BatchNorm):
            m.running_mean.normal_(0.0, 0.1, generator=g)  # type: ignore[union-attr]
            u(m.running_var, 0.5, 1.5)  # type: ignore[arg-type]
            m.scale_factor = float(torch.empty(1).uniform_(1.0, 1000.0, generator=g)[0])
        elif isinstance(m, Scale):
            if m.weight is not None:
                u(m.weight, 0.5, 1.5)
            if m.bias is not None:
                u(m.bias, -0.1, 0.1)
        elif isinstance(m, Bias) and m.bias is not None:
            u(m.bias, -0.1, 0.1)
        elif isinstance(m, PReLU):
            u(m.weight, 0.05, 0.3)
    return net

