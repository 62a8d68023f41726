"""The model's interface on every path: the input's own float dtype, the classifier output among several,
dynamic height/width with --input-size, and compare's polygraphy lines and quiet stderr."""
import json
import shlex

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import models as M
from calib.stats import UnitAxis, collect
from sanitizer.errors import ExitCode

DTYPES = {"float16": TensorProto.FLOAT16, "float64": TensorProto.DOUBLE, "bfloat16": TensorProto.BFLOAT16}


@pytest.fixture
def calib(tmp_path):
    x, y = M.channel_images(120)
    np.savez(tmp_path / "calib.npz", X=x, y=y)
    return tmp_path / "calib.npz"


def run_job(cli, model_path, calib, tmp_path, *extra):
    report = tmp_path / "r.json"
    result = cli(model_path, "--calib", calib, "--criterion", "linf", "--layers", "fc1", "--out",
                 tmp_path / "out.onnx", "--report", report, "--force", *extra)
    assert result.code == 0, result.err
    return json.loads(report.read_text())


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_job_evaluate_and_layers_feed_the_input_in_its_own_dtype(cli, write_model, calib, tmp_path, dtype):
    path = write_model(M.brightest_channel(DTYPES[dtype]))
    report = run_job(cli, path, calib, tmp_path)
    assert report["sanity"]["accuracy"] == 1.0   # the original, fed its own dtype, is right on every image
    assert report["plan"]["candidates"] == 6
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert out.graph.input[0].type.tensor_type.elem_type == DTYPES[dtype]
    result = cli("evaluate", path, "--data", calib, "--json")
    assert result.code == 0 and json.loads(result.out)["clean_acc"] == 1.0, result.err
    result = cli("layers", path)
    assert result.code == 0 and "fc1" in result.out, result.err


def test_float16_statistics_are_computed_in_float32(tmp_path):
    # the ℓ2 of a 16x16 map of 300s is 4800, but its sum of squares (23 million) overflows float16 (65504)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 2, 16, 16])],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT16, ["N", 2, 16, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.full((3, 2, 16, 16), 300.0, np.float32)
    x[:, 1] = -1
    got = collect(model, {"r": UnitAxis(4, 1)}, iter([x]), "x", keep_per_image=True).stats["r"].per_image
    np.testing.assert_allclose(got["l2"][:, 0], 4800.0, rtol=1e-3)
    np.testing.assert_array_equal(got["linf"], [[300.0, 0.0]] * 3)
    np.testing.assert_allclose(got["l1"][:, 0], 300.0 * 256, rtol=1e-3)


def test_a_label_output_before_the_scores_is_not_read(cli, write_model, calib, tmp_path):
    path = write_model(M.brightest_channel(label_first=True))
    report = run_job(cli, path, calib, tmp_path)
    assert report["model_output"] == {"name": "scores", "kind": "logits"}
    assert report["sanity"]["accuracy"] == 1.0
    result = cli("evaluate", path, "--data", calib, "--json")
    assert json.loads(result.out)["clean_acc"] == 1.0


def test_several_score_outputs_need_output_name_everywhere(cli, write_model, calib, tmp_path):
    model = M.brightest_channel(head="softmax")
    model.graph.output.append(helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3]))
    path = write_model(model)
    for args in ((path, "--calib", calib, "--criterion", "linf"), ("evaluate", path, "--data", calib),
                 ("compare", path, path, "--data", calib)):
        result = cli(*args)
        assert result.code == ExitCode.USAGE and "--output-name" in result.err, result.err
        assert "probs" in result.err and "scores" in result.err and len(result.err_lines) == 1
    report = run_job(cli, path, calib, tmp_path, "--output-name", "probs")
    assert report["model_output"] == {"name": "probs", "kind": "probabilities"}
    result = cli("compare", path, path, "--data", calib, "--output-name", "scores", "--json")
    assert result.code == 0 and json.loads(result.out)["clean"]["pairs"][0]["output"] == "scores"


def test_dynamic_height_and_width_take_input_size(cli, write_model, calib, tmp_path):
    path = write_model(M.brightest_channel(hw=("H", "W")))
    result = cli(path, "--calib", calib, "--criterion", "linf")
    assert result.code == ExitCode.USAGE and "--input-size" in result.err and len(result.err_lines) == 1
    report = run_job(cli, path, calib, tmp_path, "--input-size", "6x10")   # the 8x8 images are resized
    assert report["preprocess"]["input_size"] == [6, 10] and report["sanity"]["accuracy"] == 1.0
    dims = onnx.load(str(tmp_path / "out.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[2:]] == ["H", "W"]   # the sanitized model stays dynamic
    for args in (("evaluate", path, "--data", calib, "--input-size", "8x8"), ("layers", path, "--input-size", "8x8")):
        assert cli(*args).code == 0
    assert cli(path, "--calib", calib, "--input-size", "8").code == ExitCode.USAGE


def test_layers_reads_a_dynamic_size_model_at_a_size_it_runs_at(cli, write_model):
    def dynamic(model):
        dims = model.graph.input[0].type.tensor_type.shape.dim
        dims[2].dim_param, dims[3].dim_param = "H", "W"
        return write_model(model)

    path = dynamic(M.resnet())   # global average pooling: any size runs
    result = cli("layers", path, "--json")
    assert result.code == 0 and "read at 224x224" in result.err and len(result.err_lines) == 1
    assert json.loads(result.out) == json.loads(cli("layers", path, "--json", "--input-size", "8x8").out)
    flat = dynamic(M.flat_head())   # Flatten into a Gemm of 6·8·8 inputs: runs at 8x8 alone, no usual size
    result = cli("layers", flat)
    assert result.code == ExitCode.USAGE and "--input-size" in result.err and len(result.err_lines) == 1
    result = cli("layers", flat, "--input-size", "8x8")
    assert result.code == 0 and "conv2" in result.out and result.err == ""


def test_a_fixed_batch_is_fed_full_batches(cli, write_model, calib, tmp_path):
    report = run_job(cli, write_model(M.brightest_channel(batch=7)), calib, tmp_path)   # 120 = 17 x 7 + 1
    assert report["sanity"]["images"] == 120 and report["sanity"]["accuracy"] == 1.0


def test_compare_prints_the_command_that_writes_its_inputs_and_no_onnxruntime_warnings(cli, write_model, calib,
                                                                                        tmp_path, monkeypatch):
    model = M.brightest_channel(label_first=True)
    for t in model.graph.initializer:   # initializers that are also graph inputs make onnxruntime warn
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    a, b = write_model(model, "a.onnx"), write_model(model, "b.onnx")
    result = cli("compare", a, b, "--data", calib, "--mean", "0.1")
    assert result.code == 0 and result.err == "", result.err
    save_line = next(line for line in result.out.splitlines() if line.startswith("sanitize compare"))
    args = shlex.split(save_line)
    assert args[args.index("--save-inputs") + 1] == "inputs.json" and args[args.index("--mean") + 1] == "0.1"
    monkeypatch.chdir(tmp_path)
    result = cli(*args[1:])
    assert result.code == 0 and result.err == ""
    from polygraphy.json import load_json

    fed = load_json("inputs.json")
    assert len(fed) == 2 and fed[0]["input"].shape == (64, 3, 8, 8) and fed[0]["input"].dtype == np.float32
