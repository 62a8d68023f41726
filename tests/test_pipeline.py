"""End to end through `sanitize MODEL --calib X.npz --out OUT`: what is written, what the report says, and that
the written model is exactly the original with the reported units masked."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, numpy_helper

import models as M
from masked import masked_reference
from sanitizer.pipeline import split

UNCHECKED = "--no-sanity-check"   # random models on noise images: nothing for the sanity gate to pass (test_sanity.py)


def load_report(path) -> dict:
    return json.loads(path.read_text())


def pruned_reference(model: onnx.ModelProto, report: dict, tensors: dict[str, tuple[str, int, int]]):
    """Masked reference for the report's plan; tensors: site -> (measured tensor, channels, rank)."""
    masks = {}
    for site, channels in report["plan"]["pruned"].items():
        tensor, n, rank = tensors[site]
        mask = np.ones(n)
        mask[channels] = 0
        masks[tensor] = (mask, rank)
    return masked_reference(model, masks)


def fit_statistic(model: onnx.ModelProto, npz, tensor: str, reduce) -> np.ndarray:
    """A criterion computed by hand: the site tensor on the fit images (default preprocessing, x/255, NCHW)."""
    data = np.load(npz)
    fit, _ = split(len(data["X"]), 0.5, 0)
    x = (data["X"][fit].astype(np.float32) / 255).transpose(0, 3, 1, 2)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=tensor))
    a = M.run(probe, {"input": x}, [tensor])[0].astype(np.float64)
    return reduce(a.reshape(a.shape[0], a.shape[1], -1)).mean(0)


