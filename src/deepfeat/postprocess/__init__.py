"""Post-processing of pooled descriptors (see :mod:`deepfeat.postprocess.transforms`)."""

from .transforms import (  # noqa: F401
    CHAIN_FILE_KIND,
    CHAIN_GRAMMAR,
    FORMAT_VERSION,
    PCA,
    PCA_FILE_KIND,
    STEP_NAMES,
    Affine,
    PostChain,
    _read_npz,
    _version,
    _write_npz,
    as_descriptors,
    is_chain_file,
    l2n,
    learned_whitening_chain,
    parse_post,
    power_law,
)
