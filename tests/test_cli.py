"""The command line: documented exit codes, one line on stderr per failure, nothing written when it fails;
`evaluate --json`; the engine path on a host without TensorRT."""
from __future__ import annotations

import importlib.util
import json
import signal

import numpy as np
import onnx
import pytest

import models as M
from conftest import files_in
from sanitizer.errors import ExitCode

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
UNCHECKED = "--no-sanity-check"   # random models on noise images: nothing for the sanity gate to pass (test_sanity.py)


def assert_one_line_error(result, code: int):
    assert result.code == code, (result.code, result.err)
    assert len(result.err_lines) == 1, result.err
    assert "Traceback" not in result.err + result.out
    assert result.err_lines[0].startswith("error: ")


# name -> (exit code, setup(tmp_path, write_model, write_npz) -> argv). Each setup leaves a valid default for
# everything but the one thing that is wrong.
def _corrupt_model(tmp, wm, wn):
    bad = tmp / "model.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    return [bad, "--calib", wn(), "--out", tmp / "clean.onnx"]


def _existing_output(tmp, wm, wn):
    (tmp / "clean.onnx").write_bytes(b"an older result")
    return [wm(), "--calib", wn(), "--out", tmp / "clean.onnx"]


def _npz_without_x(tmp, wm, wn):
    np.savez(tmp / "calib.npz", images=M.images(120))
    return [wm(), "--calib", tmp / "calib.npz", "--out", tmp / "clean.onnx"]


ERRORS = {
    "corrupt_onnx": (ExitCode.BAD_MODEL, _corrupt_model),
    "missing_calib": (ExitCode.BAD_DATA, lambda t, wm, wn: [wm(), "--calib", t / "nope.npz", "--out", t / "clean.onnx"]),
    "calib_without_X": (ExitCode.BAD_DATA, _npz_without_x),
    "too_few_images": (ExitCode.BAD_DATA, lambda t, wm, wn: [wm(), "--calib", wn(n=30), "--out", t / "clean.onnx"]),
    "out_is_input": (ExitCode.OUTPUT, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "model.onnx"]),
    "out_exists": (ExitCode.OUTPUT, _existing_output),
    # x.engine is written as x.onnx first: that must not be the input model either
    "engine_onnx_is_input": (ExitCode.OUTPUT, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "model.engine"]),
    "out_folder_missing": (ExitCode.OUTPUT, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "no" / "c.onnx"]),
    "report_folder_missing": (ExitCode.OUTPUT, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                                  "--report", t / "no" / "r.json"]),
    "mean_wrong_length": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                             "--mean", "0.4,0.5"]),
    "unknown_layer": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                         "--layers", "conv9"]),
    "blocked_layer": (ExitCode.USAGE, lambda t, wm, wn: [wm(M.blocked), "--calib", wn(), "--out", t / "clean.onnx",
                                                         "--layers", "conv_a"]),
    # an ASR toward a class the model cannot output would read 0, like a removed backdoor
    "target_not_a_class": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                              "--eval-triggered", wn("trig.npz", labels=False),
                                                              "--target", M.CLASSES, "--criterion", "linf", UNCHECKED]),
    "target_without_triggered": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                                    "--target", 0, "--criterion", "linf", UNCHECKED]),
    "layers_names_none": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                             "--layers", ",", "--criterion", "linf", UNCHECKED]),
    "budget_negative": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                           "--max-acc-drop", "-0.1", "--criterion", "linf", UNCHECKED]),
    "budget_past_one": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                           "--max-acc-drop", "2", "--criterion", "linf", UNCHECKED]),
    "std_negative": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                        "--std", "-1", "--criterion", "linf", UNCHECKED]),
    # the suffix says what is written: an ONNX model under another name would pass for something else
    "out_not_onnx_or_engine": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.txt"]),
    "unknown_criterion": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                             "--criterion", "entropy"]),
    # numpy and torch take different seed ranges: a seed past either is refused before any work
    "seed_negative": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                         "--seed", "-1"]),
    "seed_past_32_bits": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                             "--seed", str(2**32)]),
    "ratio_above_one": (ExitCode.USAGE, lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "clean.onnx",
                                                           "--criterion", "linf", "--ratio", "1.5", UNCHECKED]),
    # label-free, this random model's pruned twin disagrees everywhere: estimated drop 0.04 (its own
    # probabilities are near uniform, so each changed prediction is a small expected loss)
    "budget_broken": (ExitCode.DEGRADED, lambda t, wm, wn: [wm(lambda: M.plain(seed=4)), "--calib", wn(labels=False),
                                                            "--out", t / "clean.onnx", "--layers", "all",
                                                            "--report", t / "r.json", "--ratio", "0.9", "--criterion", "linf",
                                                            "--max-acc-drop", "0.01", UNCHECKED]),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_failures_exit_with_their_code_one_line_and_write_nothing(name, cli, write_model, write_npz, tmp_path):
    code, setup = ERRORS[name]
    argv = setup(tmp_path, write_model, write_npz)
    before = files_in(tmp_path)
    result = cli(*argv)
    assert_one_line_error(result, code)
    assert files_in(tmp_path) == before


