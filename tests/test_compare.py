"""compare_models and `sanitize compare` on tiny real ONNX classifiers with real onnxruntime."""
from __future__ import annotations

import json
import shlex

import numpy as np
import onnx
import pytest
import typer
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from sanitizer import cli_deploy
from sanitizer.compare import compare_models, polygraphy_command, run_outputs
from sanitizer.errors import ExitCode, SanitizeError

CLASSES = 4


def classifier(weights: np.ndarray, batch="N") -> onnx.ModelProto:
    """Flatten -> Gemm over 3x6x6 NCHW images."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3 * 6 * 6, CLASSES))
    changed = w.copy()
    changed[:, 0] += 0.5  # bias every image towards class 0: many predictions change
    paths = {}
    for name, weights in (("a", w), ("same", w), ("changed", changed)):
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(classifier(weights), paths[name])
    paths["fixed"] = tmp_path / "fixed.onnx"
    onnx.save(classifier(w, batch=4), paths["fixed"])
    images = rng.integers(0, 256, size=(50, 6, 6, 3), dtype=np.uint8)
    paths["clean"] = tmp_path / "clean.npz"
    np.savez(paths["clean"], X=images, y=rng.integers(0, CLASSES, size=50))
    triggered = images.copy()
    triggered[:, :2, :2, :] = 255
    paths["triggered"] = tmp_path / "triggered.npz"
    np.savez(paths["triggered"], X=triggered)
    return paths


def test_identical_models_agree_fully(setup):
    report = compare_models([setup["a"], setup["same"]], setup["clean"])
    (pair,) = report["clean"]["pairs"]
    assert pair["output"] == "logits" and pair["images"] == 50
    assert pair["agreement"] == 1.0
    assert pair["max_abs_diff"] == 0.0 and pair["mean_abs_diff"] == 0.0
    assert report["passed"] and report["triggered"] is None
    json.dumps(report)


def test_changed_model_disagrees(setup):
    report = compare_models([setup["a"], setup["changed"]], setup["clean"], triggered=setup["triggered"])
    (pair,) = report["clean"]["pairs"]
    assert pair["agreement"] < 1.0
    assert pair["max_abs_diff"] > 0 and 0 < pair["mean_abs_diff"] <= pair["max_abs_diff"]
    assert not report["passed"]
    (trig,) = report["triggered"]["pairs"]
    assert report["triggered"]["images"] == 50 and trig["agreement"] <= 1.0


def test_agreement_matches_a_direct_computation(setup):
    import onnxruntime as ort

    report = compare_models([setup["a"], setup["changed"]], setup["clean"], batch_size=7)
    x = np.load(setup["clean"])["X"].astype(np.float32).transpose(0, 3, 1, 2) / 255
    run = lambda p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    a, b = run(setup["a"]), run(setup["changed"])
    pair = report["clean"]["pairs"][0]
    assert pair["agreement"] == pytest.approx((a.argmax(1) == b.argmax(1)).mean())
    assert pair["max_abs_diff"] == pytest.approx(np.abs(a - b).max(), rel=1e-5)
    assert pair["mean_abs_diff"] == pytest.approx(np.abs(a - b).mean(), rel=1e-5)


def test_three_models_give_three_pairs_and_the_worst_decides(setup):
    report = compare_models([setup["a"], setup["same"], setup["changed"]], setup["clean"], min_agreement=0.0)
    pairs = {(p["a"], p["b"]): p["agreement"] for p in report["clean"]["pairs"]}
    assert len(pairs) == 3
    assert pairs[(str(setup["a"]), str(setup["same"]))] == 1.0
    assert report["clean"]["min_agreement"] == min(pairs.values()) < 1.0
    assert report["passed"]  # min_agreement 0 accepts anything


def test_fixed_batch_model_pads_the_last_batch(setup):
    # 50 images in batches of 4 leave 2 over; padding must not count as images.
    report = compare_models([setup["fixed"], setup["a"]], setup["clean"])
    (pair,) = report["clean"]["pairs"]
    assert pair["images"] == 50 and pair["agreement"] == 1.0 and pair["max_abs_diff"] == 0.0


def test_chunking_covers_every_image(setup, monkeypatch):
    import sanitizer.compare as compare

    monkeypatch.setattr(compare, "CHUNK_BATCHES", 2)
    report = compare_models([setup["a"], setup["changed"]], setup["clean"], batch_size=3)
    whole = compare_models([setup["a"], setup["changed"]], setup["clean"], batch_size=64)
    assert report["clean"]["pairs"][0]["images"] == 50
    assert report["clean"]["pairs"][0]["agreement"] == whole["clean"]["pairs"][0]["agreement"]


def test_run_outputs(setup):
    x = np.random.default_rng(3).random((5, 3, 6, 6), dtype=np.float32)
    a, b = run_outputs([setup["a"], setup["changed"]], [{"x": x[:2]}, {"x": x[2:]}])
    assert a["logits"].shape == b["logits"].shape == (5, CLASSES)


def test_usage_and_model_errors(setup, tmp_path):
    def code(*args, **kwargs):
        with pytest.raises(SanitizeError) as info:
            compare_models(*args, **kwargs)
        assert "\n" not in str(info.value)
        return info.value.code

    assert code([setup["a"]], setup["clean"]) == ExitCode.USAGE
    assert code([setup["a"], setup["same"]], setup["clean"], min_agreement=1.5) == ExitCode.USAGE
    assert code([tmp_path / "x.engine", tmp_path / "y.plan"], setup["clean"]) == ExitCode.USAGE
    assert code([setup["a"], tmp_path / "missing.onnx"], setup["clean"]) == ExitCode.BAD_MODEL
    assert code([setup["a"], setup["same"]], tmp_path / "missing.npz") == ExitCode.BAD_DATA
    assert code([setup["a"], setup["same"]], setup["clean"], layout="nhwc") == ExitCode.USAGE


def test_engine_without_tensorrt_is_a_missing_dependency(setup, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed: the missing-TensorRT path cannot happen here")
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(SanitizeError) as info:
        compare_models([setup["a"], engine], setup["clean"])
    assert info.value.code == ExitCode.MISSING_DEP


def test_polygraphy_command():
    text = polygraphy_command(["a.onnx", "b.onnx", "c.engine"], inputs="inputs.json")
    first, second, third = [shlex.split(line) for line in text.splitlines()]
    assert first == ["polygraphy", "run", "a.onnx", "--onnxrt", "--providers", "cpu",
                     "--load-inputs", "inputs.json", "--save-outputs", "a.outputs.json"]
    assert second[:6] == ["polygraphy", "run", "b.onnx", "--onnxrt", "--providers", "cpu"]
    assert "--load-outputs" in second and "--check-error-stat" in second and "--atol" in second
    assert third[:6] == ["polygraphy", "run", "c.engine", "--model-type", "engine", "--trt"]


def test_polygraphy_command_runs_for_real(setup, tmp_path, monkeypatch):
    """The printed lines work with the inputs `compare --save-inputs` writes."""
    import subprocess

    inputs = tmp_path / "inputs.json"
    report = compare_models([setup["a"], setup["same"]], setup["clean"], save_inputs=inputs)
    monkeypatch.chdir(tmp_path)
    for line in report["polygraphy"].splitlines():
        subprocess.run(shlex.split(line), check=True, capture_output=True, timeout=300)
    assert (tmp_path / "a.outputs.json").is_file()


# --------------------------------------------------------------------------------------- the CLI

def run_cli(args: list[str]):
    app = typer.Typer()
    cli_deploy.register(app)
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})  # rich wraps narrower tables
    if isinstance(result.exception, SanitizeError):
        return int(result.exception.code), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def test_cli_compare_passes_and_prints_a_table(setup):
    code, output = run_cli(["compare", str(setup["a"]), str(setup["same"]), "--data", str(setup["clean"])])
    assert code == 0
    assert "top-1 agreement" in output and "1.0000" in output and "polygraphy run" in output


def test_cli_compare_json_and_disagreement_exit_8(setup):
    code, output = run_cli(["compare", str(setup["a"]), str(setup["changed"]), "--data", str(setup["clean"]),
                            "--triggered", str(setup["triggered"]), "--json"])
    assert code == ExitCode.DISAGREE == 8
    report = json.loads(output)
    assert report["passed"] is False and report["triggered"] is not None


def test_cli_compare_threshold_and_preprocess_flags(setup):
    code, output = run_cli(["compare", str(setup["a"]), str(setup["changed"]), "--data", str(setup["clean"]),
                            "--min-agreement", "0", "--scale", "1", "--mean", "0.5", "--std", "0.5,0.5,0.5",
                            "--layout", "nchw", "--input-name", "x", "--json"])
    assert code == 0
    assert json.loads(output)["preprocess"] == {"scale": 1.0, "mean": [0.5], "std": [0.5, 0.5, 0.5], "layout": "nchw"}
    code, _ = run_cli(["compare", str(setup["a"]), str(setup["same"]), "--data", str(setup["clean"]), "--mean", "x"])
    assert code == ExitCode.USAGE


def test_cli_compare_save_inputs_needs_force_to_overwrite(setup, tmp_path):
    inputs = tmp_path / "inputs.json"
    inputs.write_text("{}")
    args = ["compare", str(setup["a"]), str(setup["same"]), "--data", str(setup["clean"]), "--save-inputs", str(inputs)]
    code, _ = run_cli(args)
    assert code == ExitCode.OUTPUT and inputs.read_text() == "{}"
    code, _ = run_cli(args + ["--force"])
    assert code == 0 and inputs.stat().st_size > 100


def test_cli_compare_save_inputs_never_replaces_the_images_it_reads(setup, tmp_path):
    data = setup["clean"]
    before = data.read_bytes()
    code, _ = run_cli(["compare", str(setup["a"]), str(setup["same"]), "--data", str(data), "--save-inputs", str(data),
                       "--force"])
    assert code == ExitCode.OUTPUT and data.read_bytes() == before


def tabular(features: int = 10) -> onnx.ModelProto:
    """Gemm over [N, features] rows: a model whose input the images of `setup` do not fit."""
    w = np.random.default_rng(1).normal(size=(features, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["logits"])], "rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_mismatched_inputs_say_which_model_and_shape(setup, tmp_path):
    rows = tmp_path / "rows.onnx"
    onnx.save(tabular(), rows)
    with pytest.raises(SanitizeError) as info:
        compare_models([setup["a"], rows], setup["clean"])
    message = str(info.value)
    assert info.value.code == ExitCode.BAD_MODEL and "\n" not in message
    assert str(rows) in message and "[N, 10]" in message and "[50, 3, 6, 6]" in message
    # polygraphy would have reshaped the 50 images into 540 rows and run; compare refuses before that


def test_fixed_batch_model_listed_second_sets_the_batch_for_all(setup):
    report = compare_models([setup["a"], setup["fixed"]], setup["clean"])
    (pair,) = report["clean"]["pairs"]
    assert pair["images"] == 50 and pair["agreement"] == 1.0 and pair["max_abs_diff"] == 0.0


def test_cli_compare_mismatched_inputs_is_one_error_line(setup, tmp_path):
    """A fresh process, as a user runs it: polygraphy's log ([W] 'colored' ..., [!] Input tensor ...) stays
    off both streams and the failure is the one `error:` line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    rows = tmp_path / "rows.onnx"
    onnx.save(tabular(), rows)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "sanitizer", "compare", str(setup["a"]), str(rows),
                          "--data", str(setup["clean"])],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == ExitCode.BAD_MODEL == 4, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert str(rows) in lines[0] and "[N, 10]" in lines[0]
    assert res.stdout == ""


