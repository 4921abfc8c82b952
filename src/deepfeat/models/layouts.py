"""What a tapped tensor *is*, known from the model, never guessed from its shape.

A :class:`Layout` says how to read one tap:

* ``nchw``: an ``N x C x H x W`` map (convolutional networks);
* ``nhwc``: an ``N x H x W x C`` map (Swin's stages, ConvNeXt's block MLPs: channels last);
* ``tokens``: an ``N x T x C`` sequence of ``num_cls`` class tokens, then ``num_reg`` register
  tokens (together timm's ``num_prefix_tokens``), then the patch tokens of a grid that follows from
  the input size and the patch size (ViT, DeiT, EVA, CLIP/SigLIP towers, DINOv2/v3);
* ``vector``: an ``N x D`` vector (pre-logits, the network's output).

:func:`tap_layout` resolves the layout of a tap from the network's own attributes (timm's
``num_prefix_tokens``, ``has_class_token``, ``num_reg_tokens``, ``patch_embed.patch_size``,
``output_fmt``, as timm's ``forward_intermediates`` uses them), and :meth:`Layout.split` turns a
captured tensor into an ``N x C x H x W`` map of its spatial part with the prefix tokens kept beside
it (``N x P x C``, or None). A tensor that does not have the layout the model says it has (an
attention-internal tensor with heads or windows) is refused with a message saying what was found
and which taps to use instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepfeat.errors import LayerError

KINDS = ("nchw", "nhwc", "tokens", "vector")
#: the tap name of the network's own pre-logits vector (the input of its classifier)
PRE_LOGITS = "pre_logits"
#: modules of a ViT-like trunk that see the whole token sequence (prefix + patches)
_TOKEN_TRUNK = ("blocks", "norm", "norm_pre", "pos_drop", "patch_drop")
#: modules after a ViT's pooling: vectors
_VIT_HEAD = ("fc_norm", "head_drop", "head", "attn_pool")


@dataclass(frozen=True)
class Layout:
    """How to read one tapped tensor; see the module docstring."""

    kind: str
    num_cls: int = 0
    num_reg: int = 0
    patch: tuple[int, int] = (1, 1)  # tokens: input pixels per patch
    ceil: bool = False  # tokens: the patch grid is padded up (timm ``dynamic_img_pad``)

    @property
    def num_prefix(self) -> int:
        return self.num_cls + self.num_reg

    def grid(self, input_hw: tuple[int, int]) -> tuple[int, int]:
        """The patch grid (rows, columns) for an input of *input_hw* pixels."""
        (h, w), (ph, pw) = input_hw, self.patch
        if self.ceil:
            return -(-h // ph), -(-w // pw)
        return h // ph, w // pw

    def split(self, x: torch.Tensor, input_hw: tuple[int, int], where: str = "tap"
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(``N x C x H x W`` map, ``N x P x C`` prefix tokens or None); a vector passes through as is."""
        if self.kind == "vector":
            if x.dim() != 2:
                raise LayerError(f"{where}: expected an N x D vector, found shape {tuple(x.shape)}")
            return x, None
        if self.kind == "nchw":
            if x.dim() == 2:  # a fully connected layer of a channels-first network: already a vector
                return x, None
            self._need(x, 4, where, "N x C x H x W map")
            return x, None
        if self.kind == "nhwc":
            self._need(x, 4, where, "N x H x W x C map (channels last)")
            return x.permute(0, 3, 1, 2), None
        self._need(x, 3, where, "N x T x C token sequence")
        gh, gw = self.grid(input_hw)
        if x.shape[1] != self.num_prefix + gh * gw:
            raise LayerError(
                f"{where}: expected {self.describe_tokens(gh, gw)} for a {input_hw[0]}x{input_hw[1]} "
                f"input, found shape {tuple(x.shape)}; tap a block output (blocks.N), norm or {PRE_LOGITS}")
        n, _, c = x.shape
        prefix = x[:, : self.num_prefix] if self.num_prefix else None
        patches = x[:, self.num_prefix:].reshape(n, gh, gw, c).permute(0, 3, 1, 2)
        return patches, prefix

    def _need(self, x: torch.Tensor, dims: int, where: str, what: str) -> None:
        if x.dim() != dims:
            raise LayerError(
                f"{where}: the model says this tap is an {what}, found shape {tuple(x.shape)} (an attention- or "
                f"window-internal tensor?); tap a block or stage output (`deepfeat layers` marks them)")

    def describe_tokens(self, gh: int, gw: int) -> str:
        parts = ([f"{self.num_cls} cls"] if self.num_cls else []) + ([f"{self.num_reg} reg"] if self.num_reg else [])
        return f"{self.num_prefix + gh * gw} tokens ({' + '.join(parts + [f'{gh}x{gw} patches'])})"

    def describe(self, shape: list[int] | None, input_hw: tuple[int, int]) -> str:
        """A layer-table cell for an output *shape* without the batch dimension."""
        if shape is None:
            return "-"
        if self.kind == "tokens" and len(shape) == 2:
            gh, gw = self.grid(input_hw)
            if shape[0] == self.num_prefix + gh * gw:
                return f"{self.describe_tokens(gh, gw)} x {shape[1]}"
        if self.kind == "nhwc" and len(shape) == 3:
            return f"{shape[2]}x{shape[0]}x{shape[1]} (NHWC)"
        return "x".join(str(v) for v in shape) if shape else "scalar"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_cls": self.num_cls, "num_reg": self.num_reg, "patch": list(self.patch)}


