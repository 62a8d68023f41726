"""Units and how to zero them exactly: prunable sites found from the graph once.

A *site* is a tensor with one unit per channel (axis 1): the output of a Conv / Gemm / MatMul(+bias) after the
per-channel ops that follow it (BatchNorm, bias Add, activation), or the output of a residual Add (+ its
per-channel ops), i.e. channel c of both branches at once. Statistics are measured on the site tensor, the one
its consumers read. Each site gets one exact rewrite strategy:

- ``producer``: zero the producing weights and bias of channel c; valid when every op between producer and
  site maps 0 to 0 (no kept BatchNorm, Clip range contains 0).
- ``consumers``: zero the input slice of every linear consumer (Conv, Gemm, MatMul) reached through ops that
  only move or pool values and map 0 to 0 (pools, Flatten, Reshape, Transpose, ReLU...). Channel identity is
  followed element by element through those ops, so Transpose/Flatten into a dense layer is exact.

An op that is not understood on a path blocks the site rather than being guessed through.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import BadModel

PRODUCERS = {"Conv", "Gemm", "MatMul"}
# Elementwise and 0 -> 0: a zero channel stays zero, values never move between channels.
ZERO_KEEPING = {"Relu", "LeakyRelu", "Identity", "Dropout", "Elu", "Selu", "Tanh", "PRelu", "Softsign", "HardSwish"}
# Move or pool values within a channel and map an all-zero channel to zeros.
POSITIONAL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Transpose",
              "Squeeze", "Unsqueeze", "ReduceMean", "ReduceMax", "Gather"}
POOLING = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax"}


@dataclass
class ConsumerSlice:
    """Weights to zero in one linear consumer: initializer name, axis, and per-channel index lists."""
    initializer: str
    axis: int
    index: dict[int, np.ndarray]          # site channel -> indices along `axis`
    # Grouped convolutions zero only the block of output channels that read the input channel.
    rows: dict[int, np.ndarray] | None = None


@dataclass
class Site:
    name: str                  # what users see: the producing node's name (or the residual Add's)
    kind: str                  # "conv" | "dense" | "join"
    tensor: str                # measured tensor, read by the consumers
    channels: int
    strategy: str              # "producer" | "consumers" | "blocked"
    why_blocked: str = ""
    zero: list[tuple[str, int]] = field(default_factory=list)       # producer: (initializer, channel axis)
    slices: list[ConsumerSlice] = field(default_factory=list)        # consumers
    spatial: bool = True       # 4-D map (ℓ∞ over H×W) or a dense vector

    @property
    def prunable(self) -> bool:
        return self.strategy != "blocked"


def stat_tensors(sites) -> dict[str, int]:
    """The tensors to reduce for `sites`, with their rank: 4-D maps (ℓ∞ over H×W) or 2-D dense vectors."""
    return {s.tensor: 4 if s.spatial else 2 for s in sites}


class Graph:
    """Index of a model's nodes, initializers and (probed) tensor shapes."""

    def __init__(self, model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                 ints: dict[str, np.ndarray] | None = None):
        self.model = model
        self.shapes = shapes
        self.ints = ints or {}
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.outputs = {o.name for o in model.graph.output}
        self._arrays: dict[str, np.ndarray] = {}

    def const(self, name: str) -> np.ndarray | None:
        """Value of an initializer or Constant output, else None."""
        if not name:
            return None
        if name in self._arrays:
            return self._arrays[name]
        value = None
        if name in self.inits:
            value = numpy_helper.to_array(self.inits[name])
        elif name in self.producer and self.producer[name].op_type == "Constant":
            attr = next((a for a in self.producer[name].attribute if a.name == "value"), None)
            if attr is not None:
                value = numpy_helper.to_array(attr.t)
        if value is not None:
            self._arrays[name] = value
        return value

    def private(self, name: str) -> bool:
        """An initializer read by one node only: zeroing part of it cannot change another layer."""
        return name in self.inits and len(self.consumers.get(name, [])) == 1

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _clip_keeps_zero(g: Graph, node: onnx.NodeProto) -> bool:
    lo = attr(node, "min")
    hi = attr(node, "max")
    if len(node.input) > 1 and node.input[1]:
        v = g.const(node.input[1])
        if v is None:
            return False
        lo = float(v)
    if len(node.input) > 2 and node.input[2]:
        v = g.const(node.input[2])
        if v is None:
            return False
        hi = float(v)
    return (lo is None or lo <= 0) and (hi is None or hi >= 0)


def _per_channel_const(g: Graph, node: onnx.NodeProto, tensor: str, channels: int) -> str | None:
    """For a binary op with one constant operand broadcast per channel (a bias), return that operand."""
    other = [i for i in node.input if i != tensor]
    if len(other) != 1 or g.const(other[0]) is None:
        return None
    v = g.const(other[0])
    if v.size == 1 or v.size == channels and (v.ndim == 1 or v.shape[-1] == channels or v.shape[1:2] == (channels,)):
        return other[0]
    return None


