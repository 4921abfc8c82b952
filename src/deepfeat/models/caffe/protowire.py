"""The protobuf wire format, without protobuf: the primitives Caffe's binary files are made of.

Reading: varints, fields (with their wire types; deprecated groups skipped), strings,
repeated integers packed or not, runs of unpacked fixed-size values, all with
truncation or garbage turned into a :class:`~deepfeat.errors.FormatError` that says
where. Writing: varints, keys, length-delimited fields, and repeated values packed or
not, as lists of chunks so that big arrays are never copied twice. Which field means
what (Caffe's ``caffe.proto``) is :mod:`deepfeat.models.caffe.wire`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from deepfeat.errors import FormatError

# wire types
VARINT, FIXED64, LEN, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


class _Buf:
    """Bytes plus a description for error messages."""

    __slots__ = ("data", "name")

    def __init__(self, data: bytes | memoryview, name: str) -> None:
        self.data = data
        self.name = name

    def error(self, pos: int, what: str) -> FormatError:
        return FormatError(f"{self.name}: {what} (at byte {pos} of {len(self.data)})")


def _varint(buf: _Buf, pos: int, end: int) -> tuple[int, int]:
    data = buf.data
    result = shift = 0
    while True:
        if pos >= end:
            raise buf.error(pos, "truncated: the file ends inside a number (varint)")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise buf.error(pos, "corrupt: a varint longer than 10 bytes")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@dataclass
class _Field:
    number: int
    wire: int
    value: int  # varint value, or start offset for LEN/FIXED
    end: int = 0  # end offset for LEN


def _one_field(buf: _Buf, pos: int, end: int, what: str) -> tuple[_Field, int]:
    """The field starting at *pos* and the offset after it."""
    key, pos = _varint(buf, pos, end)
    number, wire = key >> 3, key & 7
    if number == 0:
        raise buf.error(pos, f"corrupt {what}: field number 0 (not a protobuf message, or damaged)")
    if wire == VARINT:
        v, pos = _varint(buf, pos, end)
        return _Field(number, wire, v), pos
    if wire == LEN:
        n, pos = _varint(buf, pos, end)
        if pos + n > end:
            raise buf.error(
                pos, f"truncated {what}: field {number} declares {n} bytes but only {end - pos} remain "
                "(the file is cut short or damaged)"
            )
        return _Field(number, wire, pos, pos + n), pos + n
    if wire in (FIXED32, FIXED64):
        size = 4 if wire == FIXED32 else 8
        if pos + size > end:
            raise buf.error(pos, f"truncated {what}: a {size}-byte value is cut short")
        return _Field(number, wire, pos, pos + size), pos + size
    if wire == START_GROUP:  # deprecated groups: skip to the matching END_GROUP
        begin, depth = pos, 1
        while depth:
            k, pos = _varint(buf, pos, end)
            w = k & 7
            if w == START_GROUP:
                depth += 1
            elif w == END_GROUP:
                depth -= 1
            elif w == VARINT:
                _, pos = _varint(buf, pos, end)
            elif w == LEN:
                n, pos = _varint(buf, pos, end)
                pos += n
            elif w in (FIXED32, FIXED64):
                pos += 4 if w == FIXED32 else 8
            else:
                raise buf.error(pos, f"corrupt {what}: invalid wire type {w}")
            if pos > end:
                raise buf.error(pos, f"truncated {what}: the file ends inside a group")
        return _Field(number, wire, begin, pos), pos
    raise buf.error(pos, f"corrupt {what}: invalid wire type {wire} for field {number} "
                         "(not a caffemodel/binaryproto, or damaged)")


def _fields(buf: _Buf, start: int, end: int, what: str) -> Iterator[_Field]:
    """Every field of the message in ``data[start:end]``."""
    pos = start
    while pos < end:
        f, pos = _one_field(buf, pos, end, what)
        yield f


def _string(buf: _Buf, f: _Field, what: str) -> str:
    if f.wire != LEN:
        raise buf.error(f.value, f"corrupt {what}: field {f.number} should be a string")
    raw = bytes(buf.data[f.value:f.end])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise buf.error(f.value, f"corrupt {what}: field {f.number} is not UTF-8 text") from None


def _repeated_varints(buf: _Buf, f: _Field, what: str) -> list[int]:
    """A repeated integer field occurrence: one varint, or a packed run."""
    if f.wire == VARINT:
        return [f.value]
    if f.wire != LEN:
        raise buf.error(f.value, f"corrupt {what}: field {f.number} should be an integer")
    out, pos = [], f.value
    while pos < f.end:
        v, pos = _varint(buf, pos, f.end)
        out.append(v)
    return out


def _fixed_run(buf: _Buf, pos: int, end: int, tag: bytes, size: int) -> int:
    """Number of consecutive unpacked ``tag + size bytes`` records starting at *pos*."""
    rec = len(tag) + size
    n = (end - pos) // rec
    if n <= 0:
        return 0
    arr = np.frombuffer(buf.data, dtype=np.uint8, count=n * rec, offset=pos).reshape(n, rec)
    ok = np.all(arr[:, : len(tag)] == np.frombuffer(tag, dtype=np.uint8), axis=1)
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else n


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _enc_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _enc_varint((number << 3) | wire)


def _enc_len(number: int, payload: bytes) -> bytes:
    return _key(number, LEN) + _enc_varint(len(payload)) + payload


def _enc_str(number: int, s: str) -> bytes:
    return _enc_len(number, s.encode("utf-8"))


_Parts = list  # chunks (bytes or memoryview) written one after another: big blobs are never copied twice


def _size(parts: _Parts) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def _wrap(number: int, parts: _Parts) -> _Parts:
    """A length-delimited field holding *parts*."""
    return [_key(number, LEN) + _enc_varint(_size(parts)), *parts]


def _values(number: int, flat: np.ndarray, dtype: str, wire: int, packed: bool) -> _Parts:
    vals = np.ascontiguousarray(flat, dtype=dtype)
    if packed:
        return _wrap(number, [memoryview(vals).cast("B")])
    tag = _key(number, wire)
    rec = np.empty((vals.size, len(tag) + vals.itemsize), dtype=np.uint8)
    rec[:, : len(tag)] = np.frombuffer(tag, dtype=np.uint8)
    rec[:, len(tag):] = vals.view(np.uint8).reshape(vals.size, vals.itemsize)
    return [rec.tobytes()]
