"""Caffe's binary files without Caffe: its messages read from and written to the protobuf wire
format, whose primitives (varints, fields, packed runs) are :mod:`deepfeat.models.caffe.protowire`.

Only the messages needed to move weights are decoded, with field numbers from
BVLC ``caffe.proto``:

* ``NetParameter``: name = 1, layers = 2 (V1, deprecated), input = 3, input_dim = 4,
  input_shape = 8, layer = 100;
* ``LayerParameter``: name = 1, type = 2 (string), bottom = 3, top = 4, blobs = 7,
  include = 8, exclude = 9, phase = 10, transform_param = 100;
* ``V1LayerParameter``: bottom = 2, top = 3, name = 4, type = 5 (enum), blobs = 6,
  include = 32, exclude = 33, transform_param = 36, data_param = 11,
  image_data_param = 15, layer = 1 (the even older V0 layer: name = 1, type = 2,
  blobs = 50);
* ``BlobProto``: num = 1, channels = 2, height = 3, width = 4 (legacy 4-D shape),
  data = 5 (packed float), diff = 6, shape = 7 (``BlobShape``: dim = 1, packed
  int64), double_data = 8 (packed double);
* ``TransformationParameter``: scale = 1, mirror = 2, crop_size = 3, mean_file = 4,
  mean_value = 5; the V1 ``DataParameter``/``ImageDataParameter``: scale = 2,
  mean_file = 3, crop_size = 5.

The reader accepts both packed and unpacked encodings of repeated scalars (as a
protobuf parser must), reads float data as zero-copy numpy views, skips every field
it does not need, and turns truncation or garbage into a
:class:`~deepfeat.errors.FormatError` that says where. The writer of the same messages
(``write_caffemodel``, ``write_binaryproto``: files Caffe and OpenCV's ``readNetFromCaffe``
read, in the current format or the deprecated V1 one) is :mod:`deepfeat.models.caffe.writer`,
re-exported here; the V1 layer-type enum is :mod:`deepfeat.models.caffe.v1types`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from deepfeat.errors import FormatError
from deepfeat.models.caffe.protowire import (
    FIXED32,
    FIXED64,
    LEN,
    VARINT,
    _Buf,
    _Field,
    _fields,
    _fixed_run,
    _one_field,
    _repeated_varints,
    _signed64,
    _string,
    _varint,
)
from deepfeat.models.caffe.v1types import V1_TYPES

# ---------------------------------------------------------------------------
# Blobs
# ---------------------------------------------------------------------------


@dataclass
class Blob:
    """One ``BlobProto``: its data as float32 and its shape.

    ``legacy`` is True when the shape came from the deprecated num/channels/height/width
    fields (always 4-D); Caffe then accepts it for any target shape that, padded with
    leading 1s to 4-D, is equal.
    """

    data: np.ndarray
    shape: tuple[int, ...]
    legacy: bool = False

    def array(self) -> np.ndarray:
        """The data reshaped to ``shape`` (float32, C order)."""
        return self.data.reshape(self.shape)

    def fits(self, target: Sequence[int]) -> bool:
        """Caffe's ``Blob::ShapeEquals`` rule."""
        target = tuple(int(t) for t in target)
        if not self.legacy:
            return self.shape == target
        if len(target) > 4:
            return False
        return self.shape == (1,) * (4 - len(target)) + target


#: a blob's value fields, by number: value size, dtype, fixed wire type, and their names in messages
_VALUE_FIELDS = {5: (4, "<f4", FIXED32, "float", "data"), 8: (8, "<f8", FIXED64, "double", "double_data")}
#: the one-byte tags of their unpacked form (field 5 fixed32, field 8 fixed64)
_UNPACKED_TAGS = {0x2D: 5, 0x41: 8}


