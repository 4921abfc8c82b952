"""The store's post-processing chain: fitted after a run (on this store or ``--fit-on``
another), or installed from an already fitted chain file."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.pipeline.config import ExtractConfig
from deepfeat.store import FeatureStore

log = logging.getLogger(__name__)


def _finish_post(store: FeatureStore, cfg: ExtractConfig) -> None:
    """Fit the post-processing chain if it needs fitting and is not fitted yet."""
    from deepfeat.postprocess import PostChain

    chain = PostChain.parse(store.meta.get("post") or "none")
    if not chain.needs_fit or (store.path / "post.npz").is_file():
        return
    fit_post(store, chain, cfg.fit_on, cfg.fit_max)


def check_post_dim(chain, source: str, dim: int) -> None:
    """A fitted chain from the file *source* must take *dim*-D descriptors."""
    if chain.dim_in is not None and int(chain.dim_in) != int(dim):
        raise UsageError(f"{source} post-processes {chain.dim_in}-D descriptors but this store's are {dim}-D "
                         "(another layer or pooling?)")


@contextmanager
def replacing_post(store: FeatureStore) -> Iterator[Path]:
    """Replace ``post.npz`` and the meta that describes it together: the old file is kept aside (a
    rename: no space needed) until the block, which writes the new one (or none) and the meta, ends;
    if it fails (a full disk while writing ``meta.json``), the old file and meta are put back, so the
    store is as it was. Yields the path to write the new file to."""
    fitted = store.path / "post.npz"
    aside = store.path / ".post.npz.replaced"
    before = dict(store.meta)
    had = fitted.is_file()
    if had:
        os.replace(fitted, aside)
    try:
        yield fitted
    except BaseException:
        if had:
            os.replace(aside, fitted)  # over a new file written part-way, if any
        else:
            fitted.unlink(missing_ok=True)
        store.meta.clear()
        store.meta.update(before)
        raise
    finally:
        store._post = None
    aside.unlink(missing_ok=True)


def set_post(store: FeatureStore, spec: str) -> None:
    """Make *spec*, a chain that needs no fitting (or ``none``), *store*'s post-processing."""
    with replacing_post(store):
        store.update_meta(post=spec)


def install_post(store: FeatureStore, chain, source: str, dim: int | None = None) -> None:
    """Use an already fitted *chain* (loaded from the file *source*) as *store*'s post-processing."""
    check_post_dim(chain, source, store.dim if dim is None else dim)
    with replacing_post(store) as fitted:
        chain.save(fitted, extra={"copied_from": str(source)})
        store.update_meta(post=chain.spec, post_fitted_on=str(source), post_fitted_rows=int(chain.n_fit))


def fit_post(store: FeatureStore, chain, fit_on: str | None, fit_max: int = 100_000, seed: int = 0) -> None:
    """Fit *chain* on another store (``fit_on``) or on this one, and save it into *store*."""
    src = FeatureStore(fit_on) if fit_on else store
    if fit_on:
        src.check_compatible({**store.meta, "post": src.meta.get("post")})
    x = src.raw(store.feature_name())
    if len(x) > fit_max:
        rng = np.random.default_rng(seed)
        x = x[np.sort(rng.choice(len(x), fit_max, replace=False))]
    if not fit_on:
        log.warning("fitting %s on the features being indexed (no --fit-on given)", chain.spec)
    fitted = chain.fit(x)
    with replacing_post(store) as path:
        fitted.save(path)
        store.update_meta(post=chain.spec, post_fitted_on=str(src.path), post_fitted_rows=len(x))
