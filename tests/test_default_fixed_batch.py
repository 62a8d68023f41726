"""The default defense (every torch step: detection, probes, attribution, repair) on a model exported with
a fixed batch of 1 and a constant Reshape to [1, features], the form a batch-1 export takes."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from digits_backdoor import TARGET, _inputs, _stamp, trained  # noqa: E402
from sanitizer.cli import main  # noqa: E402


def _batch_one(model: onnx.ModelProto) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    g = fixed.graph
    for value in (g.input[0], g.output[0]):
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    (flat,) = [n for n in g.node if n.op_type == "Flatten"]
    g.initializer.append(numpy_helper.from_array(np.array([1, 32 * 16], np.int64), "batch_one_shape"))
    flat.CopyFrom(helper.make_node("Reshape", [flat.input[0], "batch_one_shape"], list(flat.output), name=flat.name))
    onnx.checker.check_model(fixed, full_check=True)
    return fixed


def _acc_asr(model, x_test, y_test):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    def predict(x):
        return np.array([sess.run(None, {"input": x[i:i + 1]})[0].argmax() for i in range(len(x))])

    keep = y_test != TARGET
    return float((predict(_inputs(x_test)) == y_test).mean()), \
        float((predict(_inputs(_stamp(x_test[keep]))) == TARGET).mean())


def test_default_removes_the_backdoor_from_a_batch_one_model(tmp_path):
    model, calib, x_test, y_test = trained(poisoned=True)
    fixed = _batch_one(model)
    acc0, asr0 = _acc_asr(fixed, x_test, y_test)
    assert asr0 > 0.9
    onnx.save(fixed, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", X=calib.astype(np.uint8))
    code = main([str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--out", str(tmp_path / "o.onnx"),
                 "--report", str(tmp_path / "r.json"), "--max-acc-drop", "0.06"])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["probes"]["target"] == TARGET and report["plan"]["count"] > 0
    out = onnx.load(tmp_path / "o.onnx")
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    acc1, asr1 = _acc_asr(out, x_test, y_test)
    assert asr1 <= 0.1 and acc1 >= acc0 - 0.05, (acc0, asr0, acc1, asr1)
