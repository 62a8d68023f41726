"""onnxruntime sessions: CUDA when onnxruntime-gpu offers it, CPU otherwise, and say which one really ran."""
from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path

import numpy as np
import onnx

from sanitizer.errors import BadModel, require


def available_providers() -> list[str]:
    ort = require("onnxruntime", "cpu")
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return wanted or ["CPUExecutionProvider"]


# Float inputs are fed in the type the model declares; everything upstream works in float32.
_NUMPY_FLOAT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_BFLOAT16 = "tensor(bfloat16)"


def run(sess, outputs, feed: dict):
    """session.run with each float feed cast to the input type the model declares (float32, float16, float64,
    bfloat16) and 16-bit float outputs returned as float32, so callers feed and read float32 whatever the
    model's precision; onnxruntime's failures (a model that loads but cannot execute) become one-line BadModel.

    bfloat16 has no numpy dtype onnxruntime understands: such feeds go in as OrtValues of their bits
    (ml_dtypes, a dependency of onnx, does the rounding) and such outputs are read back from their buffer."""
    declared = {i.name: i.type for i in sess.get_inputs()}
    feed = {name: _cast(x, declared.get(name)) for name, x in feed.items()}
    try:
        if any(declared.get(n) == _BFLOAT16 for n in feed) or _reads_bfloat16(sess, outputs):
            return [_as_float32(v) for v in sess.run_with_ort_values(outputs or [o.name for o in sess.get_outputs()],
                                                                     _ort_values(feed, declared))]
        return [_as_float32(v) for v in sess.run(outputs, feed)]
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadModel(f"onnxruntime cannot run the model: {first[:300]}") from None


def _cast(x, declared: str | None):
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        return x
    if declared == _BFLOAT16:
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16)
    wanted = _NUMPY_FLOAT.get(declared)
    return x if wanted is None else x.astype(wanted, copy=False)


def _reads_bfloat16(sess, outputs) -> bool:
    return any(o.type == _BFLOAT16 for o in sess.get_outputs() if outputs is None or o.name in outputs)


def _ort_values(feed: dict, declared: dict) -> dict:
    ort = require("onnxruntime", "cpu")
    return {name: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(x).view(np.uint16),
                                                                   onnx.TensorProto.BFLOAT16)
            if declared.get(name) == _BFLOAT16 else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x))
            for name, x in feed.items()}


def _as_float32(value):
    """A result as numpy, 16-bit floats widened to float32 (float64 stays: nothing is lost by keeping it)."""
    if not isinstance(value, np.ndarray) and hasattr(value, "data_type"):   # an OrtValue
        if value.data_type() != _BFLOAT16:
            value = value.numpy()
        else:
            import ml_dtypes

            if value.device_name().lower() != "cpu":
                raise BadModel("a bfloat16 output left on the GPU cannot be read")
            raw = (ctypes.c_uint8 * value.tensor_size_in_bytes()).from_address(value.data_ptr())
            bits = np.frombuffer(raw, np.uint16).copy()
            return bits.view(ml_dtypes.bfloat16).reshape(value.shape()).astype(np.float32)
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    return value


# onnxruntime's own log: fatal only, since its errors reach the user as one line; the CLI's --debug lowers it
# to warnings (initializers that are also graph inputs, unused initializers...).
LOG_SEVERITY = 4

# protobuf cannot serialize a message over 2 GiB; a module attribute so a test can take the file route cheaply
PROTO_LIMIT = 2**31 - 1


def make_session(model: onnx.ModelProto | bytes, *, providers: list[str] | None = None):
    """Return (session, provider that runs the first node). ORT falls back silently, so ask it afterwards."""
    ort = require("onnxruntime", "cpu")
    opts = ort.SessionOptions()
    opts.log_severity_level = LOG_SEVERITY
    providers = providers or available_providers()
    try:
        if isinstance(model, onnx.ModelProto) and model.ByteSize() > PROTO_LIMIT:
            sess = _session_from_file(ort, model, opts, providers)
        else:
            data = model if isinstance(model, bytes) else model.SerializeToString()
            sess = ort.InferenceSession(data, sess_options=opts, providers=providers)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadModel(f"onnxruntime cannot run the model: {first}") from None
    return sess, sess.get_providers()[0]


def _session_from_file(ort, model: onnx.ModelProto, opts, providers):
    """A model too large to serialize goes to a private temp folder with its weights as external data;
    onnxruntime reads both when the session is created, so the folder can go right after."""
    staged = onnx.ModelProto()
    staged.CopyFrom(model)  # saving as external data rewrites the tensors in place
    with tempfile.TemporaryDirectory(prefix="sanitize-session-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save_model(staged, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