NCHW = Layout("nchw")
NHWC = Layout("nhwc")
VECTOR = Layout("vector")


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _token_layout(net: torch.nn.Module) -> Layout:
    pe = net.patch_embed
    num_reg = int(getattr(net, "num_reg_tokens", 0) or 0)
    num_prefix = int(net.num_prefix_tokens)
    num_cls = num_prefix - num_reg
    return Layout("tokens", num_cls, num_reg, _pair(pe.patch_size), bool(getattr(pe, "dynamic_img_pad", False)))


def token_layout(net: torch.nn.Module) -> Layout | None:
    """The layout of a token model's trunk output (``forward_features``), or None for other networks."""
    return _token_layout(net) if _is_token_model(net) else None


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _is_token_model(net: torch.nn.Module) -> bool:
    return isinstance(getattr(net, "num_prefix_tokens", None), int) and hasattr(net, "patch_embed") \
        and hasattr(net.patch_embed, "patch_size")


def _channels_last_module(modules: dict[str, torch.nn.Module], name: str) -> bool:
    """A module of a channels-first network that works channels last: a Linear or a plain LayerNorm
    (ConvNeXt's block norm and MLP), or anything inside an MLP made of Linear layers."""
    from timm.layers import LayerNorm2d

    m = modules[name]
    if isinstance(m, torch.nn.Linear) or (isinstance(m, torch.nn.LayerNorm) and not isinstance(m, LayerNorm2d)):
        return True
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        owner = modules.get(".".join(parts[:i]))
        if owner is not None and isinstance(getattr(owner, "fc1", None), torch.nn.Linear):
            return True
    return False


def _classifier_name(net: torch.nn.Module) -> str | None:
    name = getattr(net, "pretrained_cfg", {}).get("classifier")
    modules = dict(net.named_modules())
    return name if isinstance(name, str) and name in modules else None


def pre_logits_alias(net: torch.nn.Module) -> dict[str, str]:
    """``{"pre_logits": "<classifier>:in"}``: the input of the final classifier is what timm's
    ``forward_head(x, pre_logits=True)`` returns (dropout is the identity in eval mode)."""
    name = _classifier_name(net)
    return {PRE_LOGITS: name + ":in"} if name else {}


def tap_layout(net: torch.nn.Module, layer: str) -> Layout:
    """The layout of tap *layer* (a resolved module name, ``name:in`` or ``output``) of *net*."""
    from deepfeat.models.taps import INPUT_SUFFIX, OUTPUT

    classifier = _classifier_name(net)
    if layer in (OUTPUT, PRE_LOGITS) or (classifier and _under(layer.removesuffix(INPUT_SUFFIX), (classifier,))):
        return VECTOR
    name = layer.removesuffix(INPUT_SUFFIX)
    if _is_token_model(net):
        if _under(name, _VIT_HEAD):
            return VECTOR
        if _under(name, _TOKEN_TRUNK):
            return _token_layout(net)
        if name in ("patch_embed", "patch_embed.norm"):
            pe = net.patch_embed
            if getattr(pe, "flatten", False):
                return Layout("tokens", 0, 0, _pair(pe.patch_size), bool(getattr(pe, "dynamic_img_pad", False)))
            return NHWC if str(getattr(pe, "output_fmt", "NCHW")).endswith("NHWC") else NCHW
        if name.startswith("patch_embed."):
            return NCHW
        raise LayerError(f"layer {layer!r} of {type(net).__name__}: deepfeat does not know how to read it "
                         f"(not the patch embedding, a block, the norm or the head); tap blocks.N, norm or "
                         f"{PRE_LOGITS}")
    if str(getattr(net, "output_fmt", "NCHW")) == "NHWC":
        if _under(name, ("head",)):
            return VECTOR
        module = dict(net.named_modules()).get(name)
        return NCHW if isinstance(module, torch.nn.Conv2d) else NHWC  # a patch embedding's convolution
    modules = dict(net.named_modules())
    if name in modules and _channels_last_module(modules, name):
        return NHWC
    return NCHW


def prefix_tokens(layout: Layout, prefix: torch.Tensor | None) -> dict | None:
    """``{"cls": N x c x C, "reg": N x r x C}`` from a token tap's prefix (kinds it lacks left out)."""
    if prefix is None:
        return None
    out = {}
    if layout.num_cls:
        out["cls"] = prefix[:, : layout.num_cls]
    if layout.num_reg:
        out["reg"] = prefix[:, layout.num_cls:]
    return out


class LayoutTaps:
    """Taps that read every tensor by its layout: ``x -> {layer: (N x C x H x W map or N x D vector,
    prefix tokens dict or None)}``; ``layouts`` maps each requested layer to its :class:`Layout`."""

    def __init__(self, model, layers):
        from deepfeat.models.taps import make_taps

        self.layers = list(layers)
        self.taps = make_taps(model, self.layers)
        resolved = getattr(self.taps, "layers", self.layers)
        self.layouts = {req: tap_layout(model.net, res) for req, res in zip(self.layers, resolved)}
        self.where = {req: f"layer {req!r} of {model.arch}" for req in self.layers}

    def __call__(self, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, dict | None]]:
        acts = self.taps(x)
        hw = (x.shape[-2], x.shape[-1])
        out = {}
        for name in self.layers:
            layout = self.layouts[name]
            fmap, prefix = layout.split(acts[name], hw, self.where[name])
            out[name] = (fmap, prefix_tokens(layout, prefix))
        return out