def test_ctrl_c_exits_130_says_so_and_writes_nothing(cli, write_model, write_npz, tmp_path, monkeypatch):
    """A SIGINT mid-run (here right after the model is prepared) ends with the shell's 130 and one line, not 0:
    a script doing `sanitize ... && deploy` must not go on."""
    from sanitizer import pipeline

    prepare = pipeline.prepare

    def interrupted(opts):
        prepared = prepare(opts)
        signal.raise_signal(signal.SIGINT)
        return prepared

    monkeypatch.setattr(pipeline, "prepare", interrupted)
    # a shell starts background jobs with SIGINT ignored: give the test Python's own handler, as a terminal has
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    argv = [write_model(), "--calib", write_npz(), "--out", tmp_path / "clean.onnx", "--criterion", "linf", UNCHECKED]
    before = files_in(tmp_path)
    result = cli(*argv)
    signal.signal(signal.SIGINT, previous)
    assert (result.code, result.err_lines) == (130, ["aborted"]), result.err
    assert files_in(tmp_path) == before


def test_a_clean_data_criterion_says_the_backdoor_was_not_checked(cli, write_model, write_npz, tmp_path):
    # exit 0 and a written model must not read as "backdoor removed" when nothing looked for one
    result = cli(write_model(), "--calib", write_npz(), "--out", tmp_path / "o.onnx", "--criterion", "linf", UNCHECKED)
    assert result.code == 0 and (tmp_path / "o.onnx").exists(), result.err
    assert "backdoor not checked: --criterion linf" in " ".join(result.out.split()), result.out


def test_force_overwrites_an_existing_output(cli, write_model, write_npz, tmp_path):
    out = tmp_path / "clean.onnx"
    out.write_bytes(b"an older result")
    result = cli(write_model(), "--calib", write_npz(), "--out", out, "--criterion", "linf", "--ratio", "0.25", "--allow-degraded", "--force",
                 UNCHECKED)
    assert result.code == 0, result.err
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_allow_degraded_writes_and_says_so(cli, write_model, write_npz, tmp_path):
    out, report = tmp_path / "clean.onnx", tmp_path / "r.json"
    result = cli(write_model(lambda: M.plain(seed=4)), "--calib", write_npz(labels=False), "--out", out, "--report", report,
                 "--criterion", "linf", "--layers", "all", "--ratio", "0.9", "--max-acc-drop", "0.01", "--allow-degraded", UNCHECKED)
    assert result.code == 0, result.err
    assert out.is_file() and json.loads(report.read_text())["degraded"] is True


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT path cannot happen here")
def test_engine_out_without_tensorrt_leaves_the_onnx_and_exits_3(cli, write_model, write_npz, tmp_path):
    engine = tmp_path / "x.engine"
    result = cli(write_model(), "--calib", write_npz(), "--out", engine, "--criterion", "linf", "--ratio", "0.25", "--allow-degraded",
                 UNCHECKED)
    assert_one_line_error(result, ExitCode.NO_ENGINE)
    assert "TensorRT" in result.err_lines[0]
    assert not engine.exists()
    onnx.checker.check_model(onnx.load(str(tmp_path / "x.onnx")), full_check=True)


