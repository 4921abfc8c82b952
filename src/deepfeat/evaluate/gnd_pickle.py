"""The official revisited Oxford/Paris ground truth (``gnd_roxford5k.pkl``), read without running code.

Radenovic et al. (CVPR 2018) distribute ROxford / RParis ground truth as pickles of
``{"imlist": [...], "qimlist": [...], "gnd": [{"bbx", "easy", "hard", "junk"}, ...]}``
with numpy arrays inside. ``pickle.load`` on such a file would run whatever the file
asks for (a ``__reduce__`` can call ``os.system``). :func:`load_restricted_pickle`
uses an unpickler whose ``find_class`` admits only what a pickle of numpy arrays,
lists, dicts, tuples, numbers and strings needs (the numpy array/dtype/scalar
reconstructors, ``bytes``/``bytearray``, and ``_codecs.encode`` for latin-1 only, which
protocol-2 pickles use for an array's bytes), and refuses everything else with a
:class:`~deepfeat.errors.FormatError` naming the global it asked for.
:func:`revisited_doc` turns the loaded object into deepfeat's revisited JSON document
(see docs/evaluation.md); :func:`deepfeat.evaluate.read_revisited_gnd` reads either.
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle
from pathlib import Path
from typing import Any

from deepfeat.errors import FormatError

#: the ``format`` of the JSON ground truth this converter writes and :mod:`deepfeat.evaluate.revisited` reads
REVISITED_FORMAT = "deepfeat-revisited-gnd"

#: the only globals an ndarray pickle needs (numpy 1.x and 2.x module names)
_NUMPY_GLOBALS = {
    ("_codecs", "encode"), ("builtins", "bytes"), ("__builtin__", "bytes"), ("builtins", "bytearray"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 numpy pickles use it (text to latin-1 bytes), and nothing else."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise FormatError(f"the pickle asks to encode with {encoding!r}; only latin-1 array bytes are accepted")
    return codecs.encode(obj, "latin-1", errors)


class RestrictedUnpickler(pickle.Unpickler):
    """Builds lists, dicts, tuples, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise FormatError(f"the pickle asks for {module}.{name}, which a revisited ground-truth file "
                              f"does not contain; refusing to load it (is it the official gnd_*.pkl?)")
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if module in ("numpy", "builtins", "__builtin__"):
            return getattr(importlib.import_module("builtins" if module == "__builtin__" else module), name)
        submodule = module.rsplit(".", 1)[1]
        for package in ("numpy._core", "numpy.core"):  # numpy 2 renamed numpy.core to numpy._core
            try:
                return getattr(importlib.import_module(f"{package}.{submodule}"), name)
            except (ImportError, AttributeError):
                continue
        raise FormatError(f"this numpy cannot rebuild {module}.{name}")


def load_restricted_pickle(path: str | os.PathLike) -> Any:
    """The object in the pickle *path*, built by :class:`RestrictedUnpickler` (never running code)."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, encoding="latin1").load()  # latin1: Python 2 pickles of numpy arrays
        except FormatError:
            raise
        except Exception as e:  # noqa: BLE001 -- a truncated or foreign file fails in many ways
            raise FormatError(f"cannot read {path} as a pickle: {type(e).__name__}: {e}") from None


def _plain(v: Any) -> Any:
    return v.tolist() if hasattr(v, "tolist") else v


def _index_list(v: Any, where: str, n: int) -> list[int]:
    v = _plain(v)
    if isinstance(v, (list, tuple)) and all(isinstance(_plain(i), int) and not isinstance(i, bool) for i in v):
        out = [int(_plain(i)) for i in v]
        bad = [i for i in out if not 0 <= i < n]
        if bad:
            raise FormatError(f"{where} has indices outside imlist (0..{n - 1}): {bad[:3]}")
        return out
    raise FormatError(f"{where} is not a list of integer indices (got {type(v).__name__})")


def revisited_doc(obj: Any, source: str = "") -> dict[str, Any]:
    """The official pickle's ``{'imlist', 'qimlist', 'gnd'}`` as deepfeat's revisited JSON document."""
    if not isinstance(obj, dict) or not {"imlist", "qimlist", "gnd"} <= set(obj):
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise FormatError(f"expected a dict with 'imlist', 'qimlist' and 'gnd', got {keys}")
    imlist = [str(_plain(s)) for s in _plain(obj["imlist"])]
    qimlist = [str(_plain(s)) for s in _plain(obj["qimlist"])]
    gnd_in = _plain(obj["gnd"])
    if not isinstance(gnd_in, (list, tuple)) or len(gnd_in) != len(qimlist):
        n = len(gnd_in) if isinstance(gnd_in, (list, tuple)) else type(gnd_in).__name__
        raise FormatError(f"'gnd' has {n} entries for {len(qimlist)} query images")
    gnd = []
    for qi, g in enumerate(gnd_in):
        if not isinstance(g, dict):
            raise FormatError(f"gnd[{qi}] is not a dict")
        entry: dict[str, Any] = {}
        bbx = _plain(g.get("bbx"))
        if bbx is not None:
            if not isinstance(bbx, (list, tuple)) or len(bbx) != 4:
                raise FormatError(f"gnd[{qi}]['bbx'] is not [x1, y1, x2, y2]: {bbx!r}")
            bbx = [float(_plain(v)) for v in bbx]
        entry["bbx"] = bbx
        for key in ("easy", "hard", "junk"):
            if key not in g:
                raise FormatError(f"gnd[{qi}] has no {key!r} list")
            entry[key] = _index_list(g[key], f"gnd[{qi}][{key!r}]", len(imlist))
        gnd.append(entry)
    return {"format": REVISITED_FORMAT, "version": 1, "source": source, "imlist": imlist, "qimlist": qimlist,
            "gnd": gnd}


def read_revisited_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """The revisited JSON document of an official ground-truth pickle (errors name the file)."""
    try:
        return revisited_doc(load_restricted_pickle(path), source=Path(path).name)
    except FormatError as e:
        msg = str(e)
        raise FormatError(msg if msg.startswith(f"cannot read {path}") else f"{path}: {msg}") from None


__all__ = ["RestrictedUnpickler", "load_restricted_pickle", "read_revisited_pickle",
           "revisited_doc"]
