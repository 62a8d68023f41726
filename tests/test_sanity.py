"""The sanity gate: the original model on the calibration images, before anything is pruned (sanitizer/sanity.py).

Each refusal is a real run of the CLI on a model built in code that classifies its images correctly
(tests/models.py brightest_channel), fed the mistakes users make."""
import json

import numpy as np
import pytest
from onnx import TensorProto, helper

import models as M
from calib.data import open_dataset
from calib.preprocess import input_spec, resolve_preprocess
from sanitizer.errors import ExitCode, SanitizeError
from sanitizer.sanity import check_original


@pytest.fixture
def good(write_model, tmp_path):
    """(model path, npz writer): npz(X=..., y=...) -> path."""
    def npz(name="calib.npz", **arrays):
        path = tmp_path / name
        np.savez(path, **arrays)
        return path

    return write_model(M.brightest_channel()), npz


def job(cli, model, calib, tmp_path, *extra):
    report = tmp_path / "r.json"
    result = cli(model, "--calib", calib, "--criterion", "linf", "--out", tmp_path / "out.onnx", "--report", report,
                 "--force", *extra)
    return result, (json.loads(report.read_text()) if result.code == 0 else None)


def refused(result, *words) -> str:
    assert result.code == ExitCode.BAD_DATA, result.err
    assert len(result.err_lines) == 1
    for w in words:
        assert w in result.err, result.err
    return result.err


@pytest.mark.parametrize("labeled", [True, False])
def test_a_model_that_works_passes(cli, good, tmp_path, labeled):
    model, npz = good
    x, y = M.channel_images(120)
    result, report = job(cli, model, npz(X=x, **({"y": y} if labeled else {})), tmp_path)
    assert result.code == 0, result.err
    sanity = report["sanity"]
    assert sanity["tripped"] is None and sanity["images"] == 120 and sanity["classes"] == 3
    assert sanity["top_share"] == pytest.approx(1 / 3, abs=0.01)
    assert (sanity["covered"], sanity["coverage_floor"]) == (3, 2)
    if labeled:
        assert (sanity["accuracy"], sanity["kappa"]) == (1.0, 1.0)
    assert report["model_output"] == {"name": "scores", "kind": "logits"}


def test_labels_that_are_not_the_model_classes_exit_5_naming_labels(cli, good, tmp_path):
    model, npz = good
    x, y = M.channel_images(120)
    msg = refused(job(cli, model, npz(X=x, y=(y + 1) % 3), tmp_path)[0], "labels", "0.0%", "kappa",
                  "another class order", "--no-sanity-check")
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "r.json").exists(), msg


def test_random_labels_trip_the_kappa_bar(cli, good, tmp_path):
    model, npz = good
    x, _ = M.channel_images(300)
    y = np.random.default_rng(5).integers(0, 3, 300)
    refused(job(cli, model, npz(X=x, y=y), tmp_path)[0], "labels", "kappa")


def test_labels_beyond_the_model_classes_exit_5(cli, good, tmp_path):
    model, npz = good
    x, y = M.channel_images(120)
    refused(job(cli, model, npz(X=x, y=y + 1), tmp_path)[0], "labels go up to 3", "3 classes")


def test_pixels_already_in_0_1_with_the_default_scale_exit_5_naming_scale(cli, good, tmp_path):
    model, npz = good
    x, y = M.channel_images(120)
    calib = npz(X=x.astype(np.float32) / 255, y=y)
    refused(job(cli, model, calib, tmp_path)[0], "--scale 1", "0.0039")
    result, report = job(cli, model, calib, tmp_path, "--scale", "1")
    assert result.code == 0 and report["sanity"]["accuracy"] == 1.0


def test_predictions_collapsed_on_one_class_exit_5_naming_the_preprocessing(cli, good, tmp_path):
    # a mean far off shifts every input below 0: the model sees nothing and gives class 0 to every image
    model, npz = good
    x, _ = M.channel_images(120)
    refused(job(cli, model, npz(X=x), tmp_path, "--mean", "5")[0], "class 0 to 100.0%", "--scale", "--mean/--std",
            "--layout")


def test_no_sanity_check_overrides_and_the_report_keeps_the_numbers(cli, good, tmp_path):
    model, npz = good
    x, y = M.channel_images(120)
    result, report = job(cli, model, npz(X=x, y=(y + 1) % 3), tmp_path, "--no-sanity-check")
    assert result.code == 0, result.err
    assert report["sanity"]["enforced"] is False and "labels" in report["sanity"]["tripped"]
    assert report["sanity"]["accuracy"] == 0.0


