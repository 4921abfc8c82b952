"""What people do with a whole collection once it has features: find its near duplicates and remove
them safely (:mod:`.duplicates`), label it with their own classifier (:mod:`.classifier`), group it
(:mod:`.clusters`), find what does not belong (:mod:`.outliers`) and look at it (:mod:`.layout`,
:mod:`.maps`, :mod:`.pages`). Inputs are feature stores and N x D float32 arrays; scikit-learn (the
``explore`` extra) is imported only where a function needs it. Exports are resolved lazily, so
that the duplicates and map modules do not import the classifier's network stack (torch)."""

from __future__ import annotations

from deepfeat.lazy import lazy_exports

_EXPORTS = {"Classifier": "classifier", "fit_classifier": "classifier"}

__all__ = ["Classifier", "fit_classifier"]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)
