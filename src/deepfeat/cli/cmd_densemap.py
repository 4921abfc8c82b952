"""``deepfeat densemap``: classify every window of an image with the classifier cast as convolutions."""

from __future__ import annotations

import sys

from deepfeat.cli.common import add_model_args, print_json
from deepfeat.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser(
        "densemap", help="a map of class probabilities over an image (net surgery: FC layers as convolutions)",
        description="Cast the model's classifier as convolutions (Caffe's 'net surgery': fc6/fc7/fc8 of CaffeNet "
                    "become 6x6 and 1x1 convolutions; a global-pooling head becomes a sliding pool plus a 1x1 "
                    "convolution) and run it on a larger input, giving one class distribution per window. Prints "
                    "the grid of top classes with a legend of label names.")
    p.add_argument("image", metavar="IMAGE", help="an image file")
    add_model_args(p, labels=True)
    p.add_argument("--size", metavar="S",
                   help="input geometry: an integer S warps to S x S (the classic example uses 451 for CaffeNet), "
                        "or a size policy (short:S, long:S, warp:HxW, native, model = the native size, one cell); "
                        "default short:2N for a model of native size N")
    p.add_argument("--window", default="native", metavar="native|K",
                   help="global-pooling heads: pool over the native feature-map window (default, each cell equals "
                        "the classifier on one native-size window) or K feature cells (1 = every cell on its own)")
    p.add_argument("-o", "--output", metavar="OUT.png", help="also draw the image and the top-class probability map")
    p.add_argument("--dpi", type=int, default=100, help="picture resolution (default 100)")
    p.add_argument("--json", action="store_true", help="the map as JSON (grid, probabilities, classes)")
    p.add_argument("--top-labels", action="store_true",
                   help="write short label names in the grid cells instead of class indices")
    p.add_argument("--save-net", metavar="FILE.pt",
                   help="save the fully convolutional module with torch.save (reload with "
                        "torch.load(FILE, weights_only=False); it needs deepfeat installed)")
    p.set_defaults(func=run)


def default_size(model) -> str:
    """short:2N, N the model's native (shorter) input side: a map of at least (N/stride + 1) cells a side."""
    return f"short:{2 * min(model.data_config.input_size)}"


def parse_window(text: str) -> str | int:
    if str(text).strip().lower() == "native":
        return "native"
    try:
        k = int(text)
    except ValueError:
        raise UsageError(f"--window must be 'native' or a positive integer, not {text!r}") from None
    if k < 1:
        raise UsageError(f"--window must be 'native' or a positive integer, not {text!r}")
    return k


def run(args) -> int:
    from deepfeat.models import load_model
    from deepfeat.surgery import dense_map, fully_convolutional

    if args.dpi <= 0:
        raise UsageError(f"--dpi must be positive, not {args.dpi}")
    window = parse_window(args.window)
    model = load_model(args.model, device=args.device, labels=args.labels)
    net = fully_convolutional(model, window=window)
    if args.save_net:
        import torch

        torch.save(net, args.save_net)
    dm = dense_map(model, args.image, args.size or default_size(model), window=window, net=net)
    if args.output:
        from deepfeat.viz.network import plot_densemap, save_figure

        save_figure(plot_densemap(dm), args.output, dpi=args.dpi)
    if args.json:
        d = dm.to_dict()
        d["window"] = list(net.window) if net.window else None
        d["kind"] = net.kind
        if args.output:
            d["picture"] = args.output
        if args.save_net:
            d["saved_net"] = args.save_net
        print_json(d)
        return 0
    print(dm.grid_text(names=args.top_labels))
    if args.output:
        print(f"picture written to {args.output}", file=sys.stderr)
    if args.save_net:
        print(f"fully convolutional module saved to {args.save_net}", file=sys.stderr)
    return 0