def _follow_chain(g: Graph, start: str, channels: int):
    """Walk the single-consumer per-channel ops after `start`. Returns (site tensor, zero_ok, biases)."""
    tensor, zero_ok, biases = start, True, []
    while (node := g.only_consumer(tensor)) is not None:
        op = node.op_type
        if op in ZERO_KEEPING:
            pass
        elif op == "Clip":
            zero_ok &= _clip_keeps_zero(g, node)
        elif op == "BatchNormalization" and all(g.const(i) is not None for i in node.input[1:5]):
            zero_ok = False
        elif op in ("Sigmoid", "HardSigmoid", "Softplus"):
            zero_ok = False
        elif op in ("Add", "Sub") and (bias := _per_channel_const(g, node, tensor, channels)) is not None \
                and g.private(bias):
            biases.append(bias)
            if g.const(bias).size == 1 and channels > 1:
                zero_ok = False
        else:
            break
        tensor = node.output[0]
    return tensor, zero_ok, biases


def _producer_weights(g: Graph, node: onnx.NodeProto) -> tuple[list[tuple[str, int]], int] | None:
    """Initializers holding each output unit and their unit axis, and the unit count."""
    w = g.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or not g.private(node.input[1]):
        return None
    bias = node.input[2] if len(node.input) > 2 and g.private(node.input[2]) else None
    if node.op_type == "Conv":
        zero, n = [(node.input[1], 0)], w.shape[0]
    elif node.op_type == "Gemm":
        if w.ndim != 2 or attr(node, "transA", 0):
            return None
        axis = 0 if attr(node, "transB", 0) else 1
        zero, n = [(node.input[1], axis)], w.shape[axis]
    else:  # MatMul with a 2-D weight on the right
        if w.ndim != 2:
            return None
        zero, n = [(node.input[1], 1)], w.shape[1]
    if bias is not None:
        if g.const(bias).size != n:
            return None
        zero.append((bias, 0))
    return zero, n


def _trace_consumers(g: Graph, site: str, channels: int) -> tuple[list[ConsumerSlice], str]:
    """Follow channel identity from `site` to every linear consumer; return slices or a reason to block."""
    if site not in g.shapes:
        return [], f"shape of {site} unknown"
    ids = np.broadcast_to(np.arange(channels).reshape((1, channels) + (1,) * (len(g.shapes[site]) - 2)),
                          g.shapes[site]).copy()
    slices: list[ConsumerSlice] = []
    stack = [(site, ids)]
    while stack:
        tensor, ids = stack.pop()
        if tensor in g.outputs:
            return [], f"{tensor} is a graph output"
        for node in g.consumers.get(tensor, []):
            op = node.op_type
            if op in ("Shape", "Size"):
                continue  # reads the shape, never the values
            if node.input[0] != tensor or any(i == tensor for i in node.input[1:]):
                if op in ("Gemm", "MatMul", "Conv"):
                    return [], f"{node.name or op} reads it as a weight"
                return [], f"{op} {node.name} mixes it with another tensor"
            out = node.output[0]
            if op in ZERO_KEEPING or op == "Clip" and _clip_keeps_zero(g, node):
                stack.append((out, ids))
            elif op in POSITIONAL:
                new = _move_ids(g, node, ids)
                if new is None:
                    return [], f"{op} {node.name} is not channel-preserving here"
                stack.append((out, new))
            elif op in PRODUCERS:
                sl = _consumer_slice(g, node, ids, channels)
                if sl is None:
                    return [], f"{op} {node.name} cannot be sliced"
                slices.append(sl)
            else:
                return [], f"{op} {node.name or ''} is not understood".replace("  ", " ")
    return slices, ""


def _move_ids(g: Graph, node: onnx.NodeProto, ids: np.ndarray) -> np.ndarray | None:
    out_shape = g.shapes.get(node.output[0])
    if out_shape is None:
        return None
    op = node.op_type
    if op in POOLING:
        if len(out_shape) < 2 or ids.ndim < 3 or out_shape[1] != ids.shape[1]:
            return None
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = g.const(node.input[1])
            if axes is None:
                return None
        if axes is not None and any(int(a) % ids.ndim in (0, 1) for a in np.ravel(axes)):
            return None
        per_channel = ids.reshape(ids.shape[0], ids.shape[1], -1)
        if not np.all(per_channel == per_channel[:, :, :1]):
            return None  # pooling would mix channels that a reshape had already scattered
        channel = per_channel[0, :, 0]
        return np.broadcast_to(channel.reshape((1, -1) + (1,) * (len(out_shape) - 2)), out_shape).copy()
    if op == "Gather":
        # indices are often computed from the batch size (dynamo's as_strided): take their probed value
        index = g.const(node.input[1])
        index = g.ints.get(node.input[1]) if index is None else index
        if index is None:
            return None
        return np.take(ids, index.astype(np.int64), axis=attr(node, "axis", 0))
    if op == "Transpose":
        perm = attr(node, "perm") or list(reversed(range(ids.ndim)))
        if perm[0] != 0:
            return None
        return np.transpose(ids, perm)
    # Flatten / Reshape / Squeeze / Unsqueeze keep row-major element order. The probe has one image, so a
    # reshape may fold the batch axis in; linear consumers accept only [1, K] / [1, C, ...] in the end.
    if int(np.prod(out_shape)) != ids.size:
        return None
    return ids.reshape(out_shape)


