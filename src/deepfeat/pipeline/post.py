"""The store's post-processing chain: fitted after a run (on this store or ``--fit-on``
another), or installed from an already fitted chain file."""

from __future__ import annotations

import logging

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


def install_post(store: FeatureStore, chain, source: str, dim: int | None = None) -> None:
    """Use an already fitted *chain* (loaded from the file *source*) as *store*'s post-processing."""
    check_post_dim(chain, source, store.dim if dim is None else dim)
    chain.save(store.path / "post.npz", extra={"copied_from": str(source)})
    store.update_meta(post=chain.spec, post_fitted_on=str(source), post_fitted_rows=int(chain.n_fit))
    store._post = None


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
    fitted.save(store.path / "post.npz")
    store.update_meta(post=chain.spec, post_fitted_on=str(src.path), post_fitted_rows=int(len(x)))
    store._post = None
