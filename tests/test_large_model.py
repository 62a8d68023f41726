"""Models over protobuf's 2 GiB limit: checked (with strict shape inference) from a file, never serialized.

Writing 2 GiB in a test is not an option, so model_io.PROTO_LIMIT is lowered to 0: every model takes the
large-model route, and its results must be those of the in-memory route."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import models as M
from calib import session
from sanitizer import model_io
from sanitizer.cli import main
from sanitizer.errors import BadModel


@pytest.fixture
def checker_calls(monkeypatch):
    """What each onnx.checker.check_model call was given: 'path' or 'proto'."""
    calls: list[str] = []
    real = onnx.checker.check_model

    def spy(model, *args, **kwargs):
        calls.append("proto" if isinstance(model, (onnx.ModelProto, bytes)) else "path")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.checker, "check_model", spy)
    return calls


def _inputs(tmp: Path) -> tuple[Path, Path]:
    (tmp / "in").mkdir()
    model = M.save(M.plain(), tmp / "in" / "model.onnx", external=True)
    calib = tmp / "in" / "calib.npz"
    np.savez(calib, X=M.images(60))
    return model, calib


def _without_timings(value):
    # wall-clock fields (total, detection) differ between any two runs; everything else must not
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if "seconds" not in k}
    return value


def _sanitize(model: Path, calib: Path, out_dir: Path) -> tuple[bytes, bytes, dict]:
    out_dir.mkdir()
    out, report = out_dir / "clean.onnx", out_dir / "r.json"
    code = main([str(model), "--calib", str(calib), "--out", str(out), "--report", str(report),
                 "--max-acc-drop", "0.3", "--no-sanity-check",   # a random model: nothing for the gate to pass
                 "--criterion", "linf"])   # nor for the default's probes: pruning silences none of them
    assert code == 0
    result = _without_timings(json.loads(report.read_text()))
    del result["output"]["files"], result["output"]["onnx"]   # paths differ between the runs, hashes must not
    (data,) = out_dir.glob("clean.onnx.*.data")
    return out.read_bytes(), data.read_bytes(), result


def test_the_large_model_route_gives_the_in_memory_result(tmp_path, monkeypatch, checker_calls, capfd):
    model, calib = _inputs(tmp_path)
    checker_calls.clear()
    small = _sanitize(model, calib, tmp_path / "small")
    assert checker_calls == ["proto", "proto"]

    checker_calls.clear()
    monkeypatch.setattr(model_io, "PROTO_LIMIT", 0)
    monkeypatch.setattr(session, "PROTO_LIMIT", 0)
    staged = []
    real = session._session_from_file
    monkeypatch.setattr(session, "_session_from_file", lambda *a: staged.append(1) or real(*a))
    large = _sanitize(model, calib, tmp_path / "large")
    # the input model (from its own file) and the sanitized one (staged to a temp file) both went by path
    assert checker_calls == ["path", "path"]
    assert staged, "no onnxruntime session was created from a file"
    assert large == small
    assert small[2]["plan"]["count"] > 0, "nothing pruned: the comparison would be trivial"


def _wrong_gemm_weight() -> onnx.ModelProto:
    """Valid structure and tensor data that fills its dims, but a Gemm weight one column wider than its
    input: only (strict) shape inference can tell."""
    model = M.plain()
    weight = next(t for t in model.graph.initializer if t.name == "fc.weight")
    w = numpy_helper.to_array(weight)
    weight.CopyFrom(numpy_helper.from_array(np.zeros((w.shape[0], w.shape[1] + 1), w.dtype), weight.name))
    onnx.checker.check_model(model)   # structurally fine
    return model


def test_the_large_model_route_refuses_what_the_in_memory_route_refuses(tmp_path, monkeypatch, checker_calls):
    path = M.save(_wrong_gemm_weight(), tmp_path / "model.onnx", external=True)
    checker_calls.clear()
    with pytest.raises(BadModel) as small:
        model_io.load_model(path)
    monkeypatch.setattr(model_io, "PROTO_LIMIT", 0)
    with pytest.raises(BadModel) as large:
        model_io.load_model(path)
    assert checker_calls == ["proto", "path"]
    assert str(large.value) == str(small.value)
    assert "ShapeInferenceError" in str(small.value)


def test_an_in_memory_model_over_the_limit_is_checked_from_a_temp_file(monkeypatch, checker_calls):
    good, bad = M.plain(), _wrong_gemm_weight()
    checker_calls.clear()
    monkeypatch.setattr(model_io, "PROTO_LIMIT", 0)
    model_io.check(good)
    with pytest.raises(BadModel) as info:
        model_io.check(bad)
    assert checker_calls == ["path", "path"]
    assert str(info.value).startswith("model is not a valid ONNX model") and "ShapeInferenceError" in str(info.value)
