"""The one preprocessing applied to raw pixels before they reach a model, and the model input it targets.

Calibration, evaluation and comparison all go through Preprocess.apply so that statistics gathered
for pruning are measured on exactly the tensors the model sees in deployment."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from sanitizer.errors import BadModel, ExitCode, SanitizeError

LAYOUTS = ("nchw", "nhwc")
_CHANNEL_COUNTS = (1, 3, 4)
_FLOAT_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
}


def _usage(message: str) -> SanitizeError:
    return SanitizeError(message, ExitCode.USAGE)


@dataclass(frozen=True)
class Preprocess:
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    layout: str

    def apply(self, raw_nhwc: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw_nhwc)
        if raw.ndim != 4 or (len(self.mean) > 1 and raw.shape[3] != len(self.mean)):
            raise ValueError(f"expected NHWC pixels with {len(self.mean)} channels, got shape {raw.shape}")
        x = raw.astype(np.float32) * np.float32(self.scale)
        x -= np.asarray(self.mean, dtype=np.float32)
        x /= np.asarray(self.std, dtype=np.float32)
        if self.layout == "nchw":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x

    def to_dict(self) -> dict:
        return {"scale": self.scale, "mean": list(self.mean), "std": list(self.std), "layout": self.layout}


@dataclass(frozen=True)
class InputSpec:
    name: str
    layout: str
    channels: int
    height: int
    width: int
    batch: int | None
    dtype: str


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Static dims as ints, named dynamic dims as their name, unnamed as None; None if rank is unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _show(dims) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _static(d) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


# A fixed batch beyond this is not an image classifier's deployment shape; refusing it avoids a huge
# allocation for a one-image probe.
MAX_FIXED_BATCH = 4096


def input_spec(model: onnx.ModelProto, input_name: str | None = None, layout: str | None = None) -> InputSpec:
    if layout is not None and layout not in LAYOUTS:
        raise _usage(f"layout must be nchw or nhwc, got {layout!r}")
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise BadModel("model has no inputs")
    names = ", ".join(i.name for i in inputs)
    if input_name is not None:
        chosen = [i for i in inputs if i.name == input_name]
        if not chosen:
            raise _usage(f"model has no input named {input_name!r}; its inputs are: {names}")
        inp = chosen[0]
    elif len(inputs) == 1:
        inp = inputs[0]
    else:
        images = [i for i in inputs if (d := _dims(i)) is not None and len(d) == 4]
        if len(images) != 1:
            raise _usage(f"model has several inputs ({names}); name the image input to use")
        inp = images[0]

    if not inp.type.HasField("tensor_type"):
        raise BadModel(f"input {inp.name} is not a tensor")
    elem = inp.type.tensor_type.elem_type
    if elem not in _FLOAT_TYPES:
        type_name = onnx.TensorProto.DataType.Name(elem).lower() if elem in onnx.TensorProto.DataType.values() else str(elem)
        raise BadModel(f"input {inp.name} is {type_name}, not a float image tensor")
    dims = _dims(inp)
    if dims is None or len(dims) != 4:
        rank = "unknown" if dims is None else len(dims)
        raise BadModel(f"input {inp.name} has rank {rank}; expected a 4-D image tensor")

    first, last = _static(dims[1]) in _CHANNEL_COUNTS, _static(dims[3]) in _CHANNEL_COUNTS
    inferred = "nchw" if first and not last else "nhwc" if last and not first else None
    if inferred is not None and layout is not None and layout != inferred:
        raise _usage(f"input {inp.name} has shape {_show(dims)}, which is {inferred}; layout {layout} contradicts it")
    chosen_layout = inferred or layout or "nchw"
    c, h, w = (dims[1], dims[2], dims[3]) if chosen_layout == "nchw" else (dims[3], dims[1], dims[2])
    if _static(c) is None or _static(h) is None or _static(w) is None:
        raise BadModel(f"input {inp.name} has shape {_show(dims)} ({chosen_layout}); "
                       "channels, height and width must be static")
    if dims[0] == 0 or isinstance(dims[0], int) and dims[0] > MAX_FIXED_BATCH:
        raise BadModel(f"input {inp.name} has a fixed batch of {dims[0]}; expected a dynamic batch or 1..{MAX_FIXED_BATCH}")
    return InputSpec(name=inp.name, layout=chosen_layout, channels=c, height=h, width=w,
                     batch=_static(dims[0]), dtype=_FLOAT_TYPES[elem])


def resolve_preprocess(spec: InputSpec, *, scale: float = 1 / 255, mean: list[float] | None = None,
                       std: list[float] | None = None, layout: str | None = None) -> Preprocess:
    if layout is not None and layout != spec.layout:
        raise _usage(f"layout {layout} contradicts input {spec.name}, which is {spec.layout}")
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise _usage(f"scale must be a number, got {scale!r}") from None
    if not (math.isfinite(scale) and scale > 0):
        raise _usage(f"scale must be a finite number > 0, got {scale}")
    mean_t = _per_channel("mean", [0.0] if mean is None else mean, spec.channels)
    std_t = _per_channel("std", [1.0] if std is None else std, spec.channels)
    if any(s == 0 for s in std_t):
        raise _usage(f"std must not contain 0, got {list(std_t)}")
    return Preprocess(scale=scale, mean=mean_t, std=std_t, layout=spec.layout)


def _per_channel(what: str, values: list[float], channels: int) -> tuple[float, ...]:
    if len(values) not in (1, channels):
        raise _usage(f"{what} needs 1 or {channels} values (one per channel), got {len(values)}")
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise _usage(f"{what} must be finite numbers, got {list(out)}")
    return out


def parse_floats(text: str | None) -> list[float] | None:
    """Parse a flag like "0.5" or "0.485,0.456,0.406" (brackets and spaces tolerated)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.strip().strip("[]").split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise _usage(f"could not read {text!r} as a comma-separated list of numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise _usage(f"{text!r} contains a non-finite number")
    return values
