"""Running an ONNX graph: ONNX Runtime sessions on cut-down copies of the graph (one per
set of output names, cached), feeding the normalised batch in the graph's layout, dtype
and static batch size."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from deepfeat.errors import ModelError, UsageError
from deepfeat.models.onnx_models.proto import _require_onnx


class GraphSessions:
    """The running half of :class:`~.graph.OnnxGraph` (a mixin: it uses the graph's
    analysis, ``upstream()``, ``types``, ``input_name``, ``layout``, ``dependent``,
    ``static_dims()``, and its ``_sessions`` cache and ``_lock``)."""

    # -- sessions --
    def _value_info(self, name: str):
        onnx, _ = _require_onnx()
        elem = self.types.get(name)
        if elem and elem > 0:
            return onnx.helper.make_tensor_value_info(name, elem, None)
        return onnx.helper.make_empty_tensor_value_info(name)

    def subgraph(self, outputs: Sequence[str]):
        """A copy of the model whose outputs are *outputs*, without the nodes they do not need."""
        onnx, _ = _require_onnx()
        proto = self.proto
        seen, keep = self.upstream(outputs)
        src = proto.graph
        m = onnx.ModelProto()
        m.ir_version = proto.ir_version
        m.producer_name = proto.producer_name
        m.producer_version = proto.producer_version
        m.opset_import.extend(proto.opset_import)
        m.functions.extend(proto.functions)
        g = m.graph
        g.name = src.name
        g.node.extend(src.node[i] for i in sorted(keep))
        g.initializer.extend(t for t in src.initializer if t.name in seen)
        g.sparse_initializer.extend(t for t in src.sparse_initializer if t.values.name in seen)
        g.input.extend(v for v in src.input if v.name == self.input_name or v.name in seen)
        g.value_info.extend(v for v in src.value_info if v.name in seen)
        g.output.extend(self._value_info(n) for n in outputs)
        return m

    def session(self, outputs: Sequence[str], cache: bool = True):
        key = tuple(outputs)
        with self._lock:
            sess = self._sessions.get(key)
            if sess is not None:
                return sess
            _, ort = _require_onnx()
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            threads = self.threads if self.threads is not None else torch.get_num_threads()
            if threads:
                opts.intra_op_num_threads = int(threads)
            data = self.subgraph(outputs).SerializeToString()
            try:
                sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - ORT's exceptions derive from Exception only
                raise ModelError(f"{self.path}: ONNX Runtime cannot run this graph: {e}") from None
            if cache:
                self._sessions[key] = sess
            return sess

    # -- running --
    def _feed(self, x: torch.Tensor) -> np.ndarray:
        onnx, _ = _require_onnx()
        if x.dim() != 4:
            raise UsageError(f"expected an N x C x H x W batch, got shape {tuple(x.shape)}")
        _, c, h, w = self.static_dims()
        if (h is not None and x.shape[2] != h) or (w is not None and x.shape[3] != w):
            raise UsageError(
                f"{os.path.basename(self.path)} takes {h or 'any'}x{w or 'any'} images only (a static input size in "
                f"the graph), got {x.shape[2]}x{x.shape[3]}; use the model's size (--size model) or warp:{h}x{w}, "
                "or re-export the model with a dynamic height and width")
        if c is not None and x.shape[1] != c:
            raise UsageError(f"{os.path.basename(self.path)} takes {c}-channel images, got {x.shape[1]} channels")
        arr = x.detach().to("cpu", torch.float32).numpy()
        if self.layout == "NHWC":
            arr = arr.transpose(0, 2, 3, 1)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.input_elem)
        if dtype == np.uint8:
            arr = np.clip(np.rint(arr), 0, 255)
        return np.ascontiguousarray(arr, dtype=dtype)

    def _run(self, sess, names: list[str], feed: np.ndarray) -> list[np.ndarray]:
        try:
            return sess.run(names, {self.input_name: feed})
        except Exception as e:  # noqa: BLE001 - ORT's exceptions derive from Exception only
            shape = "x".join(str(d) for d in feed.shape)
            raise ModelError(f"{os.path.basename(self.path)}: ONNX Runtime failed on a {shape} "
                             f"({self.layout}) input: {e}") from None

    def run(self, x: torch.Tensor, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The tensors *names* (graph layout) for the normalised NCHW batch *x*."""
        feed = self._feed(x)
        wanted = [n for n in dict.fromkeys(names) if n != self.input_name]
        out: dict[str, np.ndarray] = {}
        if self.input_name in names:
            out[self.input_name] = feed
        if not wanted:
            return out
        wanted = sorted(wanted)  # one session per set of names, whatever their order
        sess = self.session(tuple(wanted))
        n = feed.shape[0]
        b = self.static_dims()[0]
        if b is None or (n == b):
            return {**out, **dict(zip(wanted, self._run(sess, wanted, feed)))}
        if n == 0:
            raise UsageError("an empty batch")
        chunks: list[list[np.ndarray]] = []
        for start in range(0, n, b):
            part = feed[start:start + b]
            k = part.shape[0]
            if k < b:  # a static batch of b: pad the last chunk and drop the padding afterwards
                part = np.concatenate([part, np.zeros((b - k,) + part.shape[1:], dtype=part.dtype)])
            res = self._run(sess, wanted, part)
            chunks.append([r[:k] if name in self.dependent else r for name, r in zip(wanted, res)])
        for i, name in enumerate(wanted):
            out[name] = np.concatenate([c[i] for c in chunks]) if name in self.dependent else chunks[0][i]
        return out
