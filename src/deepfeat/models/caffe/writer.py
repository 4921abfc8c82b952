"""Writing Caffe's binary files: a ``.caffemodel`` (a ``NetParameter`` holding layers'
blobs, in the current format or the deprecated V1 one) and a ``.binaryproto`` (one
``BlobProto``), on the wire-format primitives of :mod:`deepfeat.models.caffe.protowire`,
with the field numbers that :mod:`deepfeat.models.caffe.wire` reads. The files are what
Caffe and OpenCV's ``readNetFromCaffe`` read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from deepfeat.errors import UsageError
from deepfeat.models.caffe.protowire import (
    FIXED32,
    FIXED64,
    VARINT,
    _enc_len,
    _enc_str,
    _enc_varint,
    _key,
    _Parts,
    _values,
    _wrap,
)
from deepfeat.models.caffe.v1types import V1_TYPE_NUMBERS


def _blob_parts(array: np.ndarray, legacy: bool, double: bool, packed: bool) -> _Parts:
    a = np.asarray(array)
    head = bytearray()
    if legacy:
        if a.ndim > 4:
            raise UsageError(f"a legacy (num/channels/height/width) blob has at most 4 dims, not {a.ndim}")
        dims = (1,) * (4 - a.ndim) + tuple(a.shape)
        for i, d in enumerate(dims, start=1):
            head += _key(i, VARINT) + _enc_varint(int(d))
    else:
        shape_payload = b"".join(_enc_varint(int(d)) for d in a.shape)
        head += _enc_len(7, _enc_len(1, shape_payload) if a.ndim else b"")
    flat = a.reshape(-1)
    data = _values(8, flat, "<f8", FIXED64, packed) if double else _values(5, flat, "<f4", FIXED32, packed)
    return [bytes(head), *data]


def encode_blob(array: np.ndarray, *, legacy: bool = False, double: bool = False, packed: bool = True) -> bytes:
    """One ``BlobProto``: ``shape`` + packed float ``data`` (or legacy 4-D dims with
    *legacy*, ``double_data`` with *double*, one field per value with ``packed=False``)."""
    return b"".join(_blob_parts(array, legacy, double, packed))


@dataclass
class LayerBlobs:
    """A layer to write: its name, type, blobs, and (optionally) its connections."""

    name: str
    type: str
    blobs: Sequence[np.ndarray] = ()
    bottoms: Sequence[str] = ()
    tops: Sequence[str] = ()


def _caffemodel_parts(layers: Iterable[LayerBlobs | tuple], name: str, format: str, packed: bool,
                      double: bool) -> _Parts:
    if format not in ("v1", "v2"):
        raise UsageError(f"format must be 'v1' or 'v2', not {format!r}")
    parts: _Parts = []
    if name:
        parts.append(_enc_str(1, name))
    for item in layers:
        lb = item if isinstance(item, LayerBlobs) else LayerBlobs(*item)
        body: _Parts = []
        if format == "v2":
            body.append(_enc_str(1, lb.name) + _enc_str(2, lb.type))
            body += [_enc_str(3, b) for b in lb.bottoms] + [_enc_str(4, t) for t in lb.tops]
            for blob in lb.blobs:
                body += _wrap(7, _blob_parts(blob, False, double, packed))
            parts += _wrap(100, body)
        else:
            if lb.type not in V1_TYPE_NUMBERS:
                raise UsageError(f"layer {lb.name!r}: type {lb.type!r} did not exist in the V1 format (no enum "
                                 "value); write format=\"v2\"")
            body += [_enc_str(2, b) for b in lb.bottoms] + [_enc_str(3, t) for t in lb.tops]
            body.append(_enc_str(4, lb.name) + _key(5, VARINT) + _enc_varint(V1_TYPE_NUMBERS[lb.type]))
            for blob in lb.blobs:
                body += _wrap(6, _blob_parts(blob, True, double, packed))
            parts += _wrap(2, body)
    return parts


def encode_caffemodel(layers: Iterable[LayerBlobs | tuple], *, name: str = "", format: str = "v2",
                      packed: bool = True, double: bool = False) -> bytes:
    """A binary ``NetParameter`` holding *layers*' blobs.

    ``format="v2"`` writes ``layer`` entries with string types and ``BlobShape``s (what
    Caffe has written since 2015); ``"v1"`` writes deprecated ``layers`` entries with
    enum types and num/channels/height/width dims (2014 files). Entries may be
    :class:`LayerBlobs` or ``(name, type, blobs)`` tuples. ``packed=False`` writes one
    field per value and ``double=True`` writes ``double_data`` (both legal, rarely seen).
    """
    return b"".join(_caffemodel_parts(layers, name, format, packed, double))


def write_caffemodel(path: str | os.PathLike, layers: Iterable[LayerBlobs | tuple], *, name: str = "",
                     format: str = "v2", packed: bool = True, double: bool = False) -> str:
    """Write a ``.caffemodel`` (see :func:`encode_caffemodel`), streaming the blobs; returns the path."""
    path = os.fspath(path)
    parts = _caffemodel_parts(layers, name, format, packed, double)
    with open(path, "wb") as f:
        f.writelines(parts)
    return path


def write_binaryproto(path: str | os.PathLike, array: np.ndarray, *, legacy: bool = True) -> str:
    """Write one ``BlobProto`` (e.g. a mean image as ``1 x C x H x W``), as Caffe's
    ``compute_image_mean`` does (legacy dims by default)."""
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(encode_blob(np.asarray(array, dtype=np.float32), legacy=legacy))
    return path
