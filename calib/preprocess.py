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
    onnx.TensorProto.BFLOAT16: "bfloat16",   # fed by calib.session.run as an OrtValue
}
OUTPUT_KINDS = ("logits", "probabilities")


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
    """The model's interface as every path uses it: the image input fed (name, layout, static channels and
    size — from the model or --input-size —, fixed batch or None, its dtype: float32, float16, float64 or
    bfloat16; calib.session.run casts float32 inputs to it) and the classifier output read (`output`: the one
    float [N, classes] output, or the one --output-name names; `output_kind`: logits or probabilities)."""
    name: str
    layout: str
    channels: int
    height: int | None   # None only from input_spec(..., size_free=True) on a dynamic height / width
    width: int | None
    batch: int | None
    dtype: str
    output: str
    output_kind: str = "logits"   # input_spec sees a Softmax producer; sanity.check_original sees the values


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


def input_spec(model: onnx.ModelProto, input_name: str | None = None, layout: str | None = None, *,
               output_name: str | None = None, size: tuple[int, int] | None = None,
               size_free: bool = False) -> InputSpec:
    """The image input and the classifier output of `model`.

    `size` (H, W) fixes a dynamic height and width (--input-size); a static one it contradicts is refused.
    Without it a dynamic one is refused, unless `size_free` (for what feeds no image: `sanitize layers`),
    which leaves it None.
    Raises SanitizeError: USAGE for a choice the user must make or a flag that contradicts the model (several
    classifier outputs, unknown names, layout, size); BAD_MODEL for what no flag fixes (inputs besides the image:
    onnxruntime needs them all, and only images can be fed)."""
    if layout is not None and layout not in LAYOUTS:
        raise _usage(f"layout must be nchw or nhwc, got {layout!r}")
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise BadModel("model has no inputs")
    names = ", ".join(i.name for i in inputs)
    if len(inputs) > 1:
        # onnxruntime needs every input that has no initializer; only an image can be fed from --calib
        raise BadModel(f"model has {len(inputs)} inputs ({names}); the sanitizer feeds one image input and nothing "
                       "else: export the model with the other inputs as constants")
    if input_name is not None:
        chosen = [i for i in inputs if i.name == input_name]
        if not chosen:
            raise _usage(f"model has no input named {input_name!r}; its inputs are: {names}")
        inp = chosen[0]
    else:
        inp = inputs[0]

    if not inp.type.HasField("tensor_type"):
        raise BadModel(f"input {inp.name} is not a tensor")
    elem = inp.type.tensor_type.elem_type
    if elem not in _FLOAT_TYPES:
        raise BadModel(f"input {inp.name} is {_type_name(elem)}, not a float image tensor")
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
    if _static(c) is None:
        # the layout is read off where the channels are: with neither end static it was not read but assumed
        how = f"as {chosen_layout}" + (", assumed: neither dim 1 nor dim 3 is a channel count" if inferred is None
                                       and layout is None else "")
        raise BadModel(f"input {inp.name} has shape {_show(dims)} ({how}); the channel count must be static — "
                       "export the model with a fixed channel dimension")
    if size is not None:
        for what, given, declared in (("height", size[0], h), ("width", size[1], w)):
            if _static(declared) is not None and declared != given:
                raise _usage(f"--input-size {size[0]}x{size[1]}: input {inp.name} has a fixed {what} of {declared}")
        h, w = size
    elif (_static(h) is None or _static(w) is None) and size_free:
        h, w = _static(h), _static(w)
    elif _static(h) is None or _static(w) is None:
        raise _usage(f"input {inp.name} has shape {_show(dims)} ({chosen_layout}): its height and width are "
                     "dynamic; give the size to feed with --input-size HxW")
    if dims[0] == 0 or isinstance(dims[0], int) and dims[0] > MAX_FIXED_BATCH:
        raise BadModel(f"input {inp.name} has a fixed batch of {dims[0]}; expected a dynamic batch or 1..{MAX_FIXED_BATCH}")
    output, kind = classifier_output(model, output_name)
    return InputSpec(name=inp.name, layout=chosen_layout, channels=c, height=h, width=w,
                     batch=_static(dims[0]), dtype=_FLOAT_TYPES[elem], output=output, output_kind=kind)


def _per_image_dims(value_info: onnx.ValueInfoProto) -> str:
    dims = _dims(value_info)
    return "?" if dims is None else _show(dims)


def classifier_output(model: onnx.ModelProto, output_name: str | None = None) -> tuple[str, str]:
    """(name, kind) of the output holding one score per class: the one graph output that is float and, as
    far as its declared shape tells, [N, classes] (trailing 1-sized axes allowed, as in [N, K, 1, 1]), or
    the one `output_name` names. An integer output (an ArgMax label) is never it. kind is "probabilities"
    when a Softmax writes it, else "logits" until the values say otherwise (sanity.check_original).

    Raises SanitizeError USAGE when `output_name` is unknown or not float, or several outputs qualify;
    BadModel when none does."""
    outputs = list(model.graph.output)
    listing = ", ".join(f"{o.name} ({_type_name(o.type.tensor_type.elem_type)} {_per_image_dims(o)})"
                        for o in outputs)
    floats = [o for o in outputs if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in _FLOAT_TYPES]
    if output_name is not None:
        chosen = [o for o in outputs if o.name == output_name]
        if not chosen:
            raise _usage(f"model has no output named {output_name!r}; its outputs are: {listing}")
        if chosen[0] not in floats:
            raise _usage(f"output {output_name} is not a float tensor of class scores; the outputs are: {listing}")
        out = chosen[0]
    else:
        scores = [o for o in floats if (d := _dims(o)) is None or len(d) >= 2 and all(
            _static(x) in (None, 1) for x in d[2:])]
        if not scores:
            raise BadModel(f"model has no float [N, classes] output; its outputs are: {listing}")
        if len(scores) > 1:
            raise _usage(f"model has several float outputs that could be class scores: {listing}; name the one "
                         "to read with --output-name")
        out = scores[0]
    producer = next((n for n in model.graph.node if out.name in n.output), None)
    return out.name, "probabilities" if producer is not None and producer.op_type == "Softmax" else "logits"


def _type_name(elem: int) -> str:
    values = onnx.TensorProto.DataType.values()
    return onnx.TensorProto.DataType.Name(elem).lower() if elem in values else str(elem)


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
    if any(s <= 0 for s in std_t):
        raise _usage(f"std must be > 0 (a standard deviation), got {list(std_t)}")
    return Preprocess(scale=scale, mean=mean_t, std=std_t, layout=spec.layout)


def _per_channel(what: str, values: list[float], channels: int) -> tuple[float, ...]:
    if len(values) not in (1, channels):
        wanted = "1 value (the input has 1 channel)" if channels == 1 else f"1 or {channels} values (one per channel)"
        raise _usage(f"{what} needs {wanted}, got {len(values)}")
    out = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in out):
        raise _usage(f"{what} must be finite numbers, got {list(out)}")
    return out


def parse_size(text: str | None) -> tuple[int, int] | None:
    """Parse --input-size "HxW" (or "H,W") into (H, W)."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise _usage(f"--input-size must be HxW (e.g. 224x224), got {text!r}") from None
    if not (0 < h <= 16384 and 0 < w <= 16384):
        raise _usage(f"--input-size must be between 1x1 and 16384x16384, got {text!r}")
    return h, w


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