def test_evaluate_json_prints_one_object(cli, write_model, write_npz, tmp_path):
    model_path = write_model()
    data, triggered = write_npz("clean.npz", n=40), write_npz("triggered.npz", n=24, labels=False, seed=5)
    result = cli("evaluate", model_path, "--data", data, "--triggered", triggered, "--target", 0, "--json")
    assert result.code == 0, result.err
    lines = [line for line in result.out.splitlines() if line.strip()]
    assert len(lines) == 1
    got = json.loads(lines[0])
    assert set(got) == {"clean_acc", "asr", "n_clean", "n_triggered"}
    assert (got["n_clean"], got["n_triggered"]) == (40, 24)

    model = M.plain()

    def predict(npz):
        x = (np.load(npz)["X"].astype(np.float32) / 255).transpose(0, 3, 1, 2)
        return M.run(model, {"input": x})[0].argmax(1)

    assert got["clean_acc"] == pytest.approx(float((predict(data) == np.load(data)["y"]).mean()))
    assert got["asr"] == pytest.approx(float((predict(triggered) == 0).mean()))


@pytest.mark.parametrize("argv,code", [
    (["--triggered", "{t}"], ExitCode.USAGE),                # ASR needs the target class
    ([], ExitCode.USAGE),                                    # nothing to evaluate on
    (["--data", "{t}"], ExitCode.BAD_DATA),                  # clean accuracy needs labels
    (["--triggered", "{t}", "--target", str(M.CLASSES)], ExitCode.USAGE),   # not a class of the model
    (["--triggered", "{t}", "--target", "-1"], ExitCode.USAGE),
    (["--data", "{wide}", "--target", "0"], ExitCode.USAGE),   # a target with no triggered images to score
    (["--data", "{wide}"], ExitCode.BAD_DATA),               # labels past the model's classes
    (["--data", "{unit}"], ExitCode.BAD_DATA),               # pixels in [0, 1] under the default --scale 1/255
])
def test_evaluate_errors(cli, write_model, write_npz, argv, code, tmp_path):
    triggered = write_npz("triggered.npz", n=10, labels=False)
    wide = write_npz("wide.npz", n=40, classes=M.CLASSES + 5, seed=3)
    np.savez(tmp_path / "unit.npz", X=M.images(40).astype(np.float32) / 255, y=np.arange(40) % M.CLASSES)
    result = cli("evaluate", write_model(), *[a.format(t=triggered, wide=wide, unit=tmp_path / "unit.npz") for a in argv])
    assert_one_line_error(result, code)
    if "{unit}" in argv:
        assert "--data input lies within" in result.err and "pass --scale 1" in result.err


def test_asr_leaves_out_triggered_images_already_labelled_target(cli, write_model, write_npz):
    """The ASR is over triggered images whose true class is not the target: a stamped copy of the whole test
    set must not count the target class's own images as attacks."""
    model_path, triggered = write_model(), write_npz("triggered.npz", n=60, seed=7)
    labels = np.load(triggered)["y"]
    assert (labels == 0).any() and (labels != 0).any()
    result = cli("evaluate", model_path, "--triggered", triggered, "--target", 0, "--json")
    assert result.code == 0, result.err
    got = json.loads(result.out)
    x = (np.load(triggered)["X"].astype(np.float32) / 255).transpose(0, 3, 1, 2)
    pred = M.run(M.plain(), {"input": x})[0].argmax(1)
    assert got["n_triggered"] == int((labels != 0).sum())
    assert got["asr"] == pytest.approx(float((pred[labels != 0] == 0).mean()))


def test_layers_lists_sites_and_their_rewrite(cli, write_model):
    result = cli("layers", write_model(M.blocked))
    assert result.code == 0, result.err
    for name in ("conv_a", "conv_b", "conv_c"):
        assert name in result.out
    assert "blocked" in result.out and "producer" in result.out
    assert "fc" not in result.out.split()


def test_layers_naming_the_class_layer_says_why_it_is_no_candidate(cli, write_model, write_npz, tmp_path):
    result = cli(write_model(), "--calib", write_npz(), "--out", tmp_path / "clean.onnx", "--layers", "fc",
                 "--criterion", "linf", UNCHECKED)
    assert_one_line_error(result, ExitCode.USAGE)
    assert "fc is not a candidate layer" in result.err_lines[0]


