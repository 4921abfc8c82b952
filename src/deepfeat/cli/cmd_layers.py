"""``deepfeat layers``: every tappable layer with its output shape, and every parameter."""

from __future__ import annotations

from deepfeat.cli.common import add_model_args, format_table, print_json


def register(sub) -> None:
    p = sub.add_parser("layers", help="list a model's layers with output shapes and its parameters",
                       description="The two tables a Caffe user prints with net.blobs and net.params: every "
                                   "tappable layer in forward order with its output shape for an input size, "
                                   "and every parameter tensor with its shape.")
    add_model_args(p, device=False)
    p.add_argument("--size", nargs=2, type=int, metavar=("H", "W"), help="input size (default: the model's own)")
    p.add_argument("--no-params", dest="params", action="store_false", help="omit the parameter table")
    p.add_argument("--depth", type=int, metavar="D", help="only layers nested at most D levels deep (0 = top level)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _shape(s) -> str:
    if s is None:
        return "-"
    return "x".join(str(v) for v in s) if s else "scalar"


def _described(model, row, input_hw) -> str:
    """The output cell: tokens and channels-last maps as what they are (``197 tokens (1 cls + 14x14
    patches) x 384``), from the tap's layout; the plain shape where the layout is not known."""
    from deepfeat.errors import DeepfeatError
    from deepfeat.models.layouts import tap_layout

    target = model.layer_aliases.get(row.name, row.name)
    try:
        return tap_layout(model.net, target).describe(row.shape, input_hw)
    except DeepfeatError:
        return _shape(row.shape)


def run(args) -> int:
    from deepfeat.models import load_model
    from deepfeat.models.taps import model_layer_table

    model = load_model(args.model, device="cpu")
    h, w = args.size if args.size else model.data_config.input_size
    if h <= 0 or w <= 0:
        from deepfeat.errors import UsageError

        raise UsageError(f"--size must be positive, not {h} {w}")
    table = model_layer_table(model, (model.data_config.channels, h, w))
    if args.json:
        d = table.to_dict()
        if args.depth is not None:
            d["layers"] = [l for l in d["layers"] if l["depth"] <= args.depth]
        d["model"] = model.spec
        print_json(d)
        return 0
    print(f"model {model.spec} ({model.arch}), input {model.data_config.channels}x{h}x{w}\n")
    layers = [l for l in table.layers if args.depth is None or l.depth <= args.depth]
    rows = [["  " * l.depth + l.name, l.type, _described(model, l, (h, w)), f"{l.params:,}" if l.params else "",
             l.note] for l in layers]
    print(format_table(rows, ["layer", "type", "output (CxHxW, tokens)", "params", "note"], "lllrl"))
    if args.params:
        print()
        prow = [[p.name, _shape(p.shape), p.kind, p.dtype] for p in table.params]
        print(format_table(prow, ["parameter", "shape", "kind", "dtype"]))
        total = sum(1 for _ in table.params)
        n = table.to_dict()["total_params"]
        print(f"\n{total} tensors, {n:,} parameters")
    return 0
