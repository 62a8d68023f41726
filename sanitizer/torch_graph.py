"""A differentiable torch module that interprets an ONNX graph node by node.

Pruning, trigger synthesis and repair need gradients through the exact ONNX graph, and the result must
be written back into the same graph, so we interpret the ModelProto directly instead of converting it to
a re-architected torch model: every float initializer becomes a Parameter named after it, and write_back
only swaps initializer values. Shape-computing subgraphs (Shape -> Gather -> Concat -> Reshape, Range, ...)
are evaluated eagerly on integer tensors in the same pass.
"""
from __future__ import annotations

import copy
import re
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import BadModel, require

torch = require("torch", "torch")
F = torch.nn.functional

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}

_ONNX_TO_TORCH_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _tensor(proto: onnx.TensorProto) -> "torch.Tensor":
    return torch.from_numpy(np.array(numpy_helper.to_array(proto), copy=True))


def _ints(t: "torch.Tensor | None") -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _pool_pads(attrs: dict, x: "torch.Tensor", kernel: list[int], strides: list[int], dilations: list[int]):
    """ONNX pads as (begins, ends) per spatial axis, resolving auto_pad against the input shape."""
    nd = len(kernel)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(nd):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        return begins, ends
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    return pads[:nd], pads[nd:]


def _torch_pad_arg(begins: list[int], ends: list[int]) -> list[int]:
    # F.pad lists the last axis first.
    out: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


def _conv(ins, attrs):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = w.dim() - 2
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    begins, ends = _pool_pads(attrs, x, kernel, strides, dilations)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    if begins == ends:
        padding = begins
    else:
        x = F.pad(x, _torch_pad_arg(begins, ends))
        padding = [0] * nd
    return conv(x, w, b, stride=strides, padding=padding, dilation=dilations, groups=attrs.get("group", 1))


def _gemm(ins, attrs):
    a, b = ins[0], ins[1]
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(ins) > 2 and ins[2] is not None:
        y = y + attrs.get("beta", 1.0) * ins[2]
    return y


def _div(ins, attrs):
    a, b = ins
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _clip(ins, attrs):
    x = ins[0]
    lo = ins[1] if len(ins) > 1 and ins[1] is not None else attrs.get("min")
    hi = ins[2] if len(ins) > 2 and ins[2] is not None else attrs.get("max")
    if isinstance(lo, torch.Tensor):
        lo = lo.item()
    if isinstance(hi, torch.Tensor):
        hi = hi.item()
    return torch.clamp(x, min=lo, max=hi)


def _batchnorm(ins, attrs):
    x, scale, bias, mean, var = ins[:5]
    # Written out rather than F.batch_norm, which refuses gradients w.r.t. the running statistics.
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale / torch.sqrt(var + attrs.get("epsilon", 1e-5))
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _pool_geometry(ins, attrs):
    x = ins[0]
    kernel = list(attrs["kernel_shape"])
    nd = len(kernel)
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    begins, ends = _pool_pads(attrs, x, kernel, strides, dilations)
    return x, kernel, strides, dilations, begins, ends


def _maxpool(ins, attrs):
    x, kernel, strides, dilations, begins, ends = _pool_geometry(ins, attrs)
    nd = len(kernel)
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
    if any(begins) or any(ends):
        # torch only pads symmetrically and at most half a kernel; -inf padding is exact for max.
        x = F.pad(x, _torch_pad_arg(begins, ends), value=float("-inf"))
    return pool(x, kernel, strides, 0, dilations, ceil_mode=bool(attrs.get("ceil_mode", 0)))