def test_bare_command_shows_help_and_one_error_line(cli):
    result = cli()
    assert result.code == ExitCode.USAGE and "Commands" in result.out
    assert result.err_lines == ["error: nothing to do: sanitize MODEL --calib DATA --out OUT (commands above)"]


def test_help_exits_0(cli):
    result = cli("--help")
    assert result.code == 0 and "sanitize" in result.out.lower()


def test_budget_that_nothing_fits_prunes_nothing(cli, write_model, write_npz, tmp_path):
    # a zero budget admits only counts whose held-out predictions do not get worse, at least zero units
    model_path, calib = write_model(lambda: M.plain(seed=4)), write_npz(labels=False)
    report = tmp_path / "r.json"
    result = cli(model_path, "--calib", calib, "--out", tmp_path / "clean.onnx", "--max-acc-drop", "0",
                 "--report", report, "--criterion", "linf", UNCHECKED)
    assert result.code == 0, result.err
    data = json.loads(report.read_text())
    assert data["held_out_after"]["drop_estimate"] <= 0 and data["degraded"] is False
    assert all(t["drop_estimate"] > 0 for t in data["plan"]["trace"] if t["units"] > data["plan"]["count"])


def test_triggered_evaluation_images_that_still_work_refuse_the_result(cli, tmp_path):
    from sanitizer.demo import DEMO

    # linf leaves the demo's backdoor (ASR 0.964 -> 0.89): the user's own triggered images say so
    result = cli(DEMO["model"], "--calib", DEMO["calib"], "--criterion", "linf", "--out", tmp_path / "o.onnx",
                 "--eval-triggered", DEMO["triggered"], "--target", DEMO["target"])
    assert result.code == ExitCode.DEGRADED, result.err
    assert "--eval-triggered images still reach the target on 0.8" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()
    # written anyway with --allow-degraded: the report and the summary say degraded, and why
    result = cli(DEMO["model"], "--calib", DEMO["calib"], "--criterion", "linf", "--out", tmp_path / "o.onnx",
                 "--eval-triggered", DEMO["triggered"], "--target", DEMO["target"], "--allow-degraded",
                 "--report", tmp_path / "r.json")
    assert result.code == 0 and (tmp_path / "o.onnx").exists()
    assert "backdoor not checked" not in result.out, "the triggered images checked it"
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["degraded"] and "still reach the target" in report["evaluation"]["refused"]
    assert "nothing written" not in report["evaluation"]["refused"]
    shown = " ".join(result.out.split())
    assert "degraded: the defense ran" in shown and "written only because of --allow-degraded" in shown


def test_the_demo_takes_the_flags_its_refusal_names(cli, tmp_path):
    result = cli("demo", "--criterion", "linf")
    assert result.code == ExitCode.DEGRADED and "--allow-degraded writes it anyway" in result.err
    assert "--suspect" in result.err
    result = cli("demo", "--criterion", "linf", "--allow-degraded", "--out", tmp_path / "o.onnx")
    assert result.code == 0 and (tmp_path / "o.onnx").exists()
    assert "written only because of --allow-degraded" in " ".join(result.out.split())


def test_triggered_images_all_of_the_target_class_are_refused(cli, tmp_path):
    from sanitizer.demo import DEMO

    with np.load(DEMO["clean"]) as z:
        x, y = z["X"], z["y"]
    np.savez(tmp_path / "t.npz", X=x[y == DEMO["target"]], y=y[y == DEMO["target"]])
    result = cli("evaluate", DEMO["model"], "--data", DEMO["clean"], "--triggered", tmp_path / "t.npz",
                 "--target", DEMO["target"], "--json")
    assert result.code == ExitCode.BAD_DATA and "needs triggered images of other classes" in result.err


