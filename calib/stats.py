"""Activation statistics per unit, the way onnxruntime's calibrator does it: reductions are added to the
graph as extra outputs, so only [batch, units] arrays cross into Python, and they are folded into per-unit
aggregates as they arrive: memory does not grow with the number of images."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper

from sanitizer.errors import BadData

from .session import make_session, run

# Per image and unit, reduced over every other axis but the batch (the spatial map, the tokens).
REDUCTIONS = ("linf", "l1", "l2", "mean")


class UnitAxis(NamedTuple):
    """Where the units of a tensor are: its rank and unit axis ([N, C, H, W] → (4, 1); [N, T, D] → (3, 2))."""
    rank: int
    axis: int

    @property
    def reduced(self) -> list[int]:
        """The axes a per-unit statistic reduces over: all but the batch and the unit axis."""
        return [a for a in range(1, self.rank) if a != self.axis]


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


def augment(model: onnx.ModelProto, tensors: dict[str, UnitAxis]) -> tuple[onnx.ModelProto, list[str]]:
    """Copy of `model` that also outputs, per tensor (name -> UnitAxis), [N, units] reductions over every axis
    but the batch and the unit axis (ℓ∞ of a token tensor's feature = its max |value| over the tokens)."""
    aug = onnx.ModelProto()
    aug.CopyFrom(model)
    opset = _opset(model)
    names = []
    for k, (tensor, where) in enumerate(tensors.items()):
        axes = UnitAxis(*where).reduced
        # statistics in float32 whatever the model's precision (a float16 sum of squares overflows at 65504);
        # onnxruntime drops the Cast where the tensor already is float32
        aug.graph.node.append(helper.make_node("Cast", [tensor], [f"_stat{k}_f32"], to=onnx.TensorProto.FLOAT))
        tensor = f"_stat{k}_f32"
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
    """Aggregates over images of one tensor's per-image [C] reductions, accumulated batch by batch: the
    criteria need only these, and keeping every image's [C] rows would grow with the calibration set."""
    count: int
    sums: dict[str, np.ndarray]                  # float64 sum over images, per reduction
    linf_max: np.ndarray
    linf_sq: np.ndarray                          # float64 sum of squared ℓ∞: its spread over images
    per_image: dict[str, np.ndarray] | None = None   # [N, C] rows, only when collect() was asked to keep them

    @classmethod
    def empty(cls, channels: int) -> "TensorStats":
        return cls(0, {r: np.zeros(channels, np.float64) for r in REDUCTIONS}, np.full(channels, -np.inf),
                   np.zeros(channels, np.float64))

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Fold in one batch of [n, C] reductions."""
        for r in REDUCTIONS:
            self.sums[r] += batch[r].astype(np.float64).sum(axis=0)
        self.linf_max = np.maximum(self.linf_max, batch["linf"].max(axis=0, initial=-np.inf).astype(np.float64))
        self.linf_sq += np.square(batch["linf"].astype(np.float64)).sum(axis=0)
        self.count += len(batch["linf"])

    def agg(self, name: str) -> np.ndarray:
        """`linf`, `linf_max`, `linf_std`, `l1`, `l2`, `mean`: aggregated over images."""
        if name == "linf_max":
            return self.linf_max
        if name == "linf_std":
            mean = self.sums["linf"] / self.count
            return np.sqrt(np.maximum(self.linf_sq / self.count - mean * mean, 0.0))
        return self.sums[name] / self.count


@dataclass
class Collected:
    stats: dict[str, TensorStats]
    logits: np.ndarray | None        # only when collect() kept per-image results
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


def collect(model: onnx.ModelProto, tensors: dict[str, UnitAxis], batches, input_name: str, *, progress=None,
            fixed_batch: int | None = None, keep_per_image: bool = False, output: str | None = None) -> Collected:
    """One streaming pass over batches of float32 model inputs: per-unit aggregates of `tensors` (name ->
    UnitAxis, see graph.stat_tensors). Memory is one batch plus [C] accumulators whatever the number of
    images; `keep_per_image` also keeps every image's [C] reductions and the classifier output `output`
    (InputSpec.output; the first graph output when None) — tests and analysis on small sets."""
    aug, names = augment(model, tensors)
    sess, provider = make_session(aug)
    logit_name = output or sess.get_outputs()[0].name
    out_names = [logit_name] + list(dict.fromkeys(names))
    per_tensor = {t: names[k * len(REDUCTIONS):(k + 1) * len(REDUCTIONS)] for k, t in enumerate(tensors)}
    stats: dict[str, TensorStats] = {}
    kept: dict[str, list[np.ndarray]] = {n: [] for n in out_names}
    images = 0
    start = time.perf_counter()
    for x, real in fixed(batches, fixed_batch):
        images += real
        values = dict(zip(out_names, (v[:real] for v in run(sess, out_names, {input_name: x}))))
        for tensor, red in per_tensor.items():
            batch = {r: values[n] for r, n in zip(REDUCTIONS, red)}
            if tensor not in stats:
                stats[tensor] = TensorStats.empty(batch["linf"].shape[1])
            stats[tensor].add(batch)
        if keep_per_image:
            for n in out_names:
                kept[n].append(values[n])
        if progress:
            progress(real)
    seconds = time.perf_counter() - start
    if not images:
        raise BadData("no calibration images reached the statistics pass")
    logits = None
    if keep_per_image:
        cat = {n: np.concatenate(v) for n, v in kept.items()}
        logits = cat[logit_name]
        for tensor, red in per_tensor.items():
            stats[tensor].per_image = {r: cat[n].astype(np.float64) for r, n in zip(REDUCTIONS, red)}
    return Collected(stats, logits, provider, seconds)


def plain_pass(model: onnx.ModelProto, batches, input_name: str, fixed_batch: int | None = None,
               output: str | None = None) -> tuple[np.ndarray, float]:
    """The same images through the unmodified model: the classifier output `output` (the first graph output
    when None) and seconds, the yardstick for the stats pass."""
    sess, _ = make_session(model)
    out = output or sess.get_outputs()[0].name
    start = time.perf_counter()
    logits = [run(sess, [out], {input_name: x})[0][:real] for x, real in fixed(batches, fixed_batch)]
    return np.concatenate(logits), time.perf_counter() - start