def test_polygraphy_failures_leave_no_log(setup, tmp_path, monkeypatch, capfd):
    """A failure inside polygraphy (here its reshape of 7 images into [N, 10] rows, with the up-front check
    off) is one BadModel, and polygraphy's own CRITICAL log line stays off both streams."""
    import sanitizer.compare as compare

    rows = tmp_path / "rows.onnx"
    onnx.save(tabular(), rows)
    monkeypatch.setattr(compare, "_input_mismatch", lambda inputs, feeds: None)
    x = np.random.default_rng(4).random((7, 3, 6, 6), dtype=np.float32)
    capfd.readouterr()
    with pytest.raises(SanitizeError) as info:
        run_outputs([setup["a"], rows], [{"x": x}])
    assert info.value.code == ExitCode.BAD_MODEL and str(info.value).startswith("inference failed:")
    assert capfd.readouterr() == ("", "")


def test_model_that_cannot_execute_is_a_bad_model(setup, tmp_path):
    """onnxruntime's own exceptions pass through polygraphy: they are BadModel too, not internal errors."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["logits"])], "fixed4",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(np.ones((3 * 6 * 6, CLASSES), np.float32), "w"),
         numpy_helper.from_array(np.array([4, 3 * 6 * 6], np.int64), "s")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "reshape4.onnx"
    onnx.save(model, path)
    with pytest.raises(SanitizeError) as info:
        compare_models([setup["a"], path], setup["clean"])
    assert info.value.code == ExitCode.BAD_MODEL and "\n" not in str(info.value)
    assert str(info.value).startswith("inference failed: onnxruntime cannot run a model:")
