"""The append contract: a run into an existing store keeps every setting of the store unless
the user asks to change it, and then says what changes or refuses with the reason.

* A setting the caller did not give (:attr:`ExtractConfig.given`) is the store's: its model,
  layers, pooling, size policy, scales, dtype, decoding and post-processing (with the fitted
  ``post.npz``, wherever it was fitted).
* With ``--resume`` every given setting must be the store's: a resumed run continues the
  store as it is, so a different one is refused, naming it.
* On an append (new inputs, no ``--resume``) a given setting that defines the vectors
  (:data:`deepfeat.store.IDENTITY_KEYS`) and differs is refused by the store
  (:meth:`FeatureStore.check_compatible`); a different ``--post`` changes how every vector
  of the store is read, so it is applied and said on stderr, with what is lost.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any

from deepfeat.data.preprocess import parse_size_policy
from deepfeat.errors import UsageError
from deepfeat.pipeline.config import ExtractConfig

log = logging.getLogger(__name__)

#: ExtractConfig field -> (its flag, the store's value in a meta)
STORE_SETTINGS: dict[str, tuple[str, Any]] = {
    "model": ("--model", lambda m: m["model"]["spec"]),
    "layers": ("--layer", lambda m: list(m["layers"])),
    "pooling": ("--pool", lambda m: m["pooling"]),
    "size": ("--size", lambda m: m["size"]),
    "scales": ("--scales", lambda m: tuple(m.get("scales", [1.0]))),
    "scale_combine": ("--scale-combine", lambda m: m.get("scale_combine", "sum")),
    "dtype": ("--dtype", lambda m: m.get("dtype", "float32")),
    "post": ("--post", lambda m: m.get("post", "none")),
    "draft": ("--no-draft", lambda m: m.get("draft_decode", True)),
}


def given_settings(cfg: ExtractConfig) -> set[str]:
    """The store settings the caller chose: ``cfg.given`` if set (the CLI sets it from the flags
    on the command line), else those that differ from :class:`ExtractConfig`'s defaults."""
    if cfg.given is not None:
        return set(cfg.given) & set(STORE_SETTINGS)
    defaults = {f.name: f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
                for f in fields(ExtractConfig) if f.name in STORE_SETTINGS}
    return {k for k in STORE_SETTINGS if _norm(k, getattr(cfg, k)) != _norm(k, defaults[k])}


def _norm(key: str, value: Any) -> Any:
    """A setting in the form the store records it, for comparison."""
    if key == "size":
        try:
            return str(parse_size_policy(value))
        except UsageError:
            return value
    if key == "pooling":
        from deepfeat.pooling import get_pooling

        try:
            return get_pooling(value).spec if value != "default" else value
        except Exception:  # noqa: BLE001 -- a bad spec is refused later with its own message
            return value
    if key in ("layers", "scales"):
        return [float(v) for v in value] if key == "scales" else list(value)
    return value


def adopt_store_settings(cfg: ExtractConfig, meta: dict[str, Any], store_path) -> None:
    """Apply the contract (module docstring) to *cfg* before a run into the store of *meta*."""
    given = given_settings(cfg)
    differ = {}
    for key, (flag, of_store) in STORE_SETTINGS.items():
        have = of_store(meta)
        if key not in given:
            setattr(cfg, key, have)
        elif _norm(key, getattr(cfg, key)) != _norm(key, have) and not (key == "layers" and cfg.layers == ["default"]):
            differ[key] = (flag, have, getattr(cfg, key))
    if cfg.resume and differ:
        lines = "\n  ".join(f"{flag}: the store has {have!r}, this command gives {want!r}"
                            for flag, have, want in differ.values())
        raise UsageError(f"--resume continues {store_path} with its own settings, and this command gives others:\n  "
                         f"{lines}\nLeave those flags out to continue the store, or extract into a new -o.")
    if "post" in differ:
        _, have, want = differ["post"]
        fitted = (meta.get("post_fitted_on") or "this store") if meta.get("post_fitted_rows") else None
        lost = (f"; its fitted post-processing (post.npz, fitted on {fitted}) is deleted; to get it back: "
                f"`deepfeat postprocess {store_path} --post {have}" + (f" --fit-on {fitted}`" if fitted != "this store"
                                                                          else "`")) if fitted else ""
        log.warning("--post %s changes the post-processing of every vector in %s from %s to %s%s", want, store_path,
                    have, want, lost)
    if cfg.resume and cfg.backend in ("auto", "openvino"):  # the store's precision; other backends run f32 (checked on append)
        cfg.precision = (meta.get("inference") or {}).get("precision", "f32")
