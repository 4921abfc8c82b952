"""Vision transformers: `deepfeat extract` end to end against a naive per-image timm loop, side by
side in one run, and the descriptor width each `--pool` gives on each timm family.

Speed (default): for ViT-S/16 (`vit_small_patch16_224`) and DINOv2-S/14
(`vit_small_patch14_dinov2.lvd142m`), at `--size long:224` and `long:518`, images/s of

  naive - the loop people write: one image at a time, full PIL decode, resize of the long side
          (rounded to the patch size), `forward_features` in eager torch, class token + GeM of the
          patch tokens, L2;
  torch / onnx / auto - `deepfeat extract --layer norm --pool cls+gem --backend B`, each with an
          empty graph cache (the export is part of the run, as on a first run).

Two figures each: "end to end", N / the wall-clock seconds of the whole process (Python start,
imports, model build and weights, decode workers, export, every batch), the same for both sides;
and "steady", the naive loop alone (after the model is built and one warm-up image) against
extract's own "after the first batch" rate.

Weights are seeded-random (`timm.create_model`, saved to a file, `timm:ARCH@FILE`): no hub weights
are reachable here, and speed does not depend on the values. Each step runs in its own process.

    python benchmarks/bench_transformers.py --n 64 --sizes long:224
    python benchmarks/bench_transformers.py --widths

Prints the tables; writes JSON (default bench-out/transformers.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = {"ViT-S/16": "vit_small_patch16_224", "DINOv2-S/14": "vit_small_patch14_dinov2.lvd142m"}
POLICIES = ("long:224", "long:518")
ENGINES = ("torch", "onnx", "auto")  # auto: OpenVINO where installed (one scale), else ONNX Runtime
#: (family, tiny timm architecture) for the width table
FAMILIES = [
    ("ViT", "vit_tiny_patch16_224"), ("DeiT", "deit_tiny_patch16_224"),
    ("DINOv2+registers", "vit_small_patch14_reg4_dinov2"), ("EVA02", "eva02_tiny_patch14_224"),
    ("CLIP tower", "vit_base_patch16_clip_224"), ("SigLIP tower", "vit_base_patch16_siglip_224"),
    ("Swin", "swin_tiny_patch4_window7_224"), ("MaxViT", "maxvit_nano_rw_256"),
    ("ConvNeXt", "convnext_atto"), ("RegNet", "regnetx_002"), ("EfficientNetV2", "tf_efficientnetv2_b0"),
    ("MobileNetV3", "mobilenetv3_small_050"), ("MobileNetV4", "mobilenetv4_conv_small"), ("ResNet", "resnet18"),
]
WIDTH_POOLS = ("gem", "cls", "reg", "cls+gem")


def save_weights(arch: str, path: str) -> str:
    import timm
    import torch

    torch.manual_seed(0)
    torch.save(timm.create_model(arch, pretrained=False).state_dict(), path)
    return path


def naive_loop(arch: str, weights: str, paths: list[str], policy: str) -> float:
    """The per-image timm script. Returns images/s of the loop (model building and one warm-up
    excluded; :func:`timed` adds the whole process's)."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    net = timm.create_model(arch, pretrained=False, dynamic_img_size=True)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    net.eval()
    cfg = net.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    patch = net.patch_embed.patch_size[0]
    side = int(policy.partition(":")[2])
    npt = net.num_prefix_tokens
    with torch.no_grad():
        net.forward_features(torch.zeros(1, 3, 224, 224))
    t0 = time.perf_counter()
    for p in paths:
        img = Image.open(p).convert("RGB")
        w, h = img.size
        s = side / max(w, h)
        img = img.resize((max(patch, round(w * s / patch) * patch), max(patch, round(h * s / patch) * patch)),
                         Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        with torch.no_grad():
            t = net.forward_features(((x - mean) / std)[None])
            gem = t[:, npt:].clamp(min=1e-6).pow(3).mean(1).pow(1 / 3)
            d = torch.cat([t[:, 0], gem], 1)
            torch.nn.functional.normalize(d, dim=1).numpy()
    return len(paths) / (time.perf_counter() - t0)


def extract(arch: str, weights: str, images: str, policy: str, backend: str) -> dict:
    """`deepfeat extract` as a user runs it, with an empty graph cache; images/s of the whole process
    and "after the first batch" from its own summary line, or the failure."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "deepfeat", "extract", images, "-o", f"{tmp}/st",
               "--model", f"timm:{arch}@{weights}", "--layer", "norm", "--pool", "cls+gem",
               "--size", policy, "--backend", backend]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              env={**os.environ, "DEEPFEAT_CACHE": f"{tmp}/graphs"})
        wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    m = re.search(r"(\d+) images in ([\d.]+)s \(([\d.]+) img/s", out)
    if proc.returncode != 0 or not m:
        last = [ln for ln in out.splitlines() if "error" in ln.lower() or "unsupported" in ln.lower()]
        return {"ok": False, "why": (last[-1] if last else out.strip().splitlines()[-1])[:160]}
    used = re.search(r"backend (\w+)", out)
    warm = re.search(r"([\d.]+) after the first batch", out)
    stages = re.search(r"stages: (.*)", out)
    fallback = [ln for ln in out.splitlines() if "unavailable" in ln or "dynamic-shape graph" in ln]
    n = int(m.group(1))
    return {"ok": True, "img_s": n / wall, "summary_img_s": n / float(m.group(2)),
            "ran_on": used.group(1) if used else backend, "stages": stages.group(1) if stages else None,
            "img_s_after_first_batch": float(warm.group(1)) if warm else None, "fallback": fallback[:1]}


def widths() -> list[dict]:
    """Descriptor width per family and pooling at the default tap (or the refusal)."""
    import torch

    from deepfeat.backends.featurenet import FeatureNet
    from deepfeat.models import load_model
    from deepfeat.pipeline.network import default_layer
    from deepfeat.pooling import get_pooling

    rows = []
    for family, arch in FAMILIES:
        torch.manual_seed(0)
        model = load_model(f"timm:{arch}@random")
        layer = default_layer(model)
        h, w = model.data_config.input_size
        px = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8)
        row = {"family": family, "arch": arch, "layer": layer}
        for pool in WIDTH_POOLS + ("pre_logits",):
            try:
                with torch.inference_mode():
                    if pool == "pre_logits":
                        (d,) = FeatureNet(model, ["pre_logits"], get_pooling("none"))(px)
                    else:
                        (d,) = FeatureNet(model, [layer], get_pooling(pool))(px)
                row[pool] = str(d.shape[1])
            except Exception:  # noqa: BLE001 - the table shows refusals
                row[pool] = "refused"  # the message: `deepfeat extract ... --pool P`
        rows.append(row)
    return rows


STEPS = {"save_weights": save_weights, "naive": naive_loop, "extract": extract, "widths": widths}


def isolated(step: str, *args):
    spec = json.dumps({"step": step, "args": args})
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--step", spec], check=False,
                          stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark step {step} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timed(step: str, *args) -> tuple:
    """(:func:`isolated`'s result, wall-clock seconds of its whole process)."""
    t0 = time.perf_counter()
    out = isolated(step, *args)
    return out, time.perf_counter() - t0


def speed(args) -> list[dict]:
    paths = sorted(str(p) for p in Path(args.images).rglob("*.jpg"))[: args.n]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        imgs = Path(tmp) / "images"
        imgs.mkdir()
        for p in paths:
            (imgs / Path(p).name).symlink_to(os.path.abspath(p))
        for name in args.models:
            arch = ARCHS[name]
            weights = isolated("save_weights", arch, f"{tmp}/{arch}.pth")
            for policy in args.sizes:
                steady, wall = timed("naive", arch, weights, paths, policy)
                row = {"model": name, "size": policy, "n": len(paths), "naive": len(paths) / wall,
                       "naive_steady": steady}
                for engine in args.engines:
                    row[engine] = isolated("extract", arch, weights, str(imgs), policy, engine)
                rows.append(row)
                print(_speed_line(row, args.engines), flush=True)
    return rows


def _speed_line(row: dict, engines) -> str:
    cells = [(f"{row['model']:<12} {row['size']:<9} naive {row['naive']:5.2f} img/s end to end, "
              f"{row['naive_steady']:5.2f} steady")]
    for engine in engines:
        r = row[engine]
        warm = r.get("img_s_after_first_batch") if r["ok"] else None
        cells.append(f"{engine} {r['img_s']:5.2f} ({r['img_s'] / row['naive']:.2f}x"
                     + (f"; steady {warm:.2f} = {warm / row['naive_steady']:.2f}x" if warm else "")
                     + f", ran on {r['ran_on']}{', FELL BACK' if r['fallback'] else ''}; {r['stages']})"
                     if r["ok"] else f"{engine}: {r['why']}")
    return " | ".join(cells)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--step":
        s = json.loads(sys.argv[2])
        print(json.dumps(STEPS[s["step"]](*s["args"])), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers17"))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--sizes", nargs="+", default=list(POLICIES), help="size policies (default: %(default)s)")
    ap.add_argument("--models", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=("torch", "onnx", "openvino", "auto"))
    ap.add_argument("--widths", action="store_true", help="print the width/pooling table instead")
    ap.add_argument("--out", default="bench-out/transformers.json")
    args = ap.parse_args()
    if args.widths:
        rows = isolated("widths")
        print("| family | timm arch (tiny) | default tap | " + " | ".join(f"`{p}`" for p in WIDTH_POOLS)
              + " | `pre_logits` |\n|" + "---|" * (4 + len(WIDTH_POOLS)))
        for r in rows:
            print(f"| {r['family']} | `{r['arch']}` | `{r['layer']}` | "
                  + " | ".join(r[p] for p in WIDTH_POOLS + ("pre_logits",)) + " |")
    else:
        rows = speed(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