def test_an_output_with_one_value_per_image_is_not_a_classifier(cli, write_model, tmp_path):
    model = M.brightest_channel()
    model.graph.node.append(helper.make_node("ReduceMean", ["scores"], ["one"], axes=[1], keepdims=1))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("one", TensorProto.FLOAT, ["N", 1]))
    x, _ = M.channel_images(120)
    np.savez(tmp_path / "c.npz", X=x)
    result = cli(write_model(model), "--calib", tmp_path / "c.npz", "--criterion", "linf", "--no-sanity-check")
    assert result.code == ExitCode.BAD_MODEL and "1 value per image" in result.err, result.err


def test_probabilities_are_told_from_logits_by_their_values_or_a_softmax(tmp_path):
    x, y = M.channel_images(60)
    np.savez(tmp_path / "c.npz", X=x, y=y)
    for head, kind in ((None, "logits"), ("softmax", "probabilities"), ("normalise", "probabilities")):
        model = M.brightest_channel(head=head)
        spec = input_spec(model)
        assert spec.output_kind == ("probabilities" if head == "softmax" else "logits")
        data = open_dataset(tmp_path / "c.npz", size=(8, 8), channels=3)
        got = check_original(model, spec, resolve_preprocess(spec), data, labels=data.labels)
        assert got["output"]["kind"] == kind and got["accuracy"] == 1.0


def test_the_gate_on_its_own_refuses_or_reports(tmp_path):
    model = M.brightest_channel()
    spec = input_spec(model)
    x, y = M.channel_images(90)
    np.savez(tmp_path / "c.npz", X=x, y=(y + 2) % 3)
    data = open_dataset(tmp_path / "c.npz", size=(8, 8), channels=3)
    with pytest.raises(SanitizeError) as info:
        check_original(model, spec, resolve_preprocess(spec), data, labels=data.labels)
    assert info.value.code == ExitCode.BAD_DATA
    got = check_original(model, spec, resolve_preprocess(spec), data, labels=data.labels, enforce=False)
    assert got["kappa"] == pytest.approx(-0.5) and got["mapped_accuracy"] == 1.0 and got["tripped"]
    # unlabeled, the same images pass: nothing says the model is wrong on them
    assert check_original(model, spec, resolve_preprocess(spec), data, labels=None)["tripped"] is None


@pytest.mark.parametrize("labeled", [True, False])
def test_images_of_only_some_classes_exit_5_naming_the_coverage(cli, good, tmp_path, labeled):
    model, npz = good
    x, y = M.channel_images(600)
    some = y != 2   # a user who calibrates on the classes they have at hand: the third is never shown
    calib = npz(X=x[some], **({"y": y[some]} if labeled else {}))
    err = refused(job(cli, model, calib, tmp_path)[0], "400 calibration images stand for 2 of the model's 3 classes",
                  "their labels" if labeled else "the original model's predictions", "would show at least 3",
                  "add images of the other classes", "--no-sanity-check")
    assert "each at least 0.1 as frequent as in a balanced set" in err
    result, report = job(cli, model, calib, tmp_path, "--no-sanity-check")
    assert result.code == 0 and report["sanity"]["covered"] == 2 and report["sanity"]["tripped"] is not None


def test_the_coverage_floor_passes_uneven_sets_and_trips_on_missing_classes():
    from sanitizer.sanity import RARE_SHARE, coverage_floor

    # a set as uneven as the bar allows — every class but one at RARE_SHARE of a balanced share, the worst
    # case — falls under the floor in at most 0.1 % of draws, up to sampling noise (seeded, 2000 per size)
    rng = np.random.default_rng(0)
    for classes, n in ((10, 100), (10, 411), (43, 100), (43, 500), (200, 500)):
        share = np.full(classes, RARE_SHARE / classes)
        share[0] = 1 - share[1:].sum()
        seen = np.array([len(np.unique(rng.choice(classes, n, p=share))) for _ in range(2000)])
        assert np.mean(seen < coverage_floor(classes, n)) <= 0.003, (classes, n)
    # the digits model calibrated on 0-4 (411 images) and on 0-1 (170): under the floor
    assert coverage_floor(10, 411) > 5 and coverage_floor(10, 170) > 2
    # 500 images of a 1000-class model need not show most classes
    assert 20 < coverage_floor(1000, 500) < 40