def _avgpool(ins, attrs):
    x, kernel, strides, _, begins, ends = _pool_geometry(ins, attrs)
    nd = len(kernel)
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    if not any(begins) and not any(ends):
        return pool(x, kernel, strides, 0, ceil_mode=ceil_mode)
    # sum(window) / count(counted cells) whatever divisor torch uses at clipped ceil-mode edges:
    # the ratio of two pools over the same windows cancels it.
    pad = _torch_pad_arg(begins, ends)
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype)
    counted = F.pad(ones, pad, value=1.0 if attrs.get("count_include_pad", 0) else 0.0)
    num = pool(F.pad(x, pad), kernel, strides, 0, ceil_mode=ceil_mode)
    den = pool(counted, kernel, strides, 0, ceil_mode=ceil_mode)
    return num / den


def _flatten(ins, attrs):
    x = ins[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return x.reshape(lead, -1)


def _reshape(ins, attrs):
    x, shape = ins[0], _ints(ins[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _axes(ins, attrs, position: int = 1) -> list[int] | None:
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(ins) > position and ins[position] is not None:
        return _ints(ins[position])
    return None


def _squeeze(ins, attrs):
    x = ins[0]
    axes = _axes(ins, attrs)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes)) if axes else x


def _unsqueeze(ins, attrs):
    x = ins[0]
    rank = x.dim() + len(_axes(ins, attrs))
    for a in sorted(a % rank for a in _axes(ins, attrs)):
        x = x.unsqueeze(a)
    return x


def _shape(ins, attrs):
    dims = list(ins[0].shape)
    start = attrs.get("start", 0)
    end = attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _gather(ins, attrs):
    data, idx = ins[0], ins[1].long()
    axis = attrs.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))


def _cast(ins, attrs):
    to = attrs["to"]
    if to not in _ONNX_TO_TORCH_DTYPE:
        raise BadModel(f"Cast to ONNX type {to} is not supported")
    return ins[0].to(_ONNX_TO_TORCH_DTYPE[to])


def _slice(ins, attrs):
    x = ins[0]
    if "starts" in attrs:  # opset < 10 keeps them as attributes
        starts, ends, axes, steps = list(attrs["starts"]), list(attrs["ends"]), attrs.get("axes"), None
    else:
        starts, ends = _ints(ins[1]), _ints(ins[2])
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else None
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        # Python's slice.indices clamps starts/ends exactly as ONNX specifies, for both step signs.
        index = torch.arange(*slice(start, end, step).indices(x.shape[axis]), dtype=torch.int64)
        x = torch.index_select(x, axis, index)
    return x


def _constant(ins, attrs):
    if "value" in attrs:
        return _tensor(attrs["value"])
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise BadModel(f"Constant node with attributes {sorted(attrs)} is not supported")


def _range(ins, attrs):
    start, limit, delta = (t.item() for t in ins[:3])
    return torch.arange(start, limit, delta, dtype=ins[0].dtype)


def _reduce_mean(ins, attrs):
    x = ins[0]
    axes = _axes(ins, attrs)
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.dim()))
    return x.mean(dim=tuple(axes), keepdim=keep)


def _softmax(ins, attrs):
    x = ins[0]
    if attrs["_opset"] >= 13:
        return torch.softmax(x, dim=attrs.get("axis", -1))
    # Before opset 13 Softmax flattens to 2-D at `axis` and normalizes the whole trailing block.
    axis = attrs.get("axis", 1) % x.dim()
    return torch.softmax(x.reshape(int(np.prod(x.shape[:axis])), -1), dim=1).reshape(x.shape)


_OPS: dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda ins, a: torch.matmul(ins[0], ins[1]),
    "Add": lambda ins, a: ins[0] + ins[1],
    "Sub": lambda ins, a: ins[0] - ins[1],
    "Mul": lambda ins, a: ins[0] * ins[1],
    "Div": _div,
    "Relu": lambda ins, a: torch.relu(ins[0]),
    "Clip": _clip,
    "LeakyRelu": lambda ins, a: F.leaky_relu(ins[0], a.get("alpha", 0.01)),
    "Sigmoid": lambda ins, a: torch.sigmoid(ins[0]),
    "BatchNormalization": _batchnorm,
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "GlobalAveragePool": lambda ins, a: ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda ins, a: ins[0].permute(list(a.get("perm", range(ins[0].dim() - 1, -1, -1)))),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Shape": _shape,
    "Gather": _gather,
    "Cast": _cast,
    "Slice": _slice,
    "Concat": lambda ins, a: torch.cat([t for t in ins if t is not None], dim=a["axis"]),
    "Constant": _constant,
    "Range": _range,
    "ReduceMean": _reduce_mean,
    "Identity": lambda ins, a: ins[0],
    "Dropout": lambda ins, a: ins[0],
    "Softmax": _softmax,
}


