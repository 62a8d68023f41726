"""Activation statistics per unit, the way onnxruntime's calibrator does it: reductions are added to the
graph as extra outputs, so only [N, units] arrays cross into Python and memory does not grow with N."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .session import make_session, run

# Per image and channel, reduced over the spatial map.
REDUCTIONS = ("linf", "l1", "l2", "mean")


def probe_shapes(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]]:
    """Shapes of every float tensor, and the values of small integer (shape-computing) tensors, on one real
    batch of one image: exact where symbolic inference gives up (tf2onnx, dynamo's as_strided)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for o in node.output:
            if o and o not in known:
                probe.graph.output.append(onnx.ValueInfoProto(name=o))
                known.add(o)
    sess, _ = make_session(probe)
    values = dict(zip((o.name for o in sess.get_outputs()), run(sess, None, feed)))
    shapes = {n: tuple(v.shape) for n, v in values.items() if isinstance(v, np.ndarray) and v.dtype.kind == "f"}
    ints = {n: v for n, v in values.items() if isinstance(v, np.ndarray) and v.dtype.kind in "iu" and v.size <= 4096}
    return shapes, ints


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def augment(model: onnx.ModelProto, tensors: dict[str, int]) -> tuple[onnx.ModelProto, list[str]]:
    """Copy of `model` that also outputs, per tensor (name -> rank), [N, C] reductions over its spatial axes."""
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    opset = _opset(model)
    names = []
    for k, (tensor, rank) in enumerate(tensors.items()):
        axes = list(range(2, rank))
        if not axes:  # dense units: the value itself is every norm of a 1-element map
            abs_name = f"_stat{k}_abs"
            aug.graph.node.append(helper.make_node("Abs", [tensor], [abs_name]))
            outs = {"linf": abs_name, "l1": abs_name, "l2": abs_name, "mean": tensor}
            names.extend(outs[r] for r in REDUCTIONS)
            continue
        for red, op in (("linf", "ReduceMax"), ("l1", "ReduceL1"), ("l2", "ReduceL2"), ("mean", "ReduceMean")):
            src = tensor
            if red == "linf":
                src = f"_stat{k}_abs"
                aug.graph.node.append(helper.make_node("Abs", [tensor], [src]))
            out = f"_stat{k}_{red}"
            if opset >= 18:
                axes_name = f"_stat{k}_{red}_axes"
                aug.graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), axes_name))
                aug.graph.node.append(helper.make_node(op, [src, axes_name], [out], keepdims=0))
            else:
                aug.graph.node.append(helper.make_node(op, [src], [out], axes=axes, keepdims=0))
            names.append(out)
    for n in dict.fromkeys(names):
        aug.graph.output.append(onnx.ValueInfoProto(name=n))
    return aug, names


@dataclass
class TensorStats:
    """Per-image [N, C] reductions of one tensor (kept: N×C floats is small), and their aggregates."""
    per_image: dict[str, np.ndarray]

    def agg(self, name: str) -> np.ndarray:
        """`linf`, `linf_max`, `l1`, `l2`, `mean`: aggregated over images."""
        if name == "linf_max":
            return self.per_image["linf"].max(axis=0)
        return self.per_image[name].mean(axis=0)


@dataclass
class Collected:
    stats: dict[str, TensorStats]
    logits: np.ndarray
    provider: str
    seconds: float
    extra: dict = field(default_factory=dict)


def fixed(batches, size: int | None):
    """Re-chunk to a fixed-batch model's batch size, padding the last chunk by repeating its final image.
    Yields (inputs, real image count)."""
    if not size:
        yield from ((x, len(x)) for x in batches)
        return
    pending = None
    for x in batches:
        pending = x if pending is None else np.concatenate([pending, x])
        while len(pending) >= size:
            yield pending[:size], size
            pending = pending[size:]
    if pending is not None and len(pending):
        pad = np.repeat(pending[-1:], size - len(pending), axis=0)
        yield np.concatenate([pending, pad]), len(pending)


def collect(model: onnx.ModelProto, tensors: dict[str, int], batches, input_name: str, *, progress=None,
            fixed_batch: int | None = None) -> Collected:
    """One streaming pass: logits and per-image reductions of `tensors` for every batch of model inputs."""
    aug, names = augment(model, tensors)
    sess, provider = make_session(aug)
    out_names = [sess.get_outputs()[0].name] + list(dict.fromkeys(names))
    parts: dict[str, list[np.ndarray]] = {n: [] for n in out_names}
    start = time.perf_counter()
    for x, real in fixed(batches, fixed_batch):
        values = run(sess, out_names, {input_name: x})
        for n, v in zip(out_names, values):
            parts[n].append(v[:real])
        if progress:
            progress(real)
    seconds = time.perf_counter() - start
    cat = {n: np.concatenate(v) for n, v in parts.items()}
    stats = {}
    for k, tensor in enumerate(tensors):
        red = names[k * len(REDUCTIONS):(k + 1) * len(REDUCTIONS)]
        stats[tensor] = TensorStats({r: cat[n].astype(np.float64) for r, n in zip(REDUCTIONS, red)})
    return Collected(stats, cat[out_names[0]], provider, seconds)


def plain_pass(model: onnx.ModelProto, batches, input_name: str, fixed_batch: int | None = None
               ) -> tuple[np.ndarray, float]:
    """The same images through the unmodified model: logits and seconds, the yardstick for the stats pass."""
    sess, _ = make_session(model)
    out = sess.get_outputs()[0].name
    start = time.perf_counter()
    logits = [run(sess, [out], {input_name: x})[0][:real] for x, real in fixed(batches, fixed_batch)]
    return np.concatenate(logits), time.perf_counter() - start
