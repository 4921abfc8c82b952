"""``deepfeat visualize``: pictures of a network (filters, activations, histograms, CroW, dense maps) as PNG."""

from __future__ import annotations

import sys

from deepfeat.cli.common import add_model_args
from deepfeat.errors import UsageError

KINDS = {
    "filters": "the filters of a convolution layer (default: the first), tiled in a square grid",
    "activations": "the first N channels of a layer's output for an image, tiled",
    "histogram": "a layer's output values and the histogram of the positive ones",
    "probabilities": "the classifier's probability vector for an image",
    "crow": "CroW spatial weights of a layer overlaid on the image",
    "patchnorm": "the norm of every patch token (map cell) of a layer (default: a ViT's last block) on the image",
    "densemap": "the image and its top-class probability map (see `deepfeat densemap`)",
}
NEEDS_IMAGE = ("activations", "histogram", "probabilities", "crow", "densemap", "patchnorm")
NEEDS_LAYER = ("activations", "histogram", "crow")


def register(sub) -> None:
    kinds = "\n".join(f"  {k:<14} {v}" for k, v in KINDS.items())
    import argparse

    p = sub.add_parser("visualize", help="pictures of filters, activations, histograms, CroW weights, dense maps",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Draw one picture as a PNG. Kinds:\n" + kinds +
                                   "\n\nLayer names are those of `deepfeat layers --model SPEC`.")
    p.add_argument("kind", choices=list(KINDS), metavar="KIND", help="one of: " + ", ".join(KINDS))
    p.add_argument("image", nargs="?", metavar="IMAGE", help="an image file (every kind but filters)")
    add_model_args(p, labels=True)
    p.add_argument("--layer", "-l", metavar="NAME", help="the layer to show (filters: default the first conv)")
    p.add_argument("-o", "--output", metavar="OUT.png", help="the PNG to write (default KIND.png)")
    p.add_argument("--n", type=int, default=36, metavar="N", help="activations: channels to show (default 36)")
    p.add_argument("--size", metavar="S",
                   help="input geometry: S (warp to S x S) or a size policy (short:S, long:S, warp:HxW, native); "
                        "default the model's own resize and crop (densemap: short:2N)")
    p.add_argument("--dpi", type=int, default=100, help="picture resolution (default 100)")
    p.set_defaults(func=run)


def run(args) -> int:
    from deepfeat.models import load_model
    from deepfeat.viz import network as viz

    kind = args.kind
    if kind in NEEDS_IMAGE and not args.image:
        raise UsageError(f"visualize {kind} needs an IMAGE")
    if kind == "filters" and args.image:
        raise UsageError("visualize filters takes no IMAGE (filters are weights); drop it")
    if kind in NEEDS_LAYER and not args.layer:
        raise UsageError(f"visualize {kind} needs --layer NAME; list the layers with "
                         f"`deepfeat layers --model {args.model}`")
    if kind in ("probabilities", "densemap") and args.layer:
        raise UsageError(f"visualize {kind} shows the classifier's output; --layer does not apply")
    if args.dpi <= 0:
        raise UsageError(f"--dpi must be positive, not {args.dpi}")
    out = args.output or f"{kind}.png"
    model = load_model(args.model, device=args.device, labels=args.labels)
    if kind == "filters":
        fig = viz.plot_filters(model, args.layer)
    elif kind == "activations":
        fig = viz.plot_activations(model, args.image, args.layer, n=args.n, size=args.size)
    elif kind == "histogram":
        fig = viz.plot_histogram(model, args.image, args.layer, size=args.size)
    elif kind == "probabilities":
        fig = viz.plot_probabilities(model, args.image, size=args.size)
    elif kind == "crow":
        fig = viz.plot_crow(model, args.image, args.layer, size=args.size)
    elif kind == "patchnorm":
        from deepfeat.viz.maps import plot_patch_norm

        fig = plot_patch_norm(model, args.image, args.layer, size=args.size)
    else:
        from deepfeat.cli.cmd_densemap import default_size
        from deepfeat.surgery import dense_map

        fig = viz.plot_densemap(dense_map(model, args.image, args.size or default_size(model)))
    viz.save_figure(fig, out, dpi=args.dpi)
    w, h = fig.get_size_inches()
    print(f"{out}: {kind}, {round(w * args.dpi)} x {round(h * args.dpi)} px", file=sys.stderr)
    return 0