def test_run_writes_a_valid_model_and_a_full_report(cli, write_model, write_npz, tmp_path):
    model_path, calib = write_model(M.plain), write_npz()
    before = model_path.read_bytes()
    out, report_path = tmp_path / "clean.onnx", tmp_path / "report.json"
    result = cli(model_path, "--calib", calib, UNCHECKED, "--out", out, "--report", report_path, "--max-acc-drop", "0.3",
                 "--criterion", "linf")
    assert result.code == 0, result.err

    assert model_path.read_bytes() == before
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    original = onnx.load(str(model_path))
    assert written.graph.input == original.graph.input and written.graph.output == original.graph.output
    assert [n.op_type for n in written.graph.node] == [n.op_type for n in original.graph.node]

    report = load_report(report_path)
    for key in ("input", "preprocess", "criterion", "pruned_per_layer", "held_out_after", "plan", "scope"):
        assert key in report
    assert report["input"]["sha256"] == hashlib.sha256(before).hexdigest()
    assert report["output"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert report["preprocess"]["layout"] == "nchw" and report["preprocess"]["input_name"] == "input"
    assert report["preprocess"]["scale"] == pytest.approx(1 / 255)
    assert report["criterion"] == "linf"
    steps = {"setup", "statistics", "search", "final checks", "write", "total"}
    assert set(report["timings_seconds"]) == set(report["cpu_seconds"]) == steps
    assert report["scope"] == ["conv2"]                  # the last conv stage by default
    assert report["held_out_after"]["n"] == 60
    assert report["held_out_after"]["drop_estimate"] <= 0.02 and report["degraded"] is False
    count = report["plan"]["count"]
    assert sum(report["pruned_per_layer"].values()) == count
    assert 0 < count < 8                                # a layer is never emptied
    units = [t["units"] for t in report["plan"]["trace"]]
    assert count in units and units == sorted(units)

    # the written weights are the original with the reported units masked, nothing else
    feed = M.random_input(original, 4)
    want = M.run(pruned_reference(original, report, {"conv2": ("relu2_out", 8, 4)}), feed)[0]
    np.testing.assert_allclose(M.run(written, feed)[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("criterion,reduce", [
    ("linf", lambda a: np.abs(a).max(-1)),
    ("mean", lambda a: a.mean(-1)),
])
def test_ratio_half_prunes_the_least_active_half_of_the_last_stage(cli, write_model, write_npz, tmp_path,
                                                                   criterion, reduce):
    model_path, calib = write_model(M.plain), write_npz()
    out, report_path = tmp_path / "clean.onnx", tmp_path / "report.json"
    result = cli(model_path, "--calib", calib, UNCHECKED, "--out", out, "--report", report_path, "--criterion", "linf", "--ratio", "0.5",
                 "--criterion", criterion, "--allow-degraded")
    assert result.code == 0, result.err
    report = load_report(report_path)
    assert report["criterion"] == criterion
    assert report["pruned_per_layer"] == {"conv2": 4}
    score = fit_statistic(onnx.load(str(model_path)), calib, "relu2_out", reduce)
    assert sorted(report["plan"]["pruned"]["conv2"]) == sorted(np.argsort(score, kind="stable")[:4].tolist())
    # producer rewrite: exactly the pruned filters and their biases are zero
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    zero_filters = [c for c in range(8) if not w["conv2.weight"][c].any() and w["conv2.bias"][c] == 0]
    assert zero_filters == report["plan"]["pruned"]["conv2"]


def test_the_last_stage_is_the_last_spatial_map_not_a_squeeze_excitation_gate(cli, write_model, write_npz, tmp_path):
    model_path, calib = write_model(M.squeeze_excite), write_npz()
    report_path = tmp_path / "report.json"
    result = cli(model_path, "--calib", calib, UNCHECKED, "--out", tmp_path / "clean.onnx", "--report", report_path,
                 "--criterion", "linf", "--ratio", "0.25", "--allow-degraded")
    assert result.code == 0, result.err
    assert load_report(report_path)["scope"] == ["conv2"]


def test_layers_all_ranks_every_conv_and_dense_layer_but_no_join(cli, write_model, write_npz, tmp_path):
    model_path, calib = write_model(M.resnet), write_npz()
    out, report_path = tmp_path / "clean.onnx", tmp_path / "report.json"
    result = cli(model_path, "--calib", calib, UNCHECKED, "--out", out, "--report", report_path, "--layers", "all",
                 "--criterion", "linf", "--ratio", "0.25", "--allow-degraded")
    assert result.code == 0, result.err
    report = load_report(report_path)
    assert report["scope"] == ["stem", "b0_conv1", "b0_conv2", "down_conv1", "down_conv2", "down_short"]
    assert report["plan"]["candidates"] == 8 * 3 + 16 * 3
    assert sum(report["pruned_per_layer"].values()) == round(0.25 * 72)
    original = onnx.load(str(model_path))
    tensors = {"stem": ("stem_relu_out", 8, 4), "b0_conv1": ("b0_relu1_out", 8, 4), "b0_conv2": ("b0_conv2_out", 8, 4),
               "down_conv1": ("down_relu1_out", 16, 4), "down_conv2": ("down_conv2_out", 16, 4),
               "down_short": ("down_short_out", 16, 4)}
    feed = M.random_input(original, 3)
    want = M.run(pruned_reference(original, report, tensors), feed)[0]
    np.testing.assert_allclose(M.run(onnx.load(str(out)), feed)[0], want, rtol=1e-5, atol=1e-5)


def test_named_layers_with_the_consumer_rewrite(cli, write_model, write_npz, tmp_path):
    model_path, calib = write_model(M.with_bn), write_npz()
    out, report_path = tmp_path / "clean.onnx", tmp_path / "report.json"
    result = cli(model_path, "--calib", calib, UNCHECKED, "--out", out, "--report", report_path, "--layers", "conv1,conv2",
                 "--ratio", "0.5", "--criterion", "l2", "--allow-degraded")
    assert result.code == 0, result.err
    report = load_report(report_path)
    assert report["scope"] == ["conv1", "conv2"] and sum(report["pruned_per_layer"].values()) == 7
    original = onnx.load(str(model_path))
    feed = M.random_input(original, 3)
    want = M.run(pruned_reference(original, report, {"conv1": ("relu1_out", 6, 4), "conv2": ("relu2_out", 8, 4)}),
                 feed)[0]
    np.testing.assert_allclose(M.run(onnx.load(str(out)), feed)[0], want, rtol=1e-5, atol=1e-5)


def test_external_data_in_external_data_out(cli, write_model, write_npz, tmp_path):
    model_path, calib = write_model(M.plain, external=True), write_npz()
    data_file = tmp_path / "model.onnx.data"
    assert data_file.is_file()
    before = (model_path.read_bytes(), data_file.read_bytes())
    out, report_path = tmp_path / "out" / "clean.onnx", tmp_path / "report.json"
    out.parent.mkdir()
    result = cli(model_path, "--calib", calib, UNCHECKED, "--out", out, "--report", report_path, "--criterion", "linf", "--ratio", "0.5",
                 "--allow-degraded")
    assert result.code == 0, result.err
    assert (model_path.read_bytes(), data_file.read_bytes()) == before

    report = load_report(report_path)
    assert report["input"]["external_data"] is True
    # the weights' file is hashed too: the .onnx file's hash alone does not change with them
    assert report["input"]["data_sha256"] == {str(tmp_path / "model.onnx.data"): hashlib.sha256(before[1]).hexdigest()}
    model_file, data_file = sorted(out.parent.iterdir())
    assert model_file == out and re.fullmatch(r"clean\.onnx\.[0-9a-f]{8}\.data", data_file.name)
    assert data_file.name == f"clean.onnx.{hashlib.sha256(data_file.read_bytes()).hexdigest()[:8]}.data"
    skeleton = onnx.load(str(out), load_external_data=False)
    assert any(external_data_helper.uses_external_data(t) for t in skeleton.graph.initializer)
    assert {e.value for t in skeleton.graph.initializer if external_data_helper.uses_external_data(t)
            for e in t.external_data if e.key == "location"} == {data_file.name}
    onnx.checker.check_model(str(out), full_check=True)
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert sum(not w["conv2.weight"][c].any() for c in range(8)) == 4


@pytest.mark.parametrize("build,size", [
    pytest.param(lambda: M.plain(batch=1), (8, 8), id="fixed_batch"),
    (M.dynamo, (8, 8)),                          # opset 18, ReduceMean with axes input
    (M.tf2onnx, (8, 8)),                         # NHWC input: layout read from the model
    (M.mobilenet, (8, 8)),
])
def test_other_export_patterns_run_end_to_end(cli, write_model, write_npz, tmp_path, build, size):
    model_path, calib = write_model(build), write_npz(hw=size)
    out, report_path = tmp_path / "clean.onnx", tmp_path / "report.json"
    result = cli(model_path, "--calib", calib, UNCHECKED, "--out", out, "--report", report_path, "--criterion", "linf", "--ratio", "0.5",
                 "--allow-degraded")
    assert result.code == 0, result.err
    report = load_report(report_path)
    assert sum(report["pruned_per_layer"].values()) >= 3
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    original = onnx.load(str(model_path))
    assert written.graph.input == original.graph.input and written.graph.output == original.graph.output
    feed = M.random_input(original, 2)
    assert not np.allclose(M.run(written, feed)[0], M.run(original, feed)[0])


def test_split_is_deterministic_and_disjoint():
    fit, hold = split(120, 0.5, 7)
    assert len(fit) == len(hold) == 60
    assert not set(fit) & set(hold) and set(fit) | set(hold) == set(range(120))
    again = split(120, 0.5, 7)
    assert np.array_equal(fit, again[0]) and np.array_equal(hold, again[1])
    assert not np.array_equal(hold, split(120, 0.5, 8)[1])
