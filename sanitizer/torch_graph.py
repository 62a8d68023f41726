"""A differentiable torch module that interprets an ONNX graph node by node.

Pruning, trigger synthesis and repair need gradients through the exact ONNX graph, and the result must
be written back into the same graph, so we interpret the ModelProto directly instead of converting it to
a re-architected torch model: every float initializer becomes a Parameter named after it, and write_back
only swaps initializer values. Shape-computing subgraphs (Shape -> Gather -> Concat -> Reshape, Range, ...)
are evaluated eagerly on integer tensors in the same pass.

float16 and bfloat16 tensors (weights, constants, Casts, the image input) are computed in float32: CPU
torch lacks half kernels for several ops, and the repair's small Adam steps would vanish in half-precision
weights; write_back rounds the weights back to their stored type. A model whose input has a fixed batch
runs larger batches in chunks of that size (see TorchGraph.forward).
"""
from __future__ import annotations

import copy
import functools
import math
import re
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import BadModel, require

torch = require("torch", "torch")
F = torch.nn.functional

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                onnx.TensorProto.BFLOAT16}

# The dtype each ONNX type is computed in (half types in float32, see the module docstring).
_ONNX_TO_TORCH_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float32,
    onnx.TensorProto.BFLOAT16: torch.float32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.UINT16: torch.int64,
    onnx.TensorProto.UINT32: torch.int64,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


# Appended to every refusal of an op or attribute: the user's way around the torch path.
AVOID = ("in the torch path (the default criterion, --detect, --suspect); pass --criterion linf without --detect "
         "to use the clean-data criterion, which runs on onnxruntime only")


def _unsupported(what: str) -> BadModel:
    return BadModel(f"{what} {AVOID}")


def _tensor(proto: onnx.TensorProto) -> "torch.Tensor":
    if proto.data_type not in _ONNX_TO_TORCH_DTYPE:
        raise _unsupported(f"tensor {proto.name!r} of ONNX type "
                           f"{onnx.TensorProto.DataType.Name(proto.data_type)} is not supported")
    value = np.asarray(numpy_helper.to_array(proto))
    if proto.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
        value = value.astype(np.float32)
    elif proto.data_type in (onnx.TensorProto.UINT16, onnx.TensorProto.UINT32):
        value = value.astype(np.int64)
    return torch.from_numpy(np.array(value, copy=True))


def _str(attrs: dict, key: str, default: str) -> str:
    value = attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


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
        lo = lo.detach().item()
    if isinstance(hi, torch.Tensor):
        hi = hi.detach().item()
    if lo is None and hi is None:
        return x
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
        raise _unsupported(f"Cast to ONNX type {onnx.TensorProto.DataType.Name(to)} is not supported")
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
    raise _unsupported(f"Constant node with attributes {sorted(k for k in attrs if not k.startswith('_'))} "
                       "is not supported")


def _range(ins, attrs):
    start, limit, delta = (t.detach().item() for t in ins[:3])
    return torch.arange(start, limit, delta, dtype=ins[0].dtype)


def _softmax(fn):
    """Softmax / LogSoftmax; before opset 13 they flatten to 2-D at `axis` and normalize the whole
    trailing block."""
    def op(ins, attrs):
        x = ins[0]
        if attrs["_opset"] >= 13:
            return fn(x, dim=attrs.get("axis", -1))
        axis = attrs.get("axis", 1) % x.dim()
        return fn(x.reshape(int(np.prod(x.shape[:axis])), -1), dim=1).reshape(x.shape)
    return op


def _reduce(fn, elementwise=lambda x: x):
    """ONNX Reduce*: axes as attribute (older opsets) or as second input, keepdims, noop_with_empty_axes
    (which still applies the reduction's elementwise part: |x| for L1/L2, x² for SumSquare)."""
    def op(ins, attrs):
        x = ins[0]
        axes = _axes(ins, attrs)
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return elementwise(x)
            axes = range(x.dim())
        return fn(x, tuple(sorted({a % x.dim() for a in axes})), bool(attrs.get("keepdims", 1)))
    return op


def _arg_extreme(fn):
    def op(ins, attrs):
        x = ins[0]
        axis = attrs.get("axis", 0) % x.dim()
        keep = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
            return x.shape[axis] - 1 - flipped
        return fn(x, dim=axis, keepdim=keep)
    return op


