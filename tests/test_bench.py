"""`sanitize bench` on a suite built here from the digits CNN, and the goal each row is judged against."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sanitizer.bench import goal
from sanitizer.cli import main


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


def test_bench_writes_a_row_per_case_and_criterion(tmp_path):
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
    (row,) = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert row["case"] == "digits_t0" and row["criterion"] == "linf" and row["asr_before"] > 0.9
    # clean-data ℓ∞ pruning leaves this backdoor in place, and the row says so
    assert row["goal"].startswith("not met: ASR") and row["goal"] == goal(row)
    assert {"drop_estimate", "drop_interval90"} <= set(row["held_out"])
    # and the evaluation's evidence: why the run was refused, the drop's interval, the ASR's bar
    assert row["degraded"] and "on your --eval-data" in row["evaluation"]["refused"]
    assert row["evaluation"]["asr_evidence"]["bar"] < 0.5
    assert {"measured", "interval80"} <= set(row["evaluation"]["accuracy_drop"])