def _safe_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "_"
    if base[0].isdigit():
        base = "_" + base
    candidate, i = base, 1
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate


class TorchGraph(torch.nn.Module):
    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        taken: set[str] = set()
        self.params = torch.nn.ParameterDict()
        self.initializer_params: dict[str, torch.nn.Parameter] = {}
        self._constants: dict[str, torch.Tensor] = {}
        for init in graph.initializer:
            value = _tensor(init)
            if init.data_type in _FLOAT_TYPES:
                key = _safe_name(init.name, taken)
                self.params[key] = torch.nn.Parameter(value)
                self.initializer_params[init.name] = self.params[key]
            else:
                key = _safe_name(init.name, taken)
                self.register_buffer(key, value, persistent=False)
                self._constants[init.name] = key
        init_names = {i.name for i in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in init_names]
        if not inputs:
            raise BadModel("the model has no graph input")
        self.input_name = inputs[0]
        self.output_name = graph.output[0].name
        self._nodes = []
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
                raise BadModel(f"unsupported ONNX operator {node.domain + '.' if node.domain else ''}{node.op_type}"
                               f" (node {node.name or node.output[0]!r})")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            attrs["_opset"] = self.opset  # a few ops (Softmax) changed meaning across opsets
            self._nodes.append((_OPS[node.op_type], list(node.input), list(node.output), attrs))

    def _lookup(self, env: dict, name: str):
        if name == "":
            return None
        if name in env:
            return env[name]
        if name in self.initializer_params:
            return self.initializer_params[name]
        if name in self._constants:
            return getattr(self, self._constants[name])
        raise BadModel(f"tensor {name!r} is used before it is produced")

    def forward(self, x, *, capture: Sequence[str] = (), masks: Mapping[str, "torch.Tensor"] | None = None):
        masks = masks or {}

        def masked(name, t):
            m = masks.get(name)
            if m is None:
                return t
            # a 1-D mask is per channel (axis 1); a site with another unit axis passes it shaped (Site.mask_shape)
            return t * (m.reshape((1, -1) + (1,) * (t.dim() - 2)) if m.dim() == 1 else m)

        env: dict[str, torch.Tensor] = {self.input_name: masked(self.input_name, x)}
        for fn, ins, outs, attrs in self._nodes:
            result = fn([self._lookup(env, n) for n in ins], attrs)
            env[outs[0]] = masked(outs[0], result)
        missing = [n for n in capture if n not in env and n not in self.initializer_params]
        if missing:
            raise BadModel(f"cannot capture unknown tensors {missing[:3]}")
        return env[self.output_name], {n: self._lookup(env, n) for n in capture}

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        out = copy.deepcopy(model)
        for i, init in enumerate(out.graph.initializer):
            param = self.initializer_params.get(init.name)
            if param is None:
                continue
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
            out.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(param.detach().cpu().numpy().astype(dtype), init.name))
        return out


def to_torch(model: onnx.ModelProto, *, frozen: bool = False) -> TorchGraph:
    """`frozen`: the weights take no gradient — for searches that differentiate only with respect to the
    input or unit masks (detection, probes, attribution), not for the repair that tunes the weights."""
    graph = TorchGraph(model)
    if frozen:
        for p in graph.parameters():
            p.requires_grad_(False)
    return graph