def test_evaluation_refusal_rule():
    from sanitizer.pipeline import evaluation_refusal

    def ev(acc0, acc1, asr0=None, asr1=None, interval=None):
        return {"before": {"clean_acc": acc0, "n_clean": 500, "asr": asr0},
                "after": {"clean_acc": acc1, "n_clean": 500, "asr": asr1},
                **({"accuracy_drop": {"measured": acc0 - acc1, "interval80": interval}} if interval else {})}

    # over the budget only when the evidence says so: the whole interval past it
    assert evaluation_refusal(ev(0.90, 0.879, interval=[0.012, 0.030]), 0.02, False) is None
    why, act = evaluation_refusal(ev(0.90, 0.87, interval=[0.021, 0.039]), 0.02, False)
    assert "clean accuracy 0.9000 -> 0.8700 on 500 images" in why and "--allow-degraded" in act
    # without labelled clean images the model's own rate toward the target is unknown: refused over one half only
    assert evaluation_refusal(ev(None, None, 0.99, 0.30), 0.02, False) is None
    why, act = evaluation_refusal(ev(None, None, 0.99, 0.97), 0.02, True)
    assert why.startswith("detection found no backdoor") and "--suspect" in act


def test_the_asr_is_judged_against_the_results_own_rate_toward_the_target():
    from sanitizer.pipeline import asr_evidence, evaluation_refusal

    labels = np.repeat(np.arange(10), 50)
    pred = labels.copy()
    pred[np.flatnonzero(labels != 3)[:27]] = 3  # 27 of the 450 images of other classes go to class 3: 0.06
    ev = {"before": {"asr": 0.99, "clean_acc": None}, "after": {"asr": 0.15, "n_triggered": 400, "clean_acc": None}}
    evidence = asr_evidence(ev["after"], {"pred": pred, "labels": labels}, 3)
    # the bar grants the lower end of the natural rate's 80 % interval (27 of 450: 0.06, 0.0474..0.0758)
    assert evidence["natural_rate"] == 0.06 and 0.047 < evidence["natural_interval80"][0] < 0.048
    assert abs(evidence["bar"] - 0.05 - evidence["natural_interval80"][0]) < 1e-6
    lo, hi = evidence["interval80"]
    assert 0.12 < lo < 0.15 < hi < 0.18
    why, _ = evaluation_refusal({**ev, "asr_evidence": evidence}, 0.02, False)
    assert "reach the target on 0.150" in why and "0.060 of your --eval-data images of other classes" in why
    # an ASR the model's own pull toward the class explains, or one whose interval reaches the bar, ships
    ev["after"]["asr"] = 0.11
    assert evaluation_refusal({**ev, "asr_evidence": asr_evidence(ev["after"], {"pred": pred, "labels": labels}, 3)},
                              0.02, False) is None
    # 2 of 5 evaluation images of other classes sent to the target say little: the bar is not 0.45
    few = asr_evidence({"asr": 0.3, "n_triggered": 400}, {"pred": np.array([3, 3, 0, 1, 2]),
                                                           "labels": np.array([0, 1, 0, 1, 2])}, 3)
    assert few["natural_rate"] == 0.4 and few["bar"] < few["interval80"][0] < 0.3 < 0.05 + few["natural_rate"]
    assert evaluation_refusal({**ev, "after": {"asr": 0.3, "n_triggered": 400, "clean_acc": None},
                               "asr_evidence": few}, 0.02, False) is not None
    # triggered images without labels: their class mix is unknown, the same bar, and the refusal says why
    ev["after"]["asr"] = 0.15
    unlabelled = asr_evidence(ev["after"], {"pred": pred, "labels": labels, "triggered_labelled": False}, 3)
    assert unlabelled["natural_rate"] == 0.06 and unlabelled["triggered_labelled"] is False
    why, _ = evaluation_refusal({**ev, "asr_evidence": unlabelled}, 0.02, False)
    assert "they have no labels: any of the target class count as reaching it" in why
    # both broken: the accuracy refusal names the backdoor too
    both = {"after": {**ev["after"], "clean_acc": 0.8}, "before": {**ev["before"], "clean_acc": 0.9, "n_clean": 500},
            "accuracy_drop": {"measured": 0.1, "interval80": [0.08, 0.12]}, "asr_evidence": unlabelled}
    why, _ = evaluation_refusal(both, 0.02, False)
    assert "breaks the accuracy budget" in why and "still reach the target on 0.150" in why
    # no labelled clean images: the bar is one half
    assert asr_evidence(ev["after"], {}, 3)["natural_rate"] is None and asr_evidence(ev["after"], {}, 3)["bar"] == 0.5


