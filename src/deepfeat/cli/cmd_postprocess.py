"""``deepfeat postprocess``: change (and fit) a store's post-processing chain, no re-extraction."""

from __future__ import annotations

from deepfeat.pipeline import fit_post, install_post, set_post
from deepfeat.postprocess import PostChain
from deepfeat.store import FeatureStore
from deepfeat.store.lock import StoreLock


def register(sub) -> None:
    p = sub.add_parser("postprocess", help="set a store's post-processing chain (fits PCA/whitening)",
                       description="Stores keep pooled features; the post-processing chain is applied when "
                                   "vectors are read. This sets the chain, fitting PCA/whitening on --fit-on "
                                   "(another store made the same way) or on the store itself.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--post", required=True, metavar="CHAIN", help="e.g. l2, power:0.5,l2, pca-whiten:128,l2, or a saved chain file (.npz, e.g. a "
                        "fine-tuning run's whitening.npz)")
    p.add_argument("--fit-on", metavar="STORE", help="fit on this store's features (recommended)")
    p.add_argument("--fit-max", type=int, default=100_000, metavar="N", help="fit on at most N vectors")
    p.set_defaults(func=run)


def run(args) -> int:
    store = FeatureStore(args.store)
    chain = PostChain.from_arg(args.post)
    with StoreLock(store.path):  # not while an extract writes the same store (its meta would be overwritten)
        if chain.needs_fit and chain.fitted:  # a saved chain file, used as it is
            install_post(store, chain, args.post)
        elif chain.needs_fit:  # fitted before the old chain is replaced: a failed fit changes nothing
            fit_post(store, chain, args.fit_on, args.fit_max)
        else:
            set_post(store, chain.spec)
    d_out = store.post.output_dim(store.dim)
    print(f"{store.path}: post-processing {chain.spec} ({store.dim} -> {d_out} dims)"
          + (f", fitted on {store.meta.get('post_fitted_rows')} vectors of {store.meta.get('post_fitted_on')}"
             if chain.needs_fit else ""))
    return 0
