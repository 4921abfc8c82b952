"""Caffe models without Caffe: ``caffe:DEPLOY.prototxt@WEIGHTS.caffemodel``.

A protobuf text-format parser reads the deploy prototxt (current ``layer {}`` and
deprecated V1 ``layers {}`` syntax), a small wire-format reader reads the
``.caffemodel`` (current and V1 binary layouts), and every layer becomes a PyTorch
module with Caffe's exact semantics. The result is an ordinary deepfeat
:class:`~deepfeat.models.base.Model`: its layers are tappable by Caffe layer and blob
names, and it preprocesses images the Caffe way (BGR, 0..255, mean subtraction).

Public API:

* :func:`load_caffe` (what ``load_model("caffe:...")`` calls) and
  :func:`load_caffe_net` (just the :class:`CaffeNet` module);
* :func:`read_mean` for ``mean.binaryproto`` / ``.npy`` means;
* :func:`parse_prototxt` / :func:`parse_text`, :func:`read_netdef`;
* :func:`read_caffemodel`, :func:`write_caffemodel`, :func:`encode_caffemodel`,
  :func:`read_blobproto`, :func:`write_binaryproto` (the wire-format reader/writer);
* :func:`build_net`, :func:`init_random`, :func:`supported_types`.

See ``docs/caffe.md``.
"""

from deepfeat.models.caffe.layers import supported_types
from deepfeat.models.caffe.net import CaffeNet, build_net, init_random, sanitize
from deepfeat.models.caffe.netdef import InputDef, LayerDef, NetDef, netdef_from_message, read_netdef
from deepfeat.models.caffe.prototxt import Message, parse_prototxt, parse_text
from deepfeat.models.caffe.source import ILSVRC_MEAN_BGR, load_caffe, load_caffe_net, read_mean, split_caffe_spec
from deepfeat.models.caffe.wire import Blob, CaffeModelFile, parse_caffemodel, read_blobproto, read_caffemodel
from deepfeat.models.caffe.writer import (
    LayerBlobs,
    encode_blob,
    encode_caffemodel,
    write_binaryproto,
    write_caffemodel,
)

__all__ = [
    "ILSVRC_MEAN_BGR",
    "Blob",
    "CaffeModelFile",
    "CaffeNet",
    "InputDef",
    "LayerBlobs",
    "LayerDef",
    "Message",
    "NetDef",
    "build_net",
    "encode_blob",
    "encode_caffemodel",
    "init_random",
    "load_caffe",
    "load_caffe_net",
    "netdef_from_message",
    "parse_caffemodel",
    "parse_prototxt",
    "parse_text",
    "read_blobproto",
    "read_caffemodel",
    "read_mean",
    "read_netdef",
    "sanitize",
    "split_caffe_spec",
    "supported_types",
    "write_binaryproto",
    "write_caffemodel",
]
