"""`sanitize bench` on a suite built here from the digits CNN, and the goal each row is judged against."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sanitizer.bench import goal
from sanitizer.cli import main
from sanitizer.errors import ExitCode


def _row(**kw):
    return {"backdoored": True, "acc_before": 0.9, "acc_after": 0.89, "asr_before": 1.0, "asr_after": 0.04,
            "degraded": False, "max_acc_drop": 0.02, **kw}


def test_goal_names_every_reason_a_case_misses():
    assert goal(_row()) == "met"
    assert goal(_row(asr_after=0.06, acc_after=0.87, degraded=True)) == \
        "not met: ASR 0.060, accuracy −3.0 pt, refused (exit 7)"
    # a clean model may lose half a point, not two
    assert goal(_row(backdoored=False, asr_after=None, acc_after=0.896)) == "met"
    assert goal(_row(backdoored=False, asr_after=None, acc_after=0.89)) == "not met: clean model accuracy −1.0 pt"
    # a case whose triggered images do not reach its target on the original (a wrong target in case.toml) measures
    # nothing: not "met" on an ASR of 0 after
    assert goal(_row(asr_before=0.0, asr_after=0.0)) == \
        "not met: ASR before only 0.000: the case's target or triggered set is wrong"


def test_bench_writes_a_row_per_case_and_criterion(tmp_path, capsys):
    pytest.importorskip("torch")
    from digits_backdoor import TARGET, _stamp, trained

    model, calib, x_test, y_test = trained(poisoned=True)
    case = tmp_path / "suite" / "digits_t0"
    case.mkdir(parents=True)
    (tmp_path / "suite" / "suite.toml").write_text('cases = ["digits_t0"]\n')
    (case / "case.toml").write_text(f'backdoored = true\ntarget = {TARGET}\n'
                                    'preprocess = { scale = 0.00392156862745098, mean = [0.0], std = [1.0], layout = "nchw" }\n')
    onnx.save(model, case / "model.onnx")
    np.savez(case / "calib.npz", X=calib.astype(np.uint8))
    np.savez(case / "clean.npz", X=x_test.astype(np.uint8), y=y_test)
    keep = y_test != TARGET
    np.savez(case / "triggered.npz", X=_stamp(x_test[keep]).astype(np.uint8), y=y_test[keep])
    code = main(["bench", str(tmp_path / "suite"), "--criteria", "linf", "--json", str(tmp_path / "rows.json")])
    assert code == 0
    # captured, not a terminal: the table keeps its columns readable instead of cutting them at 80 characters
    assert "seconds per step" in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert row["case"] == "digits_t0" and row["criterion"] == "linf" and row["asr_before"] > 0.9
    # clean-data ℓ∞ pruning leaves this backdoor in place, and the row says so
    assert row["goal"].startswith("not met: ASR") and row["goal"] == goal(row)
    assert {"drop_estimate", "drop_interval90"} <= set(row["held_out"])
    # and the evaluation's evidence: why the run was refused, the drop's interval, the ASR's bar
    assert row["degraded"] and "on your --eval-data" in row["evaluation"]["refused"]
    assert row["evaluation"]["asr_evidence"]["bar"] < 0.5
    assert {"measured", "interval80"} <= set(row["evaluation"]["accuracy_drop"])


def test_bench_refuses_a_flag_mistake_before_any_case_runs_and_never_writes_over_the_suite(tmp_path, capsys):
    case = tmp_path / "suite" / "a"
    case.mkdir(parents=True)
    (tmp_path / "suite" / "suite.toml").write_text('cases = ["a"]\n')
    (case / "case.toml").write_text('backdoored = false\ntarget = 0\n')
    (case / "model.onnx").write_bytes(b"kept")   # never read: every refusal comes first
    for flags, says in ((["--criteria", "linf,lnif"], "unknown lnif"), (["--criteria", ","], "none given"),
                        (["--cases", "b"], "no case b"), (["--json", str(case / "model.onnx")], "inside")):
        assert main(["bench", str(tmp_path / "suite"), *flags]) in (ExitCode.USAGE, ExitCode.OUTPUT)
        assert says in capsys.readouterr().err
    assert (case / "model.onnx").read_bytes() == b"kept"


@pytest.mark.parametrize("suite_toml, case_toml, says", [
    ('cases = "c"\n', "target = 0\n", "cases must be a list"),
    ('cases = ["c"]\n', 'attack = "none"\nbackdoored = false\n', "no target"),
    ('cases = ["c"]\n', 'target = "zero"\n', "target must be a class index"),
    ('cases = ["c"]\n', "target = -1\n", "target must be a class index"),
    ('cases = ["c"]\n', 'target = 0\nbackdoored = "yes"\n', "backdoored must be true or false"),
    ('cases = ["c"]\n', 'target = 0\npreprocess = { mean = "0.5" }\n', "preprocess.mean must be"),
    ('cases = ["c"]\n', 'target = 0\npreprocess = { scale = [1.0] }\n', "preprocess.scale must be a number"),
    ('cases = ["c"]\n', 'target = 0\npreprocess = { layout = "chw" }\n', "preprocess.layout must be"),
    ('cases = ["c"]\n', "target = 0\npreprocess = 1\n", "preprocess must be a table"),
    ('cases = ["c"]\n', "target = \n", "cannot read the case"),
])
def test_a_suite_written_wrong_is_bad_data_naming_the_field(tmp_path, capsys, suite_toml, case_toml, says):
    (tmp_path / "c").mkdir()
    (tmp_path / "suite.toml").write_text(suite_toml)
    (tmp_path / "c" / "case.toml").write_text(case_toml)
    code = main(["bench", str(tmp_path), "--criteria", "linf"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 5 and len(err) == 1 and says in err[0], err


def test_a_scalar_mean_and_std_are_one_value_for_every_channel(tmp_path):
    from sanitizer.bench import case_options, load_suite

    (tmp_path / "c").mkdir()
    (tmp_path / "suite.toml").write_text('cases = ["c"]\n')
    (tmp_path / "c" / "case.toml").write_text("target = 2\npreprocess = { scale = 1, mean = 0.5, std = 0.25 }\n")
    opts = case_options(load_suite(tmp_path)[0], "linf")
    assert (opts.scale, list(opts.mean), list(opts.std), opts.target, opts.layout) == (1.0, [0.5], [0.25], 2, None)
