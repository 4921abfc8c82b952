"""A recipe: the best retrieval pipeline for a dataset, found by a small sweep, written as a file.

:func:`make_recipe` runs :func:`deepfeat.tune.sweep.sweep` over a few candidates and keeps the
one with the highest mAP on the user's ground truth:

* single-scale descriptors: layers x poolings x post-processing (default: the last feature
  map; GeM and R-MAC; L2);
* the instance-retrieval baseline, named ``ms-regional``: regional descriptors (R-MAC and
  regional GeM) over the scales 1, 1/sqrt(2), 1/2, L2 or PCA-whitened (fitted on the
  separate ``fit_on`` images when given, as the Oxford/Paris literature does);
* each with every re-ranking (none, diffusion, k-reciprocal: :mod:`deepfeat.rerank`);
* then, on the winning descriptor, query expansion and database-side augmentation.

The recipe file is JSON that describes itself (``kind``, version, dataset, ground truth,
when) and holds what ``extract``, ``search``, ``eval`` and ``serve`` need (``extract``:
model, layer, pooling, scales, size policy, post-processing, a fitted chain saved next to
the recipe; ``search``: qe, alpha, dba, rerank) and the mAP of every candidate tried.
Ties go to the cheaper candidate (single scale before multi-scale, no re-ranking first).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deepfeat.errors import FormatError, UsageError

log = logging.getLogger(__name__)

RECIPE_KIND = "deepfeat-recipe"
RECIPE_VERSION = 1
MS_SCALES = (1.0, round(1 / math.sqrt(2), 4), 0.5)
MS_POOLS = ("rmac", "rgem")
DEFAULT_POOLS = ("gem", "rmac")
DEFAULT_POSTS = ("l2",)
DEFAULT_RERANKS = ("none", "diffusion", "kreciprocal")
DEFAULT_EXPANSIONS = ((5, 0), (0, 5), (5, 5))  # (qe, dba) tried on the winner


def _candidates(results, name: str) -> list[dict[str, Any]]:
    res = results[0]  # the first protocol (revisited: easy) decides
    out = []
    for (layer, pool, _col), c in res.cells.items():
        if "rerank" not in c:  # a chain that could not be fitted here (n/a): its reason is in the sweep
            continue
        out.append({"name": name, "layer": layer, "pooling": pool, "scales": list(res.scales), "post": c["chain"],
                    "qe": 0, "alpha": 0.0, "dba": 0, "rerank": None if c["rerank"] == "none" else c["rerank"],
                    "map": c.get("map"), "ns": c.get("ns"), "mp10": c.get("mp10"), "dim": c.get("dim"),
                    "rerank_ms_per_query": c.get("rerank_ms"), "note": c.get("reason")})
    return out


def _best(cands: list[dict[str, Any]]) -> dict[str, Any] | None:
    best = None
    for c in cands:  # strictly better only: earlier (cheaper) candidates win ties
        if c["map"] is not None and (best is None or c["map"] > best["map"] + 1e-9):
            best = c
    return best


def make_recipe(dataset: Sequence[str], gt_spec: str, out: str | Path, model_spec: str = "efficientnet_lite0",
                layers: Sequence[str] = ("default",), pools: Sequence[str] = DEFAULT_POOLS,
                posts: Sequence[str] = DEFAULT_POSTS, reranks: Sequence[str] = DEFAULT_RERANKS,
                regional: bool = True, whiten_dim: int = 256, fit_on: Sequence[str] | None = None,
                size: str = "model", expansions: Sequence[tuple[int, int]] = DEFAULT_EXPANSIONS,
                batch_size: int = 32, workers: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Sweep the candidates (module docstring), write the winner to *out* (JSON) and return it."""
    from deepfeat import __version__
    from deepfeat.data.images import discover
    from deepfeat.evaluate import parse_gt_spec
    from deepfeat.search.evaluation import ArrayEvaluation
    from deepfeat.search.options import SearchOptions
    from deepfeat.store import atomic_write_json
    from deepfeat.tune.sweep import parse_reranks, sweep

    out = Path(out)
    if out.suffix.lower() != ".json":
        raise UsageError(f"-o {out}: a recipe is a .json file")
    if whiten_dim < 1:
        raise UsageError(f"--whiten-dim must be at least 1, not {whiten_dim}")
    reranks = parse_reranks(reranks)
    t0 = time.perf_counter()
    kw = dict(model_spec=model_spec, fit_on=fit_on, size=size, batch_size=batch_size, workers=workers,
              device=device, reranks=reranks, keep_descriptors=True)
    runs = [("single-scale", sweep(dataset, gt_spec, layers, pools, posts, **kw))]
    if regional:
        n_fit = len(discover(fit_on or dataset))
        dim = min(whiten_dim, max(1, n_fit - 1))  # PCA learns at most (images - 1) directions
        ms_posts = ["l2", f"pca-whiten:{dim},l2"]
        runs.append(("ms-regional", sweep(dataset, gt_spec, layers[:1], MS_POOLS, ms_posts, scales=MS_SCALES,
                                          **kw)))
    cands = [c for name, res in runs for c in _candidates(res, name)]
    best = _best(cands)
    if best is None:
        raise UsageError("no candidate could be evaluated (every cell was n/a); see the sweep's reasons")
    # query expansion / DBA on the winning descriptor, with and without its re-ranking
    res = next(r for name, r in runs if name == best["name"])[0]
    xb_raw, xq_raw, ok, _rows = res.descriptors[(best["layer"], best["pooling"])]
    chain = res.chains[(best["layer"], best["pooling"], best["post"])]
    xb = np.ascontiguousarray(chain.apply(xb_raw), dtype=np.float32)
    xb[~ok] = 0.0
    xq = np.ascontiguousarray(chain.apply(xq_raw), dtype=np.float32)
    gt = parse_gt_spec(gt_spec, discover(dataset))[0]
    protocol = ArrayEvaluation(xq, xb, gt)
    for qe, dba in expansions:
        for rr in dict.fromkeys([best["rerank"], None]):
            ev = protocol.evaluate(SearchOptions(qe=qe, dba=dba, rerank=rr))
            cands.append({**best, "qe": qe, "dba": dba, "rerank": rr, "map": ev.result.map, "ns": ev.result.ns_score,
                          "mp10": ev.result.mp_at_k.get(10),
                          "rerank_ms_per_query": ev.rerank["ms_per_query"] if ev.rerank else None,
                          "name": best["name"] + f" + qe {qe} dba {dba}"})
    best = _best(cands)
    post = best["post"]
    post_file = None
    if chain_needs_file(post):
        chain = next(r for name, r in runs if best["name"].startswith(name))[0].chains[
            (best["layer"], best["pooling"], post)]
        post_file = out.with_suffix(".post.npz")
        chain.save(post_file, extra={"recipe": out.name, "fitted_on": res.fit_source})
    recipe = {
        "kind": RECIPE_KIND, "version": RECIPE_VERSION, "deepfeat_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": [str(d) for d in dataset], "gt": gt_spec, "protocol": gt.protocol, "n_images": res.n_images,
        "fit_on": res.fit_source,
        "extract": {"model": model_spec, "layer": best["layer"], "pooling": best["pooling"],
                    "scales": best["scales"], "size": size,
                    "post": post_file.name if post_file else post, "post_spec": post},
        "search": {"qe": best["qe"], "alpha": best["alpha"], "dba": best["dba"], "rerank": best["rerank"]},
        "map": best["map"], "ns": best["ns"], "candidate": best["name"],
        "candidates": cands, "seconds": round(time.perf_counter() - t0, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, recipe)
    return recipe


def chain_needs_file(post: str) -> bool:
    """A chain that learns from data (PCA, whitening) travels as a fitted file, not as its spec."""
    from deepfeat.postprocess import PostChain, is_chain_file

    return not is_chain_file(post) and PostChain.parse(post).needs_fit


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read and check a recipe file; ``extract.post`` becomes an absolute path when it is a file."""
    import json

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--recipe {path}: no such file (make one with `deepfeat recipe DATASET --gt SPEC -o "
                         f"{path}`)") from None
    except (OSError, ValueError) as e:
        raise FormatError(f"--recipe {path}: not a readable JSON recipe ({e})") from None
    if not isinstance(doc, dict) or doc.get("kind") != RECIPE_KIND:
        raise FormatError(f"--recipe {path}: not a deepfeat recipe (kind {doc.get('kind') if isinstance(doc, dict) else None!r})")
    if doc.get("version", 0) > RECIPE_VERSION:
        raise FormatError(f"--recipe {path}: version {doc['version']} is newer than this deepfeat reads "
                          f"({RECIPE_VERSION})")
    for section, keys in (("extract", ("model", "layer", "pooling", "scales", "size", "post")),
                          ("search", ("qe", "alpha", "dba", "rerank"))):
        missing = [k for k in keys if k not in doc.get(section, {})]
        if missing:
            raise FormatError(f"--recipe {path}: section {section!r} lacks {', '.join(missing)}")
    post = doc["extract"]["post"]
    if post.endswith(".npz"):
        f = (path.parent / post).resolve()
        if not f.is_file():
            raise FormatError(f"--recipe {path}: its fitted post-processing {f} is missing (keep it next to the "
                              "recipe)")
        doc["extract"]["post"] = str(f)
    return doc


def store_differences(recipe: dict[str, Any], store_meta: dict[str, Any]) -> list[str]:
    """How a store was made differently from the recipe's extraction (model, layer, pooling, scales, size)."""
    from deepfeat.pooling import get_pooling

    ex = recipe["extract"]
    diffs = []
    if store_meta.get("model", {}).get("spec") != ex["model"]:
        diffs.append(f"model {store_meta.get('model', {}).get('spec')} vs {ex['model']}")
    if ex["layer"] != "default" and ex["layer"] not in store_meta.get("layers", []):
        diffs.append(f"layer {','.join(store_meta.get('layers', []))} vs {ex['layer']}")
    if store_meta.get("pooling") != get_pooling(ex["pooling"]).spec:
        diffs.append(f"pooling {store_meta.get('pooling')} vs {ex['pooling']}")
    if [float(s) for s in store_meta.get("scales", [1.0])] != [float(s) for s in ex["scales"]]:
        diffs.append(f"scales {store_meta.get('scales', [1.0])} vs {ex['scales']}")
    return diffs


__all__ = ["make_recipe", "load_recipe", "store_differences", "RECIPE_KIND", "MS_SCALES", "MS_POOLS"]