def _same_rows(ids: np.ndarray) -> bool:
    """Every image of the probe batch maps channels to the same positions (fixed-batch models probe with B>1)."""
    return bool(np.all(ids == ids[:1]))


def _consumer_slice(g: Graph, node: onnx.NodeProto, ids: np.ndarray, channels: int) -> ConsumerSlice | None:
    w = g.const(node.input[1]) if len(node.input) > 1 else None
    if w is None or not g.private(node.input[1]):
        return None
    if node.op_type == "Conv":
        if ids.ndim < 3 or not _same_rows(ids):
            return None
        per_channel = ids[0].reshape(ids.shape[1], -1)
        if not np.all(per_channel == per_channel[:, :1]):
            return None  # a channel's map must stay one input channel of the conv
        in_ch = per_channel[:, 0]
        groups = attr(node, "group", 1)
        cpg = w.shape[1]
        out_per_group = w.shape[0] // groups
        index, rows = {}, {}
        for c in range(channels):
            where = np.flatnonzero(in_ch == c)
            index[c] = where % cpg
            rows[c] = np.concatenate([np.arange(k // cpg * out_per_group, (k // cpg + 1) * out_per_group)
                                      for k in where]) if len(where) else np.zeros(0, int)
        return ConsumerSlice(node.input[1], 1, index, rows if groups > 1 else None)
    if ids.ndim != 2 or not _same_rows(ids):
        return None
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return None
        axis = 1 if attr(node, "transB", 0) else 0
    else:
        if w.ndim != 2:
            return None
        axis = 0
    flat = ids[0]
    return ConsumerSlice(node.input[1], axis, {c: np.flatnonzero(flat == c) for c in range(channels)})


def find_sites(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
               ints: dict[str, np.ndarray] | None = None) -> list[Site]:
    g = Graph(model, shapes, ints)
    sites: list[Site] = []
    for node in model.graph.node:
        if node.op_type in PRODUCERS:
            found = _producer_weights(g, node)
            if found is None:
                continue
            zero, n = found
            kind = "conv" if node.op_type == "Conv" else "dense"
            out = node.output[0]
            tensor, zero_ok, biases = _follow_chain(g, out, n)
            if not _feeds_producer(g, tensor):
                continue  # the class layer: its outputs are classes, not units
            site = Site(node.name or out, kind, tensor, n, "producer", spatial=kind == "conv")
            if zero_ok:
                site.zero = zero + [(b, _bias_axis(g, b)) for b in biases]
            else:
                _try_consumers(g, site)
            sites.append(site)
        elif node.op_type == "Add" and all(i not in g.inits and g.const(i) is None for i in node.input):
            shape = shapes.get(node.output[0])
            if shape is None or len(shape) < 2 or any(shapes.get(i) != shape for i in node.input):
                continue
            tensor, _, _ = _follow_chain(g, node.output[0], shape[1])
            site = Site(node.name or node.output[0], "join", tensor, shape[1], "consumers", spatial=len(shape) > 2)
            _try_consumers(g, site)
            sites.append(site)
    if not any(s.prunable for s in sites):
        raise BadModel("model has no prunable layer (no Conv, Gemm or MatMul with constant weights whose units can be zeroed exactly)")
    return sites


def _feeds_producer(g: Graph, tensor: str) -> bool:
    """Is another weighted layer downstream? If not, `tensor` is the classifier's output (maybe via Softmax)."""
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        for node in g.consumers.get(t, []):
            if node.op_type in PRODUCERS:
                return True
            for o in node.output:
                if o not in seen:
                    seen.add(o)
                    stack.append(o)
    return False


def _bias_axis(g: Graph, name: str) -> int:
    v = g.const(name)
    return v.ndim - 1 if v.ndim <= 1 else 1 if v.shape[1] > 1 else v.ndim - 1


def _try_consumers(g: Graph, site: Site) -> None:
    slices, why = _trace_consumers(g, site.tensor, site.channels)
    if why or not slices:
        site.strategy, site.why_blocked = "blocked", why or "no linear consumer"
    else:
        site.strategy, site.slices = "consumers", slices


def last_stage(model: onnx.ModelProto, sites: list[Site]) -> list[Site]:
    """The spatial site whose maps feed the head (pooling / flatten): the one produced last in graph order."""
    candidates = [s for s in sites if s.spatial and s.prunable] or [s for s in sites if s.prunable]
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    return [max(candidates, key=lambda s: order.get(s.tensor, -1))]