def _topk(ins, attrs):
    x = ins[0]
    k = int(ins[1].reshape(-1)[0]) if len(ins) > 1 and ins[1] is not None else attrs["k"]
    values, indices = torch.topk(x, k, dim=attrs.get("axis", -1), largest=bool(attrs.get("largest", 1)),
                                 sorted=True)
    return values, indices


def _layer_norm(ins, attrs):
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = attrs.get("axis", -1) % x.dim()
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    inv = torch.rsqrt(var + attrs.get("epsilon", 1e-5))
    y = (x - mean) * inv * scale
    if bias is not None:
        y = y + bias
    return y, mean, inv


def _group_norm(ins, attrs):
    x, scale, bias = ins[:3]
    groups = attrs["num_groups"]
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    mean = g.mean(dim=2, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=2, keepdim=True)
    y = ((g - mean) * torch.rsqrt(var + attrs.get("epsilon", 1e-5))).reshape(x.shape)
    if attrs["_opset"] < 21:  # opset 18 scales per group, opset 21 per channel
        scale, bias = scale.repeat_interleave(c // groups), bias.repeat_interleave(c // groups)
    shape = (1, c) + (1,) * (x.dim() - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


def _lrn(ins, attrs):
    x, size = ins[0], attrs["size"]
    n, c = x.shape[:2]
    sq = (x * x).reshape(n, 1, c, -1)
    # ONNX pads the channel window floor((size-1)/2) before and ceil((size-1)/2) after.
    sq = F.pad(sq, (0, 0, (size - 1) // 2, size // 2))
    total = F.avg_pool2d(sq, (size, 1), stride=1) * size
    div = (attrs.get("bias", 1.0) + attrs.get("alpha", 1e-4) / size * total) ** attrs.get("beta", 0.75)
    return x / div.reshape(x.shape)


def _conv_transpose(ins, attrs):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    nd = w.dim() - 2
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    kernel = list(attrs.get("kernel_shape", w.shape[2:]))
    out_pad = list(attrs.get("output_padding", [0] * nd))
    full = [(x.shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + out_pad[i] for i in range(nd)]
    auto_pad = _str(attrs, "auto_pad", "NOTSET")
    if "output_shape" in attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(attrs["output_shape"])[-nd:] if "output_shape" in attrs \
            else [x.shape[2 + i] * strides[i] for i in range(nd)]
        total = [f - t for f, t in zip(full, target)]
        if auto_pad != "SAME_UPPER":  # onnxruntime puts the larger half first unless SAME_UPPER
            begins, ends = [t - t // 2 for t in total], [t // 2 for t in total]
        else:
            begins, ends = [t // 2 for t in total], [t - t // 2 for t in total]
    elif auto_pad == "VALID":
        begins = ends = [0] * nd
    else:
        pads = list(attrs.get("pads", [0] * (2 * nd)))
        begins, ends = pads[:nd], pads[nd:]
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[nd]
    # torch pads symmetrically; transpose without padding, then crop each side.
    y = conv(x, w, b, stride=strides, padding=0, output_padding=out_pad, groups=attrs.get("group", 1),
             dilation=dilations)
    for i in range(nd):
        y = y.narrow(2 + i, begins[i], y.shape[2 + i] - begins[i] - ends[i])
    return y


def _pad(ins, attrs):
    x = ins[0]
    if "pads" in attrs:  # opset < 11
        pads, value, axes = list(attrs["pads"]), attrs.get("value", 0.0), None
    else:
        pads = _ints(ins[1])
        value = ins[2].detach().item() if len(ins) > 2 and ins[2] is not None and ins[2].numel() else 0.0
        axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else None
    axes = [a % x.dim() for a in axes] if axes is not None else list(range(x.dim()))
    k = len(axes)
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i, a in enumerate(axes):
        begins[a], ends[a] = pads[i], pads[k + i]
    mode = _str(attrs, "mode", "constant")
    if mode == "constant":
        return F.pad(x, _torch_pad_arg(begins, ends), value=value)
    for a in range(x.dim()):
        # negative pads crop first; edge, reflect and wrap then extend what is left
        x = x.narrow(a, max(-begins[a], 0), x.shape[a] - max(-begins[a], 0) - max(-ends[a], 0))
        if begins[a] <= 0 and ends[a] <= 0:
            continue
        size = x.shape[a]
        idx = torch.arange(-max(begins[a], 0), size + max(ends[a], 0))
        if mode == "edge":
            idx = idx.clamp(0, size - 1)
        elif mode == "reflect":
            period = 2 * size - 2
            idx = idx.abs() % period if period else torch.zeros_like(idx)
            idx = torch.where(idx >= size, period - idx, idx)
        elif mode == "wrap":
            idx = idx % size
        x = torch.index_select(x, a, idx)
    return x


def _split(ins, attrs):
    x = ins[0]
    axis = attrs.get("axis", 0) % x.dim()
    size = x.shape[axis]
    if "split" in attrs:
        sizes = list(attrs["split"])
    elif len(ins) > 1 and ins[1] is not None:
        sizes = _ints(ins[1])
    elif "num_outputs" in attrs:
        # ceil-sized chunks; trailing outputs may be short or empty, as onnxruntime produces them
        step = -(-size // attrs["num_outputs"])
        sizes = [max(0, min(step, size - i * step)) for i in range(attrs["num_outputs"])]
    else:
        n = attrs["_n_outputs"]
        sizes = [size // n] * n
    return tuple(torch.split(x, sizes, dim=axis))


def _nearest(x_orig: "torch.Tensor", mode: str) -> "torch.Tensor":
    if mode == "floor":
        return torch.floor(x_orig)
    if mode == "ceil":
        return torch.ceil(x_orig)
    half = torch.floor(x_orig) + 0.5 == x_orig
    if mode == "round_prefer_floor":
        return torch.where(half, torch.floor(x_orig), torch.round(x_orig))
    return torch.where(half, torch.ceil(x_orig), torch.round(x_orig))  # round_prefer_ceil


def _resize(ins, attrs):
    """Resize (opset 10+) and Upsample: nearest or (bi/tri)linear along each resized axis, separably."""
    x = ins[0]
    opset = attrs["_opset"]
    mode = _str(attrs, "mode", "nearest")
    if "scales" in attrs:  # Upsample before opset 9
        scales, sizes = list(attrs["scales"]), None
    elif attrs["_op"] == "Upsample" or opset < 11:
        scales, sizes = [float(v) for v in ins[1].detach().reshape(-1).tolist()], None
    else:
        scales = [float(v) for v in ins[2].detach().reshape(-1).tolist()] if len(ins) > 2 and ins[2] is not None \
            and ins[2].numel() else None
        sizes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None and ins[3].numel() else None
    axes = [a % x.dim() for a in attrs["axes"]] if "axes" in attrs else list(range(x.dim()))
    in_sizes = [x.shape[a] for a in axes]
    if sizes is not None:
        policy = _str(attrs, "keep_aspect_ratio_policy", "stretch")
        ratios = [float(np.float32(o) / np.float32(i)) for o, i in zip(sizes, in_sizes)]
        if policy != "stretch":
            r = min(ratios) if policy == "not_larger" else max(ratios)
            ratios = [r] * len(axes)
            sizes = [int(math.floor(r * i + 0.5)) for i in in_sizes]
        scales = ratios
    else:
        sizes = [int(np.float32(s) * np.float32(i)) for i, s in zip(in_sizes, scales)]
    if opset < 11 or attrs["_op"] == "Upsample":
        coord, nearest = "asymmetric", "simple"
    else:
        coord = _str(attrs, "coordinate_transformation_mode", "half_pixel")
        nearest = _str(attrs, "nearest_mode", "round_prefer_floor")
    for a, size_in, size_out, s in zip(axes, in_sizes, sizes, scales):
        if size_in == size_out and s == 1.0 and coord != "half_pixel_symmetric":
            continue
        if mode == "linear" and attrs.get("antialias", 0) and size_out < size_in:
            raise _unsupported("Resize with antialias=1 when downscaling is not supported")
        # numpy float32 in onnxruntime's order of operations (torch divides by a reciprocal): nearest
        # picks flip at exact halves otherwise
        f = np.float32
        out, s, n_in, n_out = np.arange(size_out, dtype=f), f(s), f(size_in), f(size_out)
        if coord == "asymmetric":
            x_orig = out / s
        elif coord == "align_corners":
            x_orig = out * (n_in - 1) / (n_out - 1) if size_out > 1 else np.zeros_like(out)
        elif coord == "pytorch_half_pixel":
            x_orig = (out + f(0.5)) / s - f(0.5) if size_out > 1 else np.zeros_like(out)
        elif coord == "half_pixel_symmetric":
            adjustment = n_out / (s * n_in)
            x_orig = n_in / f(2) * (f(1) - adjustment) + (out + f(0.5)) / s - f(0.5)
        else:  # half_pixel
            x_orig = (out + f(0.5)) / s - f(0.5)
        x_orig = torch.from_numpy(np.asarray(x_orig, f))
        if mode == "nearest":
            # before opset 11 onnxruntime rounds down when upscaling an axis and up when downscaling it
            rounding = ("ceil" if s < 1 else "floor") if nearest == "simple" else nearest
            idx = _nearest(x_orig, rounding).long().clamp(0, size_in - 1)
            x = torch.index_select(x, a, idx)
            continue
        x_orig = x_orig.clamp(0, size_in - 1)
        lo = torch.floor(x_orig).long()
        hi = (lo + 1).clamp(max=size_in - 1)
        w = (x_orig - lo).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1 - a))
        x = torch.index_select(x, a, lo) * (1 - w) + torch.index_select(x, a, hi) * w
    return x


def _check_resize(attrs):
    mode = _str(attrs, "mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear"):
        raise _unsupported(f"{attrs['_op']} mode {mode!r} is not supported (nearest and linear are)")
    coord = _str(attrs, "coordinate_transformation_mode", "half_pixel")
    if coord not in ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric"):
        raise _unsupported(f"{attrs['_op']} coordinate_transformation_mode {coord!r} is not supported")


def _depth_to_space(ins, attrs):
    x, b = ins[0], attrs["blocksize"]
    n, c, h, w = x.shape
    if _str(attrs, "mode", "DCR") == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(ins, attrs):
    x, b = ins[0], attrs["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)


def _constant_of_shape(ins, attrs):
    value = _tensor(attrs["value"]).reshape(-1) if "value" in attrs else torch.zeros(1)
    return torch.full(tuple(_ints(ins[0])), value[0].item(), dtype=value.dtype)


def _expand(ins, attrs):
    x = ins[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(ins[1]))))


def _pow(ins, attrs):
    a, b = ins
    return torch.pow(a, b).to(a.dtype)


def _mod(ins, attrs):
    a, b = ins
    return torch.fmod(a, b) if attrs.get("fmod", 0) else torch.remainder(a, b)


def _gather_elements(ins, attrs):
    data, idx = ins[0], ins[1].long()
    axis = attrs.get("axis", 0) % data.dim()
    return torch.gather(data, axis, torch.where(idx < 0, idx + data.shape[axis], idx))


def _prelu(ins, attrs):
    x, slope = ins
    return torch.where(x >= 0, x, x * slope)


_QUANT_RANGE = {onnx.TensorProto.INT8: (-128, 127), onnx.TensorProto.UINT8: (0, 255),
                onnx.TensorProto.INT16: (-32768, 32767)}


def _per_axis(v: "torch.Tensor", x: "torch.Tensor", attrs) -> "torch.Tensor":
    if v.dim() == 0 or v.numel() == 1:
        return v.reshape(())
    axis = attrs.get("axis", 1) % x.dim()
    return v.reshape((-1,) + (1,) * (x.dim() - 1 - axis))


def _quantize(ins, attrs):
    """QuantizeLinear as fake quantization: integer values in a float tensor, gradients passed straight
    through inside the representable range (the quantization-aware-training estimator)."""
    x, scale = ins[0], ins[1]
    zero = ins[2] if len(ins) > 2 and ins[2] is not None else None
    if zero is None:
        qtype = attrs.get("output_dtype", onnx.TensorProto.UINT8)
    else:
        qtype = {torch.int8: onnx.TensorProto.INT8, torch.uint8: onnx.TensorProto.UINT8,
                 torch.int16: onnx.TensorProto.INT16}.get(zero.dtype)
    if qtype not in _QUANT_RANGE:
        raise _unsupported("QuantizeLinear to a type other than int8/uint8/int16 is not supported")
    lo, hi = _QUANT_RANGE[qtype]
    q = x / _per_axis(scale, x, attrs)
    if zero is not None:
        q = q + _per_axis(zero, x, attrs).to(q.dtype)
    q = q.clamp(lo, hi)
    return q + (torch.round(q) - q).detach()


def _dequantize(ins, attrs):
    x, scale = ins[0], ins[1]
    zero = ins[2] if len(ins) > 2 and ins[2] is not None else None
    x = x.to(scale.dtype)
    if zero is not None:
        x = x - _per_axis(zero, x, attrs).to(scale.dtype)
    return x * _per_axis(scale, x, attrs)


def _variadic(fn):
    return lambda ins, a: functools.reduce(fn, [t for t in ins if t is not None])


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
    "Tanh": lambda ins, a: torch.tanh(ins[0]),
    "Elu": lambda ins, a: F.elu(ins[0], a.get("alpha", 1.0)),
    "Selu": lambda ins, a: a.get("gamma", 1.05070102214813232421875)
    * F.elu(ins[0], a.get("alpha", 1.67326319217681884765625)),
    "Celu": lambda ins, a: F.celu(ins[0], a.get("alpha", 1.0)),
    "Gelu": lambda ins, a: F.gelu(ins[0], approximate=_str(a, "approximate", "none")),
    "Erf": lambda ins, a: torch.erf(ins[0]),
    "HardSigmoid": lambda ins, a: torch.clamp(a.get("alpha", 0.2) * ins[0] + a.get("beta", 0.5), 0, 1),
    "HardSwish": lambda ins, a: F.hardswish(ins[0]),
    "Softplus": lambda ins, a: F.softplus(ins[0]),
    "Softsign": lambda ins, a: F.softsign(ins[0]),
    "Mish": lambda ins, a: F.mish(ins[0]),
    "ThresholdedRelu": lambda ins, a: ins[0] * (ins[0] > a.get("alpha", 1.0)),
    "PRelu": _prelu,
    "Exp": lambda ins, a: torch.exp(ins[0]),
    "Log": lambda ins, a: torch.log(ins[0]),
    "Sqrt": lambda ins, a: torch.sqrt(ins[0]),
    "Reciprocal": lambda ins, a: torch.reciprocal(ins[0]),
    "Neg": lambda ins, a: torch.neg(ins[0]),
    "Abs": lambda ins, a: torch.abs(ins[0]),
    "Sign": lambda ins, a: torch.sign(ins[0]),
    "Floor": lambda ins, a: torch.floor(ins[0]),
    "Ceil": lambda ins, a: torch.ceil(ins[0]),
    "Round": lambda ins, a: torch.round(ins[0]),
    "Sin": lambda ins, a: torch.sin(ins[0]),
    "Cos": lambda ins, a: torch.cos(ins[0]),
    "Pow": _pow,
    "Mod": _mod,
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": lambda ins, a: _variadic(torch.add)(ins, a) / len([t for t in ins if t is not None]),
    "Equal": lambda ins, a: torch.eq(ins[0], ins[1]),
    "Less": lambda ins, a: torch.lt(ins[0], ins[1]),
    "LessOrEqual": lambda ins, a: torch.le(ins[0], ins[1]),
    "Greater": lambda ins, a: torch.gt(ins[0], ins[1]),
    "GreaterOrEqual": lambda ins, a: torch.ge(ins[0], ins[1]),
    "Not": lambda ins, a: torch.logical_not(ins[0]),
    "And": lambda ins, a: torch.logical_and(ins[0], ins[1]),
    "Or": lambda ins, a: torch.logical_or(ins[0], ins[1]),
    "Xor": lambda ins, a: torch.logical_xor(ins[0], ins[1]),
    "Where": lambda ins, a: torch.where(ins[0].bool(), ins[1], ins[2]),
    "BatchNormalization": _batchnorm,
    "MaxPool": _maxpool,
    "AveragePool": _avgpool,
    "GlobalAveragePool": lambda ins, a: ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda ins, a: ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True),
    "ConvTranspose": _conv_transpose,
    "LayerNormalization": _layer_norm,
    "InstanceNormalization": lambda ins, a: F.instance_norm(ins[0], weight=ins[1], bias=ins[2],
                                                            eps=a.get("epsilon", 1e-5)),
    "GroupNormalization": _group_norm,
    "LRN": _lrn,
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
    "ReduceMean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)),
    "ReduceMax": _reduce(lambda x, d, k: x.amax(dim=d, keepdim=k)),
    "ReduceMin": _reduce(lambda x, d, k: x.amin(dim=d, keepdim=k)),
    "ReduceL1": _reduce(lambda x, d, k: x.abs().sum(dim=d, keepdim=k), torch.abs),
    "ReduceL2": _reduce(lambda x, d, k: torch.linalg.vector_norm(x, 2, dim=d, keepdim=k), torch.abs),
    "ReduceSumSquare": _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k), lambda x: x * x),
    "ReduceLogSumExp": _reduce(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k)),
    "ReduceProd": _reduce(lambda x, d, k: functools.reduce(lambda t, i: t.prod(dim=i, keepdim=k),
                                                           sorted(d, reverse=True), x)),
    "ArgMax": _arg_extreme(torch.argmax),
    "ArgMin": _arg_extreme(torch.argmin),
    "TopK": _topk,
    "Identity": lambda ins, a: ins[0],
    "Dropout": lambda ins, a: (ins[0], torch.ones_like(ins[0], dtype=torch.bool)),
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "Size": lambda ins, a: torch.tensor(ins[0].numel(), dtype=torch.int64),
    "ConstantOfShape": _constant_of_shape,
    "Expand": _expand,
    "Tile": lambda ins, a: ins[0].repeat(_ints(ins[1])),
    "Einsum": lambda ins, a: torch.einsum(_str(a, "equation", "").replace(" ", ""), *ins),
    "GatherElements": _gather_elements,
    "Pad": _pad,
    "Split": _split,
    "Resize": _resize,
    "Upsample": _resize,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    "CastLike": lambda ins, a: ins[0].to(ins[1].dtype),
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
}

# Ops whose extra outputs are computed (the others refuse a graph that reads theirs).
_MULTI_OUTPUT = {"Split", "TopK", "Dropout", "LayerNormalization"}


def _check_quant(attrs):
    if attrs.get("block_size", 0):
        raise _unsupported(f"{attrs['_op']} with block_size (blocked quantization) is not supported")


# Attribute checks made when the graph is built, so a refusal comes before any work.
_CHECKS: dict[str, Callable] = {"Resize": _check_resize, "Upsample": _check_resize,
                                "QuantizeLinear": _check_quant, "DequantizeLinear": _check_quant}


def _safe_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "_"
    if base[0].isdigit():
        base = "_" + base
    candidate, i = base, 1
    while candidate in taken:
        candidate, i = f"{base}_{i}", i + 1
    taken.add(candidate)
    return candidate


def _clamp_bounds(ins, attrs):
    return torch.clamp(ins[0], min=ins[1], max=ins[2])


def _clamp_pairs(graph: onnx.GraphProto, needed: set[int], producer: dict[str, onnx.NodeProto]
                 ) -> dict[int, tuple[str, str, str] | None]:
    """Per node id, what replaces it when it is part of Max(Min(t, hi), lo) with `hi`, `lo` from Constant
    nodes, lo ≤ hi everywhere and the Min's output read by that Max alone: the Min maps to None (dropped),
    the Max to the clamp's inputs (t, lo, hi). Equal values to the pair: max(min(t, hi), lo) is
    clamp(t, lo, hi) whenever lo ≤ hi. `producer`: per tensor name, the node that outputs it."""
    constant = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")}
    readers: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    out: dict[int, tuple[str, str, str] | None] = {}
    for mx in graph.node:
        if mx.op_type != "Max" or id(mx) not in needed or len(mx.input) != 2 or mx.domain not in ("", "ai.onnx"):
            continue
        mn = producer.get(mx.input[0])
        if mn is None or mn.op_type != "Min" or len(mn.input) != 2 or mn.domain not in ("", "ai.onnx"):
            continue
        hi_node, lo_node = constant.get(mn.input[1]), constant.get(mx.input[1])
        if hi_node is None or lo_node is None or readers.get(mn.output[0]) != 1 or mn.output[0] in outputs:
            continue
        attrs = {a.name: a for a in hi_node.attribute}, {a.name: a for a in lo_node.attribute}
        if "value" not in attrs[0] or "value" not in attrs[1]:
            continue
        hi = numpy_helper.to_array(attrs[0]["value"].t)
        lo = numpy_helper.to_array(attrs[1]["value"].t)
        if not np.all(np.asarray(lo, np.float64) <= np.asarray(hi, np.float64)):
            continue
        out[id(mn)] = None
        out[id(mx)] = (mn.input[0], mx.input[1], mn.input[1])
    return out


class TorchGraph(torch.nn.Module):
    """The ONNX graph as a torch module: `forward(x)` -> (output, captured tensors).

    `x`: the image input as float32 (any float dtype; cast to what the graph computes in), batch first.
    The output is float32. Errors: BadModel (exit 4) at construction for an op, attribute or tensor type
    the interpreter does not cover, naming it and `--criterion linf`, which avoids this path."""

    def __init__(self, model: onnx.ModelProto, input_name: str | None = None, output_name: str | None = None,
                 logits: bool = False):
        super().__init__()
        if model.functions:
            # Exporters (torch dynamo) may wrap blocks in model-local functions; inlining leaves the
            # initializers, which write_back updates, untouched.
            from onnx import inliner

            model = inliner.inline_local_functions(model)
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
        inputs = [i for i in graph.input if i.name not in init_names]
        if not inputs:
            raise BadModel("the model has no graph input")
        chosen = next((i for i in inputs if i.name == input_name), None) if input_name else inputs[0]
        if chosen is None:
            raise BadModel(f"the model has no input named {input_name!r}")
        self.input_name = chosen.name
        tensor_type = chosen.type.tensor_type
        if tensor_type.elem_type not in _FLOAT_TYPES:
            raise BadModel(f"input {chosen.name!r} is not a float tensor; the torch path differentiates through it")
        self.input_dtype = _ONNX_TO_TORCH_DTYPE[tensor_type.elem_type]
        dims = tensor_type.shape.dim if tensor_type.HasField("shape") else []
        # A batch fixed in the input (dim_value > 0) is what constant Reshapes in the graph assume.
        self.fixed_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 \
            else None
        self.output_name = output_name or graph.output[0].name
        if self.output_name not in {o.name for o in graph.output}:
            raise BadModel(f"the model has no output named {self.output_name!r}")
        producer = {o: n for n in graph.node for o in n.output}
        softmax = producer.get(self.output_name)
        if logits and softmax is not None and softmax.op_type == "Softmax":
            # losses and margins are taken in logit space: saturated probabilities have no gradient
            self.output_name = softmax.input[0]
        # only what the output needs: another output's branch (an ArgMax label) is never run
        needed, todo = set(), [self.output_name]
        while todo:
            node = producer.get(todo.pop())
            if node is not None and id(node) not in needed:
                needed.add(id(node))
                todo.extend(node.input)
        self._nodes = []
        clamps = _clamp_pairs(graph, needed, producer)
        for node in (n for n in graph.node if id(n) in needed):
            if id(node) in clamps:
                # Max(Min(t, b), -b) (rewrite.apply_bounds) as one clamp: the elementwise passes over every
                # bounded activation, forward and backward, were half the cost of a bounded ResNet step
                lo_hi = clamps[id(node)]
                if lo_hi is not None:
                    self._nodes.append((_clamp_bounds, list(lo_hi), list(node.output), {}))
                continue
            where = f"(node {node.name or node.output[0]!r})"
            if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS:
                raise _unsupported(f"unsupported ONNX operator {node.domain + '.' if node.domain else ''}"
                                   f"{node.op_type} {where}")
            if node.op_type not in _MULTI_OUTPUT and any(node.output[1:]):
                raise _unsupported(f"output 2+ of {node.op_type} {where} is not supported")
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and "value" in attrs:
                # converted once, and a buffer: it moves to the module's device with .to()
                key = _safe_name(node.output[0], taken)
                self.register_buffer(key, _tensor(attrs["value"]), persistent=False)
                self._constants[node.output[0]] = key
                continue
            # a few ops (Softmax, Resize, GroupNormalization) changed meaning across opsets
            attrs.update(_opset=self.opset, _op=node.op_type, _n_outputs=len(node.output))
            if node.op_type in _CHECKS:
                _CHECKS[node.op_type](attrs)
            self._nodes.append((_OPS[node.op_type], list(node.input), list(node.output), attrs))
        # per node, the tensors no later node reads: dropped from the run's values once it has run, so that a
        # forward holds what is still needed, not every activation of the graph (a no-grad forward of a
        # ResNet-50 on 218 images at 224x224 kept tens of GB; autograd keeps what a backward needs itself)
        last = {name: i for i, (_, ins, _, _) in enumerate(self._nodes) for name in ins}
        self._free_after = [[] for _ in self._nodes]
        for name, i in last.items():
            if name != self.output_name:
                self._free_after[i].append(name)

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
        """`x`: [N, ...] float. Returns the output [N, ...] as float32 and the `capture`d tensors by name.
        `masks`: per tensor name, a 1-D multiplier along axis 1 (channels), or (multiplier, axis).
        A fixed-batch model (batch b) takes any N: the batch is padded with copies of its final image to a
        multiple of b and run as N/b chunks of b (vmap), whose outputs and captured tensors, batch first,
        are joined along axis 0 and cut back to N."""
        b = self.fixed_batch
        if b is None or len(x) == b:
            return self._run(x, capture, masks or {})
        n = len(x)
        if n % b:
            x = torch.cat([x, x[-1:].expand((b - n % b,) + tuple(x.shape[1:]))])
        inner = [name for name in capture if name not in self.initializer_params]
        # vmap runs the chunks as one batched pass (~20x faster than a loop over batch-1 chunks)
        out, captured = torch.func.vmap(lambda chunk: self._run(chunk, inner, masks or {}))(
            x.reshape((-1, b) + tuple(x.shape[1:])))

        def unchunk(t):
            return t.flatten(0, 1)[:n]

        return unchunk(out), {name: unchunk(captured[name]) if name in captured else self.initializer_params[name]
                              for name in capture}

    def _run(self, x, capture: Sequence[str], masks: Mapping):
        def masked(name, t):
            m = masks.get(name)
            if m is None:
                return t
            if isinstance(m, tuple):  # (1-D mask, unit axis)
                m, axis = m
                return t * m.reshape((-1,) + (1,) * (t.dim() - 1 - axis % t.dim()))
            # a 1-D mask is per channel (axis 1); a site with another unit axis passes it shaped (Site.mask_shape)
            return t * (m.reshape((1, -1) + (1,) * (t.dim() - 2)) if m.dim() == 1 else m)

        if x.is_floating_point() and x.dtype != self.input_dtype:
            x = x.to(self.input_dtype)
        env: dict[str, torch.Tensor] = {self.input_name: masked(self.input_name, x)}
        kept = set(capture)
        for (fn, ins, outs, attrs), done in zip(self._nodes, self._free_after):
            result = fn([self._lookup(env, n) for n in ins], attrs)
            for name, value in zip(outs, result if isinstance(result, tuple) else (result,)):
                if name:
                    env[name] = masked(name, value)
            for name in done:
                if name not in kept:
                    env.pop(name, None)
        missing = [n for n in capture if n not in env and n not in self.initializer_params]
        if missing:
            raise BadModel(f"cannot capture unknown tensors {missing[:3]}")
        out = env[self.output_name]
        if out.is_floating_point() and out.dtype != torch.float32:
            out = out.float()
        return out, {n: self._lookup(env, n) for n in capture}

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


def to_torch(model: onnx.ModelProto, *, frozen: bool = False, input_name: str | None = None,
             output_name: str | None = None, logits: bool = False) -> TorchGraph:
    """`frozen`: the weights take no gradient — for searches that differentiate only with respect to the
    input or unit masks (detection, probes, attribution), not for the repair that tunes the weights.
    `input_name` / `output_name`: the image input and the class-score output (default: the first of each);
    only the nodes that output needs are interpreted. `logits`: when a Softmax makes the output, return its
    input instead (the defense's losses and margins are in logit space).
    Raises BadModel (exit 4) for what the interpreter does not cover (see TorchGraph)."""
    graph = TorchGraph(model, input_name, output_name, logits)
    if frozen:
        for p in graph.parameters():
            p.requires_grad_(False)
    return graph