def _blob_values(buf: _Buf, f: _Field, what: str) -> np.ndarray:
    """The values of one ``data`` (float) or ``double_data`` field, packed or a single fixed value."""
    size, dtype, fixed, kind, name = _VALUE_FIELDS[f.number]
    if f.wire == LEN:
        n = f.end - f.value
        if n % size:
            raise buf.error(f.value, f"corrupt {what}: packed {kind} data of {n} bytes")
        return np.frombuffer(buf.data, dtype=dtype, count=n // size, offset=f.value)
    if f.wire == fixed:
        return np.frombuffer(buf.data, dtype=dtype, count=1, offset=f.value)
    raise buf.error(f.value, f"corrupt {what}: blob {name} has wire type {f.wire}")


def _read_blob(buf: _Buf, start: int, end: int, what: str) -> Blob:
    data = buf.data
    floats: list[np.ndarray] = []
    doubles: list[np.ndarray] = []
    values = {5: floats, 8: doubles}
    shape: list[int] | None = None
    legacy = [0, 0, 0, 0]
    has_legacy = False
    fields: list[_Field] = []
    pos = start
    while pos < end:
        key, _ = _varint(buf, pos, end)
        number = _UNPACKED_TAGS.get(key)
        if number is not None:  # unpacked data / double_data (fixed32 / fixed64): read the whole run at once
            size, dtype = _VALUE_FIELDS[number][:2]
            n = _fixed_run(buf, pos, end, bytes([key]), size)
            run = np.frombuffer(data, dtype=np.uint8, count=n * (size + 1), offset=pos).reshape(n, size + 1)[:, 1:]
            values[number].append(np.ascontiguousarray(run).view(dtype).reshape(-1))
            pos += (size + 1) * n
            if n:
                continue
        f, pos = _one_field(buf, pos, end, what)
        fields.append(f)
    for f in fields:
        if f.number in values:  # data, double_data
            values[f.number].append(_blob_values(buf, f, what))
        elif f.number == 7:  # shape
            if f.wire != LEN:
                raise buf.error(f.value, f"corrupt {what}: blob shape has wire type {f.wire}")
            dims: list[int] = []
            for g in _fields(buf, f.value, f.end, what + " shape"):
                if g.number == 1:
                    dims.extend(_signed64(v) for v in _repeated_varints(buf, g, what + " shape"))
            shape = dims
        elif 1 <= f.number <= 4:
            if f.wire != VARINT:
                raise buf.error(f.value, f"corrupt {what}: legacy blob dimension has wire type {f.wire}")
            legacy[f.number - 1] = _signed64(f.value)
            has_legacy = True
    if floats and doubles:
        raise buf.error(start, f"corrupt {what}: blob has both float and double data")
    if doubles:
        arr = np.concatenate(doubles).astype(np.float32) if len(doubles) > 1 else doubles[0].astype(np.float32)
    elif floats:
        arr = np.concatenate(floats) if len(floats) > 1 else floats[0]
    else:
        arr = np.zeros(0, dtype=np.float32)
    arr = arr.astype(np.float32, copy=False)
    if shape is not None:
        shp, is_legacy = tuple(shape), False
    elif has_legacy:
        shp, is_legacy = tuple(legacy), True
    else:
        shp, is_legacy = (arr.size,), False
    count = int(np.prod(shp)) if shp else 1
    if any(d < 0 for d in shp) or count != arr.size:
        raise buf.error(start, f"corrupt {what}: shape {shp} holds {count} values but the blob has {arr.size}")
    return Blob(arr, shp, is_legacy)


# ---------------------------------------------------------------------------
# caffemodel
# ---------------------------------------------------------------------------


@dataclass
class WeightsLayer:
    """What a caffemodel stores for one layer."""

    name: str
    type: str
    blobs: list[Blob] = field(default_factory=list)
    bottoms: list[str] = field(default_factory=list)
    tops: list[str] = field(default_factory=list)
    phases: tuple[int, ...] = ()  # phases of its include rules (0 TRAIN, 1 TEST); () = every phase
    transform: dict[str, object] | None = None  # transform_param of a data layer


@dataclass
class CaffeModelFile:
    """The decoded parts of a ``.caffemodel``: the net name and its layers in order."""

    name: str
    layers: list[WeightsLayer]
    format: str  # "v2" (layer, string types) or "v1" (layers, enum types)
    path: str = ""

    def by_name(self) -> dict[str, WeightsLayer]:
        """Layers that carry blobs, by name (Caffe copies weights by layer name; later wins)."""
        return {l.name: l for l in self.layers if l.blobs}


def _read_transform(buf: _Buf, f: _Field, what: str, v1_data: bool = False) -> dict[str, object]:
    """TransformationParameter (or the V1 Data/ImageDataParameter's deprecated copy)."""
    out: dict[str, object] = {}
    means: list[float] = []
    nums = {"scale": 2, "mean_file": 3, "crop_size": 5, "mirror": 6} if v1_data else \
        {"scale": 1, "mirror": 2, "crop_size": 3, "mean_file": 4, "mean_value": 5}
    rev = {v: k for k, v in nums.items()}
    for g in _fields(buf, f.value, f.end, what):
        key = rev.get(g.number)
        if key == "scale" and g.wire == FIXED32:
            out["scale"] = struct.unpack_from("<f", buf.data, g.value)[0]
        elif key == "mean_file" and g.wire == LEN:
            out["mean_file"] = _string(buf, g, what)
        elif key in ("crop_size", "mirror") and g.wire == VARINT:
            out[key] = int(g.value)
        elif key == "mean_value":
            if g.wire == FIXED32:
                means.append(struct.unpack_from("<f", buf.data, g.value)[0])
            elif g.wire == LEN:
                means.extend(np.frombuffer(buf.data, dtype="<f4", count=(g.end - g.value) // 4,
                                           offset=g.value).tolist())
    if means:
        out["mean_value"] = means
    return out


def _read_rules(buf: _Buf, f: _Field, what: str) -> list[int]:
    return [int(g.value) for g in _fields(buf, f.value, f.end, what) if g.number == 1 and g.wire == VARINT]


def _read_layer(buf: _Buf, f: _Field, index: int, v1: bool) -> WeightsLayer:
    what = f"layer #{index}"
    name, typ = "", ""
    blobs: list[tuple[int, int]] = []
    bottoms: list[str] = []
    tops: list[str] = []
    phases: list[int] = []
    transform: dict[str, object] | None = None
    num = {"name": 4, "type": 5, "bottom": 2, "top": 3, "blobs": 6, "include": 32, "transform": 36} if v1 else \
        {"name": 1, "type": 2, "bottom": 3, "top": 4, "blobs": 7, "include": 8, "transform": 100}
    fields = list(_fields(buf, f.value, f.end, what))
    for g in fields:
        if g.number == num["name"] and g.wire == LEN:
            name = _string(buf, g, what)
            what = f"layer #{index} '{name}'"
    for g in fields:
        n = g.number
        if n == num["type"]:
            if v1:
                if g.wire != VARINT:
                    raise buf.error(g.value, f"corrupt {what}: V1 layer type should be an enum")
                typ = V1_TYPES.get(int(g.value), f"V1 type #{g.value}")
            else:
                typ = _string(buf, g, what)
        elif n == num["bottom"] and g.wire == LEN:
            bottoms.append(_string(buf, g, what))
        elif n == num["top"] and g.wire == LEN:
            tops.append(_string(buf, g, what))
        elif n == num["blobs"]:
            if g.wire != LEN:
                raise buf.error(g.value, f"corrupt {what}: blob field has wire type {g.wire}")
            blobs.append((g.value, g.end))
        elif n == num["include"] and g.wire == LEN:
            phases.extend(_read_rules(buf, g, what))
        elif n == num["transform"] and g.wire == LEN:
            transform = {**(transform or {}), **_read_transform(buf, g, what)}
        elif v1 and n in (11, 15) and g.wire == LEN and transform is None:  # V1 data_param / image_data_param
            t = _read_transform(buf, g, what, v1_data=True)
            transform = t or None
        elif v1 and n == 1 and g.wire == LEN:  # a V0 layer inside: name 1, type 2, blobs 50
            for h in _fields(buf, g.value, g.end, what + " (V0)"):
                if h.number == 1 and h.wire == LEN and not name:
                    name = _string(buf, h, what)
                elif h.number == 2 and h.wire == LEN and not typ:
                    typ = "V0:" + _string(buf, h, what)
                elif h.number == 50 and h.wire == LEN:
                    blobs.append((h.value, h.end))
    blob_list = [_read_blob(buf, s, e, f"{what} blob {i}") for i, (s, e) in enumerate(blobs)]
    return WeightsLayer(name, typ, blob_list, bottoms, tops, tuple(phases), transform)


def parse_caffemodel(data: bytes | memoryview, name: str = "<caffemodel>") -> CaffeModelFile:
    """Decode the bytes of a binary ``NetParameter`` (a ``.caffemodel``)."""
    buf = _Buf(data, name)
    if len(data) == 0:
        raise FormatError(f"{name}: empty file, not a caffemodel")
    if bytes(data[:8]) == b"\x89HDF\r\n\x1a\n":
        raise FormatError(f"{name}: this is an HDF5 snapshot (.caffemodel.h5), not a binary protobuf caffemodel; "
                          "deepfeat reads the .caffemodel format")
    net_name = ""
    layers: list[WeightsLayer] = []
    v1_layers: list[WeightsLayer] = []
    pos = 0
    while pos < len(data):
        done = layers or v1_layers
        what = (f"caffemodel (after {len(done)} complete layers, the last one '{done[-1].name}')" if done
                else "caffemodel")
        f, pos = _one_field(buf, pos, len(data), what)
        if f.number == 1 and f.wire == LEN:
            net_name = _string(buf, f, "net name")
        elif f.number == 100:
            if f.wire != LEN:
                raise buf.error(f.value, "corrupt caffemodel: 'layer' field is not a message")
            layers.append(_read_layer(buf, f, len(layers), v1=False))
        elif f.number == 2:
            if f.wire != LEN:
                raise buf.error(f.value, "corrupt caffemodel: 'layers' field is not a message")
            v1_layers.append(_read_layer(buf, f, len(v1_layers), v1=True))
    if layers and v1_layers:
        raise FormatError(f"{name}: has both V1 'layers' and current 'layer' entries; Caffe refuses such files too")
    if not layers and not v1_layers:
        raise FormatError(f"{name}: no layers found; is this really a .caffemodel (binary NetParameter)?")
    return CaffeModelFile(net_name, layers or v1_layers, "v2" if layers else "v1", name)


def read_caffemodel(path: str | os.PathLike) -> CaffeModelFile:
    """Read a ``.caffemodel`` file (see :func:`parse_caffemodel`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FormatError(f"caffemodel not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    head = data[:200].lstrip()
    if head.startswith((b"name:", b"layer {", b"layers {", b"input:", b"#", b"layer{")):
        raise FormatError(f"{path} is a text prototxt, not a binary caffemodel; "
                          "the spec is caffe:DEPLOY.prototxt@WEIGHTS.caffemodel")
    out = parse_caffemodel(data, os.path.basename(path))
    out.path = path
    return out


def read_blobproto(path: str | os.PathLike) -> np.ndarray:
    """A ``.binaryproto`` file (one ``BlobProto``, e.g. ``mean.binaryproto``) as a float32 array."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FormatError(f"binaryproto not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise FormatError(f"{path}: empty file, not a binaryproto")
    buf = _Buf(data, os.path.basename(path))
    return _read_blob(buf, 0, len(data), "BlobProto").array()
