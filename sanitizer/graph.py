"""Units and how to zero them exactly: prunable sites found from the graph once.

A *site* is a tensor with one unit per index of its *unit axis*: the output of a Conv (axis 1: channels), of a
Gemm (axis 1 of [N, D]: neurons) or of a MatMul with a 2-D constant weight applied to every row of its input
(the last axis: dense neurons of [N, D], or features of [N, T, D] token tensors), after the per-unit ops that
follow it (BatchNorm, a bias Add/Sub, a Mul/Div scale, an activation, a QuantizeLinear→DequantizeLinear pair);
or the output of a residual Add (+ its per-unit ops), i.e. unit c of both branches at once. Statistics are
measured on the site tensor, the one its consumers read, reduced over every axis but the batch and the unit
axis. Each site gets one exact rewrite strategy:

- ``producer``: zero the producing weights and bias of unit c; valid when every op between producer and
  site maps 0 to 0 (no kept BatchNorm, Clip range contains 0).
- ``consumers``: zero the input slice of every linear consumer (Conv, Gemm, MatMul) reached through ops that
  only move or pool values and map 0 to 0 (pools, Flatten, Reshape, Transpose, ReLU, a Mul by a constant,
  Q/DQ pairs...). Unit identity is followed element by element through those ops, so Transpose/Flatten into a
  dense layer is exact.

A constant operand of Add/Sub/Mul/Div is per-unit iff, broadcast to the site tensor's shape, it varies only
along the unit axis; anything else ends the chain. Quantized (QDQ) weights are the integer initializers read
by a DequantizeLinear: "zero" there means the zero point, which dequantizes to exactly 0. An op that is not
understood on a path blocks the site rather than being guessed through.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from calib.stats import UnitAxis

PRODUCERS = {"Conv", "Gemm", "MatMul"}
# Quantized layers in the QOperator format: their units live in integer tensors; not supported (QDQ is).
QOPERATOR = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"}
# Elementwise and 0 -> 0: a zero channel stays zero, values never move between channels.
ZERO_KEEPING = {"Relu", "LeakyRelu", "Identity", "Dropout", "Elu", "Selu", "Celu", "Tanh", "PRelu", "Softsign",
                "HardSwish", "Gelu", "Erf", "Neg", "Abs", "Mish", "ThresholdedRelu"}
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
    channels: int              # number of units: the size of `tensor` along `axis`
    axis: int                  # the unit axis of `tensor` (1 for NCHW conv maps and [N, D], 2 for [N, T, D])
    rank: int                  # ndim of `tensor`
    strategy: str              # "producer" | "consumers" | "blocked"
    why_blocked: str = ""
    zero: list[tuple[str, int]] = field(default_factory=list)       # producer: (initializer, unit axis in it)
    slices: list[ConsumerSlice] = field(default_factory=list)        # consumers
    positions: int = 0         # values per unit in one image (H*W of a conv map; 1 for a dense unit); 0: unknown

    @property
    def prunable(self) -> bool:
        return self.strategy != "blocked"

    @property
    def mask_shape(self) -> tuple[int, ...]:
        """Shape a [channels] mask takes to broadcast along the unit axis of the site tensor."""
        return (1,) * self.axis + (self.channels,) + (1,) * (self.rank - self.axis - 1)


def stat_tensors(sites) -> dict[str, UnitAxis]:
    """The tensors to reduce for `sites`, each with its rank and unit axis (calib.stats reduces every other
    axis but the batch)."""
    return {s.tensor: UnitAxis(s.rank, s.axis) for s in sites}


# Ops a layer's weight may be read through from its initializer: float16 weights cast to float32, QDQ weights,
# exporters' aliases (_weight).
WEIGHT_CARRIERS = ("Cast", "Identity", "DequantizeLinear")
# onnxruntime's fused layers, what a session saves after its extended graph optimizations: not read, like QOPERATOR.
FUSED = frozenset({"FusedConv", "FusedGemm", "FusedMatMul", "NhwcConv"})


def blocked_reasons(sites, limit: int = 3) -> str:
    """The first `limit` blocked sites with why, for a one-line refusal."""
    blocked = [s for s in sites if not s.prunable]
    if not blocked:
        return "no Conv, Gemm or MatMul with constant weights feeds another weighted layer"
    parts = [f"{s.name}: {s.why_blocked}" for s in blocked[:limit]]
    more = f"; {len(blocked) - limit} more (see `sanitize layers`)" if len(blocked) > limit else ""
    return "; ".join(parts) + more


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


def _bound_keeps_zero(g: Graph, node: onnx.NodeProto, tensor: str, shape: tuple[int, ...], axis: int) -> bool | None:
    """For a Min or Max of `tensor` and a per-unit constant — an activation bound, as a sanitized model has them
    (rewrite.py) — whether 0 stays 0 (Min's constants ≥ 0, Max's ≤ 0); None when `node` is no such op."""
    other = _other_const(g, node, tensor) if node.op_type in ("Min", "Max") else None
    value = None if other is None else per_unit(g.const(other), shape, axis)
    if value is None:
        return None
    return bool(np.all(value >= 0) if node.op_type == "Min" else np.all(value <= 0))


def _other_const(g: Graph, node: onnx.NodeProto, tensor: str) -> str | None:
    """The constant operand of a binary op whose other operand is `tensor`, else None."""
    other = [i for i in node.input if i != tensor]
    return other[0] if len(other) == 1 and len(node.input) == 2 and g.const(other[0]) is not None else None


def _broadcasts_into(value: np.ndarray, shape: tuple[int, ...]) -> bool:
    """`value` broadcast against a tensor of `shape` leaves the shape as it is (it does not add or widen axes)."""
    try:
        return np.broadcast_shapes(value.shape, tuple(shape)) == tuple(shape)
    except ValueError:
        return False


def per_unit(value: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    """One value per unit when `value`, broadcast to `shape`, varies only along `axis`; else None.

    value: any constant (e.g. a bias [C], [C,1,1], [1,C,1,1], a scalar); shape: the site tensor's probed shape;
    returns [shape[axis]]. A 1-D [W] constant added to an [N, C, H, W] map varies along the width, not the
    channels, and gets None."""
    if not _broadcasts_into(value, shape):
        return None
    b = np.moveaxis(np.broadcast_to(value, shape), axis, 0).reshape(shape[axis], -1)
    return b[:, 0] if np.all(b == b[:, :1]) else None


def _unit_dim(value: np.ndarray, rank: int, axis: int, units: int) -> int | None:
    """The axis of a per-unit constant that holds one entry per unit (it lines up with the tensor's unit axis
    under broadcasting), or None when the constant is shared by every unit (a scalar)."""
    d = value.ndim - (rank - axis)
    return d if d >= 0 and value.shape[d] == units else None


def dequantized(g: Graph, node: onnx.NodeProto) -> onnx.NodeProto | None:
    """For a QuantizeLinear whose only reader is a DequantizeLinear with the same zero point and axis, that
    DequantizeLinear: the pair maps 0 to exactly 0 (quantize(0) = zero point, dequantize(zero point) = 0) and
    keeps every value in place, so it is followed like an elementwise op."""
    dq = g.only_consumer(node.output[0])
    if dq is None or dq.op_type != "DequantizeLinear" or attr(node, "axis", 1) != attr(dq, "axis", 1):
        return None
    zq = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
    zd = g.const(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.uint8)
    if zq is None or zd is None or zq.shape != zd.shape or not np.array_equal(zq, zd):
        return None
    return dq


def _follow_chain(g: Graph, start: str, channels: int, axis: int):
    """Walk the single-consumer per-unit ops after `start`. Returns (site tensor, zero_ok, [(bias, unit dim)],
    unit axis of the site tensor)."""
    tensor, zero_ok, biases = start, True, []
    shape = g.shapes.get(start)
    while shape is not None and (node := g.only_consumer(tensor)) is not None:
        op = node.op_type
        if op in ZERO_KEEPING:
            pass
        elif op == "Clip":
            zero_ok &= _clip_keeps_zero(g, node)
        elif (kept := _bound_keeps_zero(g, node, tensor, shape, axis)) is not None:
            zero_ok &= kept
        elif op == "BatchNormalization" and axis == 1 and all(g.const(i) is not None for i in node.input[1:5]):
            zero_ok = False
        elif op in ("Sigmoid", "HardSigmoid", "Softplus"):
            zero_ok = False
        elif op in ("Add", "Sub", "Mul", "Div") and (other := _other_const(g, node, tensor)) is not None:
            value = per_unit(g.const(other), shape, axis)
            if value is None:
                break  # varies along another axis: not a per-unit operation
            if op in ("Add", "Sub"):
                if not g.private(other):
                    break
                dim = _unit_dim(g.const(other), len(shape), axis, channels)
                if dim is None:
                    zero_ok &= channels == 1  # one shift shared by every unit cannot be zeroed for one
                else:
                    biases.append((other, dim))
            elif op == "Div" and (node.input[0] != tensor or np.any(value == 0)):
                break  # c / x, or 0 / 0
        elif op == "QuantizeLinear" and (dq := dequantized(g, node)) is not None:
            node = dq
        elif op == "Reshape" and axis == len(shape) - 1 and (new := g.shapes.get(node.output[0])) \
                and new[-1] == channels:
            # units on the last axis stay there when the last axis is kept: dynamo's Gemm over [N*T, D] rows
            # reshaped back to [N, T, D]
            axis, shape = len(new) - 1, new
        else:
            break
        tensor = node.output[0]
    return tensor, zero_ok, biases, axis


def _weight(g: Graph, name: str) -> tuple[str, np.ndarray] | None:
    """The initializer that holds a layer's weight and its value, when this layer alone reads it: the weight
    itself, or the initializer behind a DequantizeLinear (QDQ int8 weights), a Cast (float16 weights in a
    float32 graph) or an Identity (some exporters' weight aliases) that only this layer reads."""
    if g.private(name):
        return name, g.const(name)
    node = g.producer.get(name)
    if node is None or not node.input or g.only_consumer(name) is None or not g.private(node.input[0]):
        return None
    if node.op_type in WEIGHT_CARRIERS and not (node.op_type == "DequantizeLinear" and attr(node, "block_size", 0)):
        return node.input[0], g.const(node.input[0])
    return None


def _producer_weights(g: Graph, node: onnx.NodeProto) -> tuple[list[tuple[str, int]], int] | None:
    """Initializers holding each output unit and their unit axis, and the unit count."""
    found = _weight(g, node.input[1]) if len(node.input) > 1 else None
    if found is None:
        return None
    init, w = found
    bias = _weight(g, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if node.op_type == "Conv":
        zero, n = [(init, 0)], w.shape[0]
    elif node.op_type == "Gemm":
        if w.ndim != 2 or attr(node, "transA", 0):
            return None
        axis = 0 if attr(node, "transB", 0) else 1
        zero, n = [(init, axis)], w.shape[axis]
    else:  # MatMul with a 2-D weight on the right: one unit per output column, whatever the input's rank
        if w.ndim != 2 or node.input[0] == node.input[1]:
            return None
        zero, n = [(init, 1)], w.shape[1]
    if bias is not None:
        if bias[1].size != n:
            return None
        zero.append((bias[0], 0))
    return zero, n


def _trace_consumers(g: Graph, site: str, channels: int, axis: int) -> tuple[list[ConsumerSlice], str]:
    """Follow unit identity from `site` to every linear consumer; return slices or a reason to block."""
    if site not in g.shapes:
        return [], f"shape of {site} unknown"
    shape = g.shapes[site]
    ids = np.broadcast_to(np.arange(channels).reshape((channels,) + (1,) * (len(shape) - axis - 1)), shape).copy()
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
            scaled = op in ("Mul", "Div") and _scales_in_place(g, node, tensor, ids.shape)
            if not scaled and (node.input[0] != tensor or any(i == tensor for i in node.input[1:])):
                if op in ("Gemm", "MatMul", "Conv"):
                    return [], f"{node.name or op} reads it as a weight"
                return [], f"{op} {node.name} mixes it with another tensor"
            out = node.output[0]
            if op in ZERO_KEEPING or scaled or op == "Clip" and _clip_keeps_zero(g, node):
                stack.append((out, ids))
            elif op == "QuantizeLinear" and (dq := dequantized(g, node)) is not None:
                stack.append((dq.output[0], ids))
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


def _scales_in_place(g: Graph, node: onnx.NodeProto, tensor: str, shape: tuple[int, ...]) -> bool:
    """x * k, k * x or x / k with a finite constant k (non-zero for Div) that does not reshape x: 0 stays 0
    where it is."""
    other = _other_const(g, node, tensor)
    if other is None or node.op_type == "Div" and node.input[0] != tensor:
        return False
    k = g.const(other)
    if not _broadcasts_into(k, shape) or not np.all(np.isfinite(k)):
        return False
    return node.op_type == "Mul" or bool(np.all(k != 0))


def _move_ids(g: Graph, node: onnx.NodeProto, ids: np.ndarray) -> np.ndarray | None:
    out_shape = g.shapes.get(node.output[0])
    if out_shape is None:
        return None
    op = node.op_type
    if op in ("ReduceMean", "ReduceMax"):
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = g.const(node.input[1])
            if axes is None:
                return None
        axes = sorted({int(a) % ids.ndim for a in np.ravel(axes)}) if axes is not None else list(range(ids.ndim))
        if 0 in axes:
            return None
        # a reduction is exact only over positions of one unit: mean or max of zeros is zero
        first = ids[tuple(slice(0, 1) if a in axes else slice(None) for a in range(ids.ndim))]
        if not np.all(ids == first):
            return None
        kept = first if attr(node, "keepdims", 1) else first.reshape([n for a, n in enumerate(first.shape)
                                                                      if a not in axes])
        return kept.copy() if tuple(kept.shape) == tuple(out_shape) else None
    if op in POOLING:
        if len(out_shape) < 2 or ids.ndim < 3 or out_shape[1] != ids.shape[1]:
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


def _consumer_slice(g: Graph, node: onnx.NodeProto, ids: np.ndarray, channels: int) -> ConsumerSlice | None:
    found = _weight(g, node.input[1]) if len(node.input) > 1 else None
    if found is None:
        return None
    init, w = found
    if node.op_type == "Conv":
        if ids.ndim < 3 or not np.all(ids == ids[:1]):
            return None  # every image of the probe batch must map channels to the same positions
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
        return ConsumerSlice(init, 1, index, rows if groups > 1 else None)
    if node.op_type == "Gemm":
        if ids.ndim != 2 or attr(node, "transA", 0):
            return None
        axis = 1 if attr(node, "transB", 0) else 0
    else:
        if w.ndim != 2 or ids.ndim < 2:
            return None
        axis = 0
    # a dense layer reads the last axis of every row (image, token) the same way: rows must agree
    rows = ids.reshape(-1, ids.shape[-1])
    if not np.all(rows == rows[:1]):
        return None
    return ConsumerSlice(init, axis, {c: np.flatnonzero(rows[0] == c) for c in range(channels)})


def _unit_axis(g: Graph, tensor: str) -> int:
    """Where the layer upstream of `tensor` put its units, followed up through elementwise ops and Transposes:
    1 after a Conv, the last axis after a dense layer; 1 (NCHW channels) when nothing says otherwise."""
    perms: list[list[int]] = []
    while (node := g.producer.get(tensor)) is not None:
        op = node.op_type
        if op == "Conv":
            axis = 1
            break
        if op in ("Gemm", "MatMul") and node.output[0] in g.shapes:
            axis = len(g.shapes[node.output[0]]) - 1
            break
        if op == "Transpose" and attr(node, "perm"):
            perms.append(list(attr(node, "perm")))
        elif op not in ZERO_KEEPING | {"Clip", "Min", "Max", "BatchNormalization", "Add", "Sub", "Mul", "Div", "Sigmoid",
                                       "HardSigmoid", "QuantizeLinear", "DequantizeLinear"}:
            return 1
        ins = [i for i in node.input if i and g.const(i) is None]
        if not ins:
            return 1
        tensor = ins[0]
    else:
        return 1
    for perm in reversed(perms):
        if axis >= len(perm):
            return 1
        axis = perm.index(axis)
    return axis


def find_sites(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
               ints: dict[str, np.ndarray] | None = None) -> list[Site]:
    """Every candidate site of `model`, prunable or blocked with its reason, in graph order.

    shapes: probed shapes of the float tensors (calib.stats.probe_shapes); ints: probed small integer tensors.
    May return no prunable site at all: the caller refuses (pipeline.scope) or lists why (`sanitize layers`)."""
    g = Graph(model, shapes, ints)
    # the probe ran one image, or the fixed batch: a site tensor must keep that as its first axis
    dims = next(i for i in model.graph.input if i.name not in g.inits).type.tensor_type.shape.dim
    batch = (dims[0].dim_value if dims else 0) or 1
    sites: list[Site] = []
    for node in model.graph.node:
        if node.op_type in QOPERATOR or node.op_type in FUSED:
            # listed, so that a partly quantized or fused model does not pass for one whose every layer was read
            sites.append(_unread_site(g, node))
        elif node.op_type in PRODUCERS:
            found = _producer_weights(g, node)
            out = node.output[0]
            if out not in shapes:
                continue
            if found is None:
                computed = _computed_weight_site(g, node, shapes)
                if computed is not None:
                    sites.append(computed)
                continue
            zero, n = found
            kind = "conv" if node.op_type == "Conv" else "dense"
            rank = len(shapes[out])
            axis = 1 if kind == "conv" or node.op_type == "Gemm" else rank - 1
            if rank < 2 or shapes[out][axis] != n:
                continue
            tensor, zero_ok, biases, axis = _follow_chain(g, out, n, axis)
            if not _feeds_producer(g, tensor):
                continue  # the class layer: its outputs are classes, not units
            site = Site(node.name or out, kind, tensor, n, axis, len(shapes[tensor]), "producer")
            if tensor in g.outputs:
                # zeroing the layer would change what the graph exposes (e.g. its features beside the logits)
                site.strategy, site.why_blocked = "blocked", f"{tensor} is a graph output"
            elif zero_ok:
                site.zero = zero + biases
            else:
                _try_consumers(g, site)
            sites.append(site)
        elif node.op_type == "Add" and all(i not in g.inits and g.const(i) is None for i in node.input):
            shape = shapes.get(node.output[0])
            if shape is None or len(shape) < 2 or any(shapes.get(i) != shape for i in node.input):
                continue
            axis = _unit_axis(g, node.input[0])
            tensor, _, _, axis = _follow_chain(g, node.output[0], shape[axis], axis)
            site = Site(node.name or node.output[0], "join", tensor, shapes[tensor][axis], axis, len(shapes[tensor]),
                        "consumers")
            _try_consumers(g, site)
            sites.append(site)
    for site in sites:
        if site.tensor in shapes:
            site.positions = int(np.prod([d for i, d in enumerate(shapes[site.tensor]) if i not in (0, site.axis)]))
        if site.prunable and shapes[site.tensor][0] != batch:
            # statistics are per image: rows that mix images and tokens would be read as images
            site.strategy, site.why_blocked = "blocked", (f"{site.tensor} folds the batch into its rows "
                                                          f"{shapes[site.tensor]}: no per-image units")
    return sites


def _unread_site(g: Graph, node: onnx.NodeProto) -> Site:
    """A layer in a form the analysis does not read (QOPERATOR, FUSED), as a blocked site saying why."""
    out = node.output[0]
    conv = "Conv" in node.op_type
    at = 3 if node.op_type.startswith("QLinear") else 1
    weight = g.const(node.input[at]) if len(node.input) > at else None
    units = 0 if weight is None else weight.shape[0 if conv else -1]
    why = (f"{node.op_type} is a QOperator-format quantized layer (not supported; quantize to the QDQ format, "
           "QuantFormat.QDQ)" if node.op_type in QOPERATOR else
           f"{node.op_type} is onnxruntime's fused form of a layer (not read: give the model as exported, before "
           "onnxruntime's graph optimizations)")
    return Site(node.name or out, "conv" if conv else "dense", out, units, 1, 4 if conv else 2, "blocked", why)


def _computed_weight_site(g: Graph, node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> Site | None:
    """A Conv or Gemm whose weight is computed at run time (weight_norm exported without constant folding),
    listed as a blocked site so that it is named, not missing; None for any other layer — a MatMul of two
    computed tensors (attention) is not a layer with units."""
    out = node.output[0]
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or len(shapes[out]) < 2 \
            or not _feeds_producer(g, out):
        return None
    # a constant weight behind a Cast, Identity or DequantizeLinear that _weight refused (shared with another
    # layer, block-quantized) is not computed: it stays out of the list, as before
    weight = node.input[1]
    while (p := g.producer.get(weight)) is not None and p.op_type in WEIGHT_CARRIERS and p.input:
        weight = p.input[0]
    if g.const(weight) is not None:
        return None
    return Site(node.name or out, "conv" if node.op_type == "Conv" else "dense", out, shapes[out][1], 1,
                len(shapes[out]), "blocked", f"its weight {node.input[1]!r} is computed at run time, not a constant "
                "(weight_norm and the like: export with constant folding)")


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


def _try_consumers(g: Graph, site: Site) -> None:
    slices, why = _trace_consumers(g, site.tensor, site.channels, site.axis)
    if why or not slices:
        site.strategy, site.why_blocked = "blocked", why or "no linear consumer"
    else:
        site.strategy, site.slices = "consumers", slices


def zero_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Per quantized initializer (read by a DequantizeLinear), the stored value that dequantizes to exactly 0:
    its zero point, shaped to broadcast against it (per-tensor: a scalar; per-axis: along the DQ's axis).
    Initializers not listed are zeroed with 0."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        rank = len(inits[node.input[0]].dims)
        zp = (numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] in inits
              else np.zeros(()))
        if zp.ndim == 1 and rank > 1:
            axis = attr(node, "axis", 1) % rank
            zp = zp.reshape((-1,) + (1,) * (rank - axis - 1))
        out[node.input[0]] = zp
    return out


def last_stage(model: onnx.ModelProto, sites: list[Site]) -> list[Site]:
    """The conv-map site whose maps feed the head (pooling / flatten): the one produced last in graph order,
    among those with a spatial map — a conv on pooled 1x1 maps (a squeeze-excitation gate) has none, and the
    ℓ∞ over its map is a single value. Empty when no site is prunable."""
    prunable = [s for s in sites if s.prunable]
    candidates = [s for s in prunable if s.kind != "dense" and s.axis == 1 and s.rank > 2 and s.positions != 1] \
        or prunable
    if not candidates:
        return []
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    return [max(candidates, key=lambda s: order.get(s.tensor, -1))]
