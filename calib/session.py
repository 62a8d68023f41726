"""onnxruntime sessions: CUDA when onnxruntime-gpu offers it, CPU otherwise, and say which one really ran."""
from __future__ import annotations

import tempfile
from pathlib import Path

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


# protobuf cannot serialize a message over 2 GiB; a module attribute so a test can take the file route cheaply
PROTO_LIMIT = 2**31 - 1


def make_session(model: onnx.ModelProto | bytes, *, providers: list[str] | None = None):
    """Return (session, provider that runs the first node). ORT falls back silently, so ask it afterwards."""
    ort = require("onnxruntime", "cpu")
    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # errors reach the user as one line, not as ORT's own log
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