def test_triggered_images_that_reach_the_target_beyond_its_natural_rate_refuse(cli, tmp_path):
    from sanitizer.demo import DEMO

    # half the user's triggered images carry the trigger, half are clean: linf leaves the backdoor, so about
    # 0.45 reach the target — under one half, far over what the model does with clean images of other classes
    with np.load(DEMO["triggered"]) as t, np.load(DEMO["clean"]) as c:
        keep = c["y"] != DEMO["target"]
        n = min(len(t["y"]), int(keep.sum()))
        x = np.concatenate([t["X"][: n // 2], c["X"][keep][n // 2: n]])
        y = np.concatenate([t["y"][: n // 2], c["y"][keep][n // 2: n]])
    np.savez(tmp_path / "mixed.npz", X=x, y=y)
    argv = [DEMO["model"], "--calib", DEMO["calib"], "--criterion", "linf", "--out", tmp_path / "o.onnx",
            "--eval-data", DEMO["clean"], "--eval-triggered", tmp_path / "mixed.npz", "--target", DEMO["target"]]
    result = cli(*argv)
    assert result.code == ExitCode.DEGRADED and "of your --eval-data images of other classes" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()
    result = cli(*argv, "--allow-degraded", "--report", tmp_path / "r.json")
    assert result.code == 0 and (tmp_path / "o.onnx").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    evaluation = report["evaluation"]
    assert 0.3 < evaluation["after"]["asr"] < 0.5, evaluation
    assert evaluation["asr_evidence"]["natural_rate"] < 0.05 and evaluation["asr_evidence"]["bar"] < 0.1
    assert report["degraded"] and "of your --eval-data images of other classes" in evaluation["refused"], evaluation


def test_eval_triggered_without_target_names_the_flag(cli, tmp_path):
    from sanitizer.demo import DEMO

    result = cli(DEMO["model"], "--calib", DEMO["calib"], "--criterion", "linf", "--out", tmp_path / "o.onnx",
                 "--eval-triggered", DEMO["triggered"])
    assert result.code == ExitCode.USAGE and "--eval-triggered needs --target" in result.err


def test_evaluation_images_on_another_pixel_scale_are_refused_before_any_work(cli, tmp_path):
    from sanitizer.demo import DEMO

    with np.load(DEMO["clean"]) as z:
        np.savez(tmp_path / "float01.npz", X=z["X"].astype(np.float32) / 255, y=z["y"])
    result = cli(DEMO["model"], "--calib", DEMO["calib"], "--criterion", "linf", "--out", tmp_path / "o.onnx",
                 "--eval-data", tmp_path / "float01.npz")
    assert result.code == ExitCode.BAD_DATA and "--eval-data" in result.err and "same scale" in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "o.onnx").exists()


def test_a_run_that_prunes_nothing_says_the_written_model_is_the_original(cli, write_model, tmp_path):
    # the sanity gate needs a model that works on its images (tests/models.py brightest_channel)
    x, y = M.channel_images(120)
    np.savez(tmp_path / "calib.npz", X=x, y=y)
    result = cli(write_model(M.brightest_channel), "--calib", tmp_path / "calib.npz", "--criterion", "linf",
                 "--ratio", "0", "--out", tmp_path / "o.onnx")
    shown = " ".join(result.out.split())
    assert result.code == 0 and "(linf): the model is unchanged" in shown, result.out
    assert "the original's weights, unchanged (nothing pruned)" in shown and "sanitized ONNX written" not in shown
    result = cli(write_model(M.brightest_channel), "--calib", tmp_path / "calib.npz", "--criterion", "linf",
                 "--ratio", "0.5", "--out", tmp_path / "o.onnx", "--force")
    assert result.code == 0 and "sanitized ONNX written" in result.out, result.out


def test_a_misspelt_command_is_named_not_read_as_a_model(cli, write_model, tmp_path, monkeypatch):
    result = cli("evalute", write_model(), "--data", tmp_path / "d.npz")
    assert_one_line_error(result, ExitCode.USAGE)
    assert "unknown command 'evalute' (did you mean 'evaluate'?)" in result.err
    # a model file named like a command is still the job's model
    monkeypatch.chdir(tmp_path)
    write_model(name="benchh")
    x, y = M.channel_images(60)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    result = cli("benchh", "--calib", "d.npz", "--criterion", "linf")
    assert "unknown command" not in result.err and "calibration images" in result.err, result.err
