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
