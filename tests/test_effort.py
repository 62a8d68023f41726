"""Effort sizing (issue 13): the searches' images and steps cut to a time budget, and the runs that use it."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sanitizer.defense import effort as E
from sanitizer.defense.count import flips
from sanitizer.defense.defend import probe_work
from sanitizer.defense.detect import Leads
from sanitizer.defense.defend import work as defense_work
from sanitizer.defense.detect import MAX_CLASSES, MIN_MASK_CLASSES, SCAN_IMAGES, SCAN_STEPS, mask_classes, mask_work, scan_work
from sanitizer.defense.probes import N_IMAGES, STEPS
from sanitizer.defense.repair import BATCH, RUNS
from sanitizer.evaluate import Predictor
from calib.preprocess import input_spec


def test_full_effort_is_each_modules_constants():
    full = E.FULL
    assert (full.images(N_IMAGES), full.steps(STEPS)) == (N_IMAGES, STEPS)
    assert (full.images(SCAN_IMAGES), full.steps(SCAN_STEPS)) == (SCAN_IMAGES, SCAN_STEPS)
    assert [full.updates(n, BATCH) for n, _ in RUNS] == [(n, BATCH) for n, _ in RUNS]
    assert full.tests(250) == 250 and mask_classes(full) == MAX_CLASSES


def test_steps_are_cut_before_images_and_both_stop_at_their_floors():
    half = E.Effort(0.5)
    assert (half.steps(100), half.images(64), half.tests(250)) == (50, 64, 250), "steps first, images untouched"
    quarter = E.Effort(0.25)
    assert (quarter.steps(100), quarter.images(64), quarter.tests(250)) == (round(100 * E.MIN_STEP_SHARE), 64, 250)
    assert mask_classes(quarter) == MAX_CLASSES
    # past the steps' floor the images, the test images and the mask search's classes take the rest of the cut
    eighth = E.Effort(1 / 8)
    assert (eighth.steps(100), eighth.images(64), eighth.tests(250)) == (25, 32, 125)
    assert mask_classes(eighth) == max(MIN_MASK_CLASSES, MAX_CLASSES // 2)
    least = E.Effort(E.SHARES[-1])
    assert (least.steps(100), least.images(64)) == (25, E.MIN_IMAGES) and mask_classes(least) == MIN_MASK_CLASSES
    assert least.images(4) == 4, "never more images than the full effort uses"
    assert least.tests(1000) == E.MIN_TEST and least.tests(30) == 30


def test_a_repair_keeps_its_updates_and_sees_fewer_images_first():
    assert E.Effort(0.25).updates(300, 64) == (300, 16)
    # 1/16 of 64 images is 4: the floor keeps 8, so the steps take the other half of the cut
    assert E.Effort(1 / 16).updates(300, 64) == (150, E.MIN_IMAGES)
    assert E.Effort(E.SHARES[-1]).updates(300, 64) == (round(300 * E.MIN_STEP_SHARE), E.MIN_IMAGES)


def test_sized_takes_the_largest_share_within_the_budget():
    cost = E.PassCost(backward=1.0, forward=0.5)

    def work(effort):
        return effort.images(64) * effort.steps(100), effort.tests(1000)

    effort, record = E.sized(work, cost, budget=6400 + 500)
    assert effort.share == 1.0 and record["estimated_seconds"] == 6900
    # half the steps, every test image
    effort, record = E.sized(work, cost, budget=3200 + 500)
    assert effort.share == 0.5 and record["full_effort_seconds"] == 6900 and record["estimated_seconds"] == 3700
    effort, record = E.sized(work, cost, budget=3699)
    assert effort.share == 0.25 and record["estimated_seconds"] == 1600 + 500 and record["budget_seconds"] == 3699
    assert not record["over_budget"]
    # nothing fits: the least effort, and the report says what it will cost — judged before rounding, so that a
    # budget of 0.04 s is not met by an estimate of 0.045 s that the record shows as 0.0 against 0.0
    effort, record = E.sized(work, cost, budget=1.0)
    assert effort.share == E.SHARES[-1] and record["over_budget"]
    _, tiny = E.sized(work, E.PassCost(backward=1.7e-4, forward=1.7e-4), budget=0.04)
    assert tiny["estimated_seconds"] == tiny["budget_seconds"] == 0.0 and tiny["over_budget"]
    # work priced with numpy (defend.work's log2) still gives a record the JSON report and `bench --json` can write
    _, record = E.sized(lambda e: (np.float64(work(e)[0]), np.float64(work(e)[1])), cost, budget=1.0)
    assert record["over_budget"] is True and json.loads(json.dumps(record))["over_budget"] is True
    assert record["estimated_seconds"] == 8 * 25 + 0.5 * E.MIN_TEST
    # ... unless a larger share costs less: a search that tests the images it no longer optimises on
    effort, record = E.sized(lambda e: (e.images(64) * e.steps(100), 100 * (250 - e.images(64))), cost, budget=1.0)
    assert effort.share == 0.25 and record["estimated_seconds"] == 64 * 25 + 0.5 * 100 * (250 - 64)


def test_the_defense_is_priced_for_what_runs():
    full = defense_work(E.FULL, 250, 250, 2400)
    # suspicious samples replace the probes: nothing synthesized, no re-attack
    assert defense_work(E.FULL, 250, 250, 2400, suspects=60)[0] < full[0] / 2
    # confirming a mask-search target runs the probes step alone
    assert sum(probe_work(E.FULL, 250)) < sum(full) / 4


def test_the_work_estimates_fall_with_the_effort():
    for work in (lambda e: scan_work(e, 250), lambda e: scan_work(e, 250, 3), lambda e: mask_work(e, 250, 1000),
                 lambda e: defense_work(e, 250, 250, 2400, Leads(("warp",)))):
        passes = [sum(work(E.Effort(s))) for s in E.SHARES]
        # until every search is at its floors (where the mask search's fewer fit images leave a few more to test)
        assert all(b <= 1.01 * a for a, b in zip(passes, passes[1:])) and passes[0] > 4 * passes[-1], passes
    # detection's cost does not grow with the number of classes past the mask search's sample
    assert mask_work(E.FULL, 250, 1000) == mask_work(E.FULL, 250, 32) > mask_work(E.FULL, 250, 10)


def test_flips_on_a_prefix_of_the_held_out_images_match_a_brute_force_count():
    from models import plain, random_input

    model = plain(seed=1)   # a seed whose random weights do not send every image to one class
    spec = input_spec(model)
    clean = random_input(model, batch=40)["input"]
    probed = -4.0 * clean[:15]   # a reduced effort probes the first 15 held-out images only
    logits = Predictor(model, spec).logits
    base, moved = logits(clean, 8).argmax(1), logits(probed, 8).argmax(1)
    # the class the probe sends most of the first 15 to, among those not already there
    target = int(np.argmax([((moved == c) & (base[:15] != c)).sum() for c in range(logits(clean[:1]).shape[1])]))
    keep = base[:15] != target
    pred, (rate,) = flips(model, spec, clean, [probed], target, batch_size=8)
    assert (pred == base).all() and 0 < rate
    assert rate == pytest.approx(float((moved[keep] == target).mean()))


def _digits_run(tmp_path, *extra):
    pytest.importorskip("torch")
    from digits_backdoor import trained
    from sanitizer.cli import main

    model, calib, x_test, y_test = trained(poisoned=True)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", X=calib.astype(np.uint8))
    code = main([str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--out", str(tmp_path / "o.onnx"),
                 "--report", str(tmp_path / "r.json"), *extra])
    report = json.loads((tmp_path / "r.json").read_text()) if (tmp_path / "r.json").exists() else None
    return code, report, (x_test, y_test)


def test_a_budget_too_small_for_the_full_effort_cuts_every_search(tmp_path, capsys):
    pytest.importorskip("torch")
    from digits_backdoor import TARGET, _stamp, trained

    _, _, x_test, y_test = trained(poisoned=True)
    np.savez(tmp_path / "suspects.npz", X=_stamp(x_test[y_test != TARGET][:60]).astype(np.uint8))
    # 60 microseconds are spent before the defense starts: nothing fits, the least effort runs
    code, report, _ = _digits_run(tmp_path, "--suspect", str(tmp_path / "suspects.npz"), "--time-budget", "1e-6",
                                  "--max-acc-drop", "0.06", "--allow-degraded")
    assert code == 0
    printed = " ".join(capsys.readouterr().out.split())   # the console wraps long lines
    assert "reduced effort for --time-budget 1e-06 min: defense at 1/64 (full effort: about" in printed
    assert "still over its 0 s" in printed, "the least effort did not fit either, and the line says so"
    sized = report["effort"]["defense"]
    assert sized["share"] == E.SHARES[-1] and sized["estimated_seconds"] < sized["full_effort_seconds"]
    least = E.Effort(E.SHARES[-1])
    names = [c["name"] for c in report["probes"]["candidates"]]
    assert names[1:] == [f"pruned+repaired ({least.updates(n, BATCH)[0]} steps at {lr:g})" for n, lr in RUNS], names


def test_time_budget_zero_is_full_effort_and_a_negative_one_is_refused(tmp_path, capsys):
    for bad in ("-1", "inf", "nan", "1e307"):   # inf would write Infinity into the JSON report; 1e307 min is inf s
        code, report, _ = _digits_run(tmp_path, "--criterion", "linf", "--detect", "--time-budget", bad)
        assert code == 2 and report is None
        assert "--time-budget is minutes" in capsys.readouterr().err
    code, report, _ = _digits_run(tmp_path, "--time-budget", "0", "--max-acc-drop", "0.06")
    assert code == 0 and "effort" not in report
    code, report, _ = _digits_run(tmp_path, "--max-acc-drop", "0.06", "--force")
    assert code == 0 and report["effort"]["budget_seconds"] == E.DEFAULT_BUDGET
    assert report["effort"]["patch scan"]["share"] == 1.0, "8x8 digits fit the default budget at full effort"
    assert "reduced effort" not in capsys.readouterr().out


def test_a_refusal_after_a_reduced_effort_names_it_and_the_html_page_shows_it(tmp_path, capsys):
    pytest.importorskip("torch")
    from sanitizer.cli import main
    from sanitizer.demo import DEMO

    args = [str(DEMO["model"]), "--calib", str(DEMO["calib"]), "--eval-data", str(DEMO["clean"]),
            "--eval-triggered", str(DEMO["triggered"]), "--target", str(DEMO["target"]), "--time-budget", "1e-6",
            "--out", str(tmp_path / "o.onnx")]
    # every search at its floors (5-step patches): the demo's backdoor is not removed and the result is refused
    # (by the re-attack or the triggered images) — the refusal must say that the searches were cut, and how to
    # run them in full
    assert main(args) == 7
    err = " ".join(capsys.readouterr().err.split())
    assert "leaves the backdoor in place" in err or "still reach the target" in err
    assert "reduced effort for --time-budget 1e-06 min: patch scan at 1/64" in err and "defense at 1/64" in err
    # the second patch side is a second try: over its part of the budget even at its least, it gives way
    assert "larger patch scan skipped (about" in err
    assert "(--time-budget 0: full effort)" in err and not (tmp_path / "o.onnx").exists()
    assert main(args + ["--allow-degraded", "--report-html", str(tmp_path / "r.html")]) == 0
    page = " ".join((tmp_path / "r.html").read_text().split())
    assert "reduced effort for --time-budget 1e-06 min: patch scan at 1/64" in page


def test_a_skipped_stage_is_named_as_skipped_not_as_a_share():
    over = {"share": E.SHARES[-1], "estimated_seconds": 300.0, "full_effort_seconds": 9000.0, "budget_seconds": 200.0,
            "over_budget": True}
    record = {"patch scan": dict(over), "larger patch scan": {**over, "skipped": True}, "family scan": {
        **over, "share": 1.0, "estimated_seconds": 1.0, "over_budget": False}, "budget_seconds": 900}
    assert E.cut_stages(record) == {"patch scan": "1/64", "larger patch scan": "skipped"}
    # a skipped stage is named whatever share its least effort had
    assert E.cut_stages({"x": {**over, "share": 1.0, "skipped": True}}) == {"x": "skipped"}
    line = E.summary(record)
    assert "patch scan at 1/64 (full effort: about 150 min here, still over its 3 min)" in line
    assert "larger patch scan skipped (about 5 min here at its least, over its 3 min)" in line
    assert "family scan" not in line
