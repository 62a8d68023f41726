"""onnxruntime sessions: CUDA when onnxruntime-gpu offers it, CPU otherwise, and say which one really ran."""
from __future__ import annotations

import onnx

from sanitizer.errors import BadModel, require


def available_providers() -> list[str]:
    ort = require("onnxruntime", "cpu")
    wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    return wanted or ["CPUExecutionProvider"]


def run(sess, outputs, feed: dict):
    """session.run with onnxruntime's failures (a model that loads but cannot execute) as one-line BadModel."""
    try:
        return sess.run(outputs, feed)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadModel(f"onnxruntime cannot run the model: {first[:300]}") from None


def make_session(model: onnx.ModelProto | bytes, *, providers: list[str] | None = None):
    """Return (session, provider that runs the first node). ORT falls back silently, so ask it afterwards."""
    ort = require("onnxruntime", "cpu")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors reach the user as one line, not as ORT's own log
    try:
        sess = ort.InferenceSession(data, sess_options=opts, providers=providers or available_providers())
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadModel(f"onnxruntime cannot run the model: {first}") from None
    return sess, sess.get_providers()[0]
