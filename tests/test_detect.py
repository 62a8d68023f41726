"""Detection on tiny CNNs trained here (8x8 digits): backdoored (2x2 white corner patch -> class 0) and clean."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

import sanitizer.defense.detect as detection  # noqa: E402
from sanitizer.defense.detect import SCAN_FLIP, mask_search, scan, searched_classes  # noqa: E402
from digits_backdoor import PP, TARGET, acc_asr, trained  # noqa: E402


@pytest.fixture(scope="module")
def backdoored():
    return trained(poisoned=True)


@pytest.fixture(scope="module")
def clean():
    return trained(poisoned=False)


def test_mask_search_finds_the_target_of_a_backdoored_model(backdoored):
    model, calib, x_test, y_test = backdoored
    acc0, asr0 = acc_asr(model, x_test, y_test)
    assert acc0 > 0.9 and asr0 > 0.9, "the fixture model should carry a working backdoor"

    found = mask_search(model, calib, PP, seed=0)
    assert found.suspected_target == TARGET
    assert found.anomaly[TARGET] > 2 and found.flip_rate > 0.5
    stamped = found.trigger.stamp(calib[:4])
    assert stamped.shape == calib[:4].shape and stamped.dtype == np.float32



def test_mask_search_finds_no_backdoor_in_a_clean_model(clean):
    model, calib, x_test, y_test = clean
    acc0, asr0 = acc_asr(model, x_test, y_test)
    assert acc0 > 0.9 and asr0 < 0.3, "the clean fixture must not react to the patch"
    found = mask_search(model, calib, PP, seed=0)
    assert found.suspected_target is None, found.anomaly


def test_mask_search_is_deterministic(backdoored):
    model, calib, _, _ = backdoored
    a = mask_search(model, calib, PP, seed=3, first_steps=20, refine_steps=10)
    b = mask_search(model, calib, PP, seed=3, first_steps=20, refine_steps=10)
    np.testing.assert_array_equal(a.mask_norms, b.mask_norms)
    np.testing.assert_array_equal(a.trigger.mask, b.trigger.mask)


def test_detect_with_a_clean_verdict_prunes_nothing(clean, tmp_path, capsys):
    from sanitizer.cli import main

    model, calib, _, _ = clean
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", X=calib.astype(np.uint8))
    code = main([str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--detect",
                 "--out", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")])
    assert code == 0
    summary = capsys.readouterr().out
    assert "unchanged)" in summary and "0 of 0" not in summary
    # the verdict says what was searched: other trigger kinds are not ruled out
    assert "input-aware" in " ".join(summary.split()) and "--suspect" in summary
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["detection"]["verdict"] == "no backdoor found"
    # no patch probe reached the bar, so the mask search ran too; both leave a score per class
    assert report["plan"]["count"] == 0 and report["detection"]["found_by"] is None
    assert len(report["detection"]["patch_scan"]["best_flip"]) == 10
    assert len(report["detection"]["neural_cleanse"]["anomaly_index"]) == 10
    # each search was sized as it came (all at full effort on 8x8 digits); no defense ran, none was sized
    assert {k: v["share"] for k, v in report["effort"].items() if k != "budget_seconds"} == {
        "patch scan": 1.0, "family scan": 1.0, "mask search": 1.0}


def test_scan_names_the_patch_target_and_passes_the_clean_twin(backdoored, clean):
    found = scan(backdoored[0], backdoored[1], PP, seed=0)
    assert found.suspected_target == TARGET and found.best_flip[TARGET] >= SCAN_FLIP
    others = np.delete(found.best_flip, TARGET)
    assert others.max() < 0.5, found.best_flip
    clean_scan = scan(clean[0], clean[1], PP, seed=0)
    assert clean_scan.suspected_target is None and clean_scan.best_flip.max() < 0.5, clean_scan.best_flip


def _sanitize(model, calib, tmp_path, *flags) -> dict:
    """The job on `model` with `calib` as unlabelled calibration images and `flags`, which must exit 0: its report."""
    from sanitizer.cli import main

    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", X=calib.astype(np.uint8))
    code = main([str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--report", str(tmp_path / "r.json"),
                 *flags])
    assert code == 0
    return json.loads((tmp_path / "r.json").read_text())


def _detect(model, calib, tmp_path):
    return _sanitize(model, calib, tmp_path, "--detect", "--criterion", "linf", "--allow-degraded")["detection"]


def test_a_patch_found_by_the_scan_skips_the_mask_search(backdoored, tmp_path):
    found = _detect(backdoored[0], backdoored[1], tmp_path)
    assert found["suspected_target"] == TARGET and found["found_by"] == "patch scan"
    assert "neural_cleanse" not in found


def test_the_mask_search_decides_when_no_patch_reaches_the_bar(backdoored, tmp_path, monkeypatch):
    # a bar no flip rate can reach stands in for a trigger the patch probes cannot imitate
    monkeypatch.setattr(detection, "SCAN_FLIP", 1.01)
    found = _detect(backdoored[0], backdoored[1], tmp_path)
    assert found["patch_scan"]["threshold"] == 1.01
    assert found["suspected_target"] == TARGET and found["found_by"] == "mask anomaly"
    assert max(found["neural_cleanse"]["anomaly_index"]) > 2


def test_the_scan_probes_only_the_candidates_the_any_class_patches_name(backdoored):
    # a patch toward whichever class it can reach lands on the target: one candidate is enough to find it
    found = scan(backdoored[0], backdoored[1], PP, seed=0, n_candidates=1)
    assert found.candidates == [TARGET] and found.suspected_target == TARGET
    assert found.best_flip.shape == (10,) and found.best_flip[TARGET] >= SCAN_FLIP


def test_the_mask_search_runs_on_at_most_max_classes(backdoored):
    model, calib, _, _ = backdoored
    found = mask_search(model, calib, PP, seed=0, first_steps=20, refine_steps=10, candidates=[TARGET], max_classes=4)
    searched = np.flatnonzero(~np.isnan(found.anomaly))
    assert len(searched) == 4 and TARGET in searched
    np.testing.assert_array_equal(np.isnan(found.mask_norms), np.isnan(found.anomaly))


def test_searched_classes_keep_the_candidates_and_sample_the_rest_by_seed():
    assert searched_classes(10, [3], seed=0, limit=32) == list(range(10))
    chosen = searched_classes(1000, [7, 999, 7], seed=0, limit=32)
    assert len(chosen) == 32 == len(set(chosen)) and {7, 999} <= set(chosen)
    assert chosen == searched_classes(1000, [7, 999], seed=0, limit=32) != searched_classes(1000, [7, 999], seed=1,
                                                                                           limit=32)


@pytest.fixture
def signal_probe_at_training_amplitude(monkeypatch):
    # the 8x8 fixture learns its signal at 40 of 255 (BackdoorBench's SIG amplitude) and answers a probe only
    # at about that amplitude, which the probe's tanh reaches in a sine's place only by squaring it: 0.48 of
    # images at the default 0.12 of range, 0.87 at 0.16, 0.98 at 0.2 (0.06 and 0.27 toward any class on the clean
    # and patch fixtures); the default size is measured on CIFAR-10 models (README)
    import sanitizer.defense.probes as probes

    monkeypatch.setattr(probes, "SIGNAL_EPS", 0.2)


def test_the_family_scan_names_a_signal_target_the_patches_miss(clean, backdoored, signal_probe_at_training_amplitude):
    from digits_backdoor import trained_signal
    from sanitizer.defense.detect import family_scan

    model, calib, x_test, y_test = trained_signal()
    assert scan(model, calib, PP, seed=0).suspected_target is None, "no patch expresses a signal trigger"
    found = family_scan(model, calib, PP, seed=0)
    assert found.suspected_target == TARGET and found.family == "signal along columns", found.best_flip
    assert np.delete(found.best_flip["signal along columns"], TARGET).max() < 0.5
    # the patch model and the clean twin admit no signal or warp toward any class on most images
    for other in (clean, backdoored):
        miss = family_scan(other[0], other[1], PP, seed=0)
        assert miss.suspected_target is None and max(v.max() for v in miss.best_flip.values()) < 0.5, miss.best_flip


def test_a_signal_target_is_found_before_the_mask_search_and_reported(tmp_path, signal_probe_at_training_amplitude):
    from digits_backdoor import trained_signal

    found = _detect(*trained_signal()[:2], tmp_path)
    assert found["suspected_target"] == TARGET and found["found_by"] == "family scan: signal along columns"
    assert found["family"] == "signal along columns" and "neural_cleanse" not in found
    assert set(found["family_scan"]["best_flip"]) == {"signal along columns", "signal along rows", "warp"}


def test_the_defense_adds_every_family_that_reaches_the_found_target_on_half_the_images():
    from sanitizer.defense.detect import families_for

    rates = {"signal along columns": [0.1, 0.2], "signal along rows": [0.6, 0.1], "warp": [0.88, 0.0]}
    # a warp at 0.88 (under the scan's bar) toward the target the mask search found is the backdoor's shortcut
    found = {"suspected_target": 0, "family": None, "family_scan": {"best_flip": rates}}
    assert families_for(found) == ("signal along rows", "warp")
    assert families_for({**found, "suspected_target": 1}) == ()
    assert families_for({**found, "suspected_target": 1, "family": "signal along columns"}) == ("signal along columns",)
    assert families_for({"suspected_target": None}) == () and families_for(None) == ()
    # a patch-found target: the family scan never ran
    assert families_for({"suspected_target": 3, "patch_scan": {}}) == ()


def test_a_warp_needs_half_the_images_a_signal_the_patch_bar():
    from sanitizer.defense.detect import FAMILY_FLIP, family_verdict

    quiet = np.array([0.1, 0.2, 0.05])
    assert family_verdict({"signal along columns": quiet, "signal along rows": quiet, "warp": quiet}) == (None, None)
    # a signal at 0.7 toward a class is what clean models admit; a warp at 0.6 is not
    signal = np.array([0.1, 0.7, np.nan])
    assert family_verdict({"signal along columns": signal, "warp": quiet}) == (None, None)
    assert family_verdict({"signal along columns": signal, "warp": np.array([0.1, 0.0, 0.6])}) == (2, "warp")
    # over both bars, the family that reaches the most
    both = {"signal along columns": np.array([0.95, 0.1, 0.1]), "warp": np.array([0.1, 0.0, 0.6])}
    assert family_verdict(both) == (0, "signal along columns")
    assert FAMILY_FLIP["warp"] < SCAN_FLIP == FAMILY_FLIP["signal along rows"]


def test_the_evidence_line_gives_each_family_its_own_bar():
    from sanitizer.defense.detect import FAMILY_FLIP, evidence

    rates = {"signal along columns": [0.1, 0.3], "signal along rows": [0.2, None], "warp": [0.88, 0.05]}
    line = evidence({"patch_scan": {"best_flip": [0.3, 0.5], "threshold": SCAN_FLIP},
                     "family_scan": {"best_flip": rates, "threshold": FAMILY_FLIP}})
    assert "best patch probe sends 0.50 of images to class 1, threshold 0.9" in line
    assert "best warp probe 0.88 to class 0, threshold 0.5" in line
    assert "best signal along rows probe 0.20 to class 0, threshold 0.9" in line
    line = evidence({"patch_scan": {"best_flip": [0.3, 0.5], "threshold": SCAN_FLIP},
                     "not_confirmed": {"class": 3, "by": "mask anomaly", "best_probe": "blend",
                                       "best_probe_flip": 0.21}})
    assert "class 3 (mask anomaly) not confirmed: the best probe toward it, blend, reaches 0.21" in line


@pytest.fixture(scope="module")
def wide():
    from digits_backdoor import trained_wide

    return trained_wide(poisoned=True)


def test_a_trigger_wider_than_the_first_patch_side_is_found_at_a_wider_one(wide):
    from digits_backdoor import trained_wide, wide_stamp
    from sanitizer.defense.detect import SCAN_SIDES

    model, calib, x_test, y_test = wide
    acc0, asr0 = acc_asr(model, x_test, y_test, wide_stamp)
    assert acc0 > 0.9 and asr0 > 0.9, "the 16x16 fixture should carry a working backdoor"
    # a 2x2 probe does not approach the 3x3 square: the smallest side alone would call this model clean
    small = scan(model, calib, PP, seed=0, shares=SCAN_SIDES[:1])
    assert small.suspected_target is None and list(small.by_side) == [2], small.best_flip
    found = scan(model, calib, PP, seed=0, before=small)
    assert found.suspected_target == TARGET and found.found_at == (3, SCAN_SIDES[1]), found.by_side
    assert list(found.by_side) == [2, 3] and found.candidates[:len(small.candidates)] == small.candidates
    assert scan(model, calib, PP, seed=0, before=found) is found, "a scan that found its target is not redone"
    assert np.delete(found.best_flip, TARGET).max() < 0.5, found.best_flip
    # the clean twin: no side finds a target, each was tried
    twin = scan(*trained_wide(poisoned=False)[:2], PP, seed=0)
    assert twin.suspected_target is None and list(twin.by_side) == [2, 3] and twin.found_at is None
    assert twin.best_flip.max() < 0.5, twin.by_side


def test_detection_reports_the_side_that_found_the_target(wide, tmp_path):
    found = _detect(wide[0], wide[1], tmp_path)
    assert found["found_by"] == "patch scan" and found["suspected_target"] == TARGET
    scan_report = found["patch_scan"]
    assert (scan_report["found_at_side"], scan_report["found_at_share"]) == (3, 0.2)
    assert list(scan_report["by_side"]) == ["2", "3"] and scan_report["by_side"]["3"][TARGET] >= SCAN_FLIP
    # a target of the larger side is checked against the family scan, which names none here
    assert "neural_cleanse" not in found and "overruled" not in found
    assert max(max(r) for r in found["family_scan"]["best_flip"].values()) < 0.5


def test_of_two_scans_naming_different_targets_the_one_further_past_its_bar_stands():
    from sanitizer.defense.detect import FAMILY_FLIP, Finding, evidence, stronger

    patch = Finding(4, "patch scan", 1.0, SCAN_FLIP)
    warp = Finding(1, "family scan: warp", 0.52, FAMILY_FLIP["warp"])
    # a 3x3 patch sending every image to class 4 against a warp just over its half-the-images bar
    assert stronger(patch, warp) == (patch, warp) and stronger(warp, patch) == (patch, warp)
    # a universal 20 % patch just over the bar against a signal that reaches nearly every image
    signal = Finding(2, "family scan: signal along columns", 0.98, SCAN_FLIP)
    assert stronger(Finding(7, "patch scan", 0.91, SCAN_FLIP), signal)[0] is signal
    assert signal.to_dict() == {"class": 2, "by": "family scan: signal along columns", "flip": 0.98,
                                "threshold": SCAN_FLIP, "past_threshold": 0.8}
    line = evidence({"patch_scan": {"best_flip": [0.3, 0.95], "threshold": SCAN_FLIP, "by_side": {"2": [], "3": []}},
                     "overruled": Finding(0, "family scan: warp", 0.52, 0.5).to_dict()})
    assert "class 0 (family scan: warp, 0.52 against 0.5) overruled" in line
    assert "best patch probe sends 0.95 of images to class 1, threshold 0.9 (2x2, 3x3 tried)" in line



@pytest.mark.parametrize("warp_flip", [1.0, 0.52])
def test_a_family_target_overrules_a_larger_patch_only_when_further_past_its_bar(wide, tmp_path, monkeypatch,
                                                                               warp_flip):
    from sanitizer.defense.detect import FamilyScan
    from sanitizer.defense.probes import FAMILIES

    def family_scan(*args, **kwargs):
        # a warp toward class 5: every image (past its bar by all the way), or just over its half
        rates = {f: np.zeros(10) for f in FAMILIES}
        rates["warp"][5] = warp_flip
        return FamilyScan(rates, 5, "warp", {f: [5] for f in FAMILIES})

    monkeypatch.setattr(detection, "family_scan", family_scan)
    found = _detect(wide[0], wide[1], tmp_path)
    patch_flip = found["patch_scan"]["best_flip"][TARGET]
    assert found["patch_scan"]["found_at_side"] == 3 and SCAN_FLIP <= patch_flip < 1.0
    if warp_flip == 1.0:
        assert (found["suspected_target"], found["found_by"], found["family"]) == (5, "family scan: warp", "warp")
        overruled = found["overruled"]
        assert {k: overruled[k] for k in ("class", "by", "flip", "threshold")} == {
            "class": TARGET, "by": "patch scan", "flip": patch_flip, "threshold": SCAN_FLIP}
        assert overruled["past_threshold"] == pytest.approx((patch_flip - SCAN_FLIP) / (1 - SCAN_FLIP), abs=2e-3)
    else:
        assert (found["suspected_target"], found["found_by"], "family" in found) == (TARGET, "patch scan", False)
        assert found["overruled"]["class"] == 5 and found["overruled"]["by"] == "family scan: warp"


def test_trigger_places_hold_the_most_mask_of_any_window():
    from sanitizer.defense.detect import trigger_places

    rng = np.random.default_rng(0)
    for h, w in ((8, 8), (16, 12), (5, 9)):
        mask = rng.random((h, w, 1)).astype(np.float32)
        for s, r, c in trigger_places(mask, [2, 3]):
            windows = [mask[i:i + s, j:j + s].sum() for i in range(h - s + 1) for j in range(w - s + 1)]
            assert np.isclose(mask[r:r + s, c:c + s].sum(), max(windows)), (h, w, s)
    flat = np.zeros((6, 6, 1), np.float32)
    assert trigger_places(flat, [2]) == [(2, 0, 0)], "on a tie the first window"


def test_the_probes_add_the_masks_places_of_their_side_once():
    from sanitizer.defense.probes import _locations

    places = [(3, 7, 0), (2, 5, 5), (3, 0, 0)]   # the last is a corner already
    assert _locations(16, 16, 3, places) == [(0, 0), (0, 13), (13, 0), (13, 13), (6, 6), (7, 0)]
    assert _locations(16, 16, 2, places)[-1] == (5, 5)


def test_the_defense_probes_where_the_mask_toward_the_found_target_sits():
    from sanitizer.defense.detect import places_for

    det = {"suspected_target": 4,
           "neural_cleanse": {"trigger_places": {"4": [[2, 7, 1], [3, 7, 0]], "5": [[2, 0, 0], [3, 0, 0]]}}}
    assert places_for(det) == ((2, 7, 1), (3, 7, 0))
    assert places_for({**det, "suspected_target": 6}) == () and places_for({**det, "suspected_target": None}) == ()
    assert places_for({"suspected_target": 4, "patch_scan": {}}) == () and places_for(None) == ()


def test_a_second_class_over_a_bar_is_a_second_target_unless_overruled():
    from sanitizer.defense.detect import other_targets
    from sanitizer.pipeline import unfinished

    found = {"suspected_target": 1, "found_by": "patch scan",
             "patch_scan": {"by_side": {"2": [0.0, 1.0, 0.1, 0.0], "3": [0.0, 1.0, 0.2, 0.92]}},
             "family_scan": {"best_flip": {"warp": [0.6, 0.0, 0.0, 0.0], "signal along rows": [0.0, 0.0, 0.8, 0.0]}},
             "mask_place_scan": {"best_flip": {"2": 0.95}}}
    assert other_targets(found) == [0, 2, 3]   # a warp at half the images; the signal's 0.8 is under its 0.9
    assert other_targets({**found, "overruled": {"class": 3}}) == [0, 2]
    assert other_targets({**found, "suspected_target": None}) == []
    why, act = unfinished(found, "probe", clean_verdict=False)
    assert "more than one class (1; 0, 2, 3)" in why and "--allow-degraded" in act
    alone = {"suspected_target": 1, "found_by": "patch scan", "patch_scan": {"by_side": {"2": [0.0, 1.0]}}}
    assert unfinished(alone, "probe", clean_verdict=False) is None
    assert "does not remove" in unfinished(alone, "linf", clean_verdict=False)[0]
    assert unfinished(alone, "linf", clean_verdict=True) is None


def test_a_clean_data_criterion_does_not_ship_a_backdoor_detection_found(backdoored, tmp_path, capsys):
    from sanitizer.cli import main

    model, calib, _, _ = backdoored
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", X=calib.astype(np.uint8))
    args = [str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--detect", "--criterion", "linf",
            "--out", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")]
    assert main(args) == 7 and not (tmp_path / "o.onnx").exists()
    assert "toward class 0" in capsys.readouterr().err
    assert main(args + ["--allow-degraded"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["degraded"] and "does not remove" in report["refused"]
    assert "does not remove" in " ".join(capsys.readouterr().out.split())


@pytest.fixture(scope="module")
def colour():
    from digits_backdoor import trained_colour

    return trained_colour(poisoned=True)


def test_a_colour_trigger_a_grey_start_stops_short_of_is_found_from_its_lead(colour, monkeypatch):
    from digits_backdoor import PP_RGB, magenta_stamp, trained_colour
    from sanitizer.defense.count import USE_FLIP

    model, calib, x_test, y_test = colour
    acc, asr = acc_asr(model, x_test, y_test, magenta_stamp)
    assert acc > 0.95 and asr > 0.95, (acc, asr)
    found = scan(model, calib, PP_RGB, seed=0)
    assert found.suspected_target == TARGET and found.colour[3][TARGET] >= SCAN_FLIP, (found.by_side, found.colour)
    # the grey start alone (no lead tried again) leaves the trigger's class a lead under the bar
    monkeypatch.setattr(detection, "USE_FLIP", 1.01)
    grey = scan(model, calib, PP_RGB, seed=0)
    assert grey.suspected_target is None and not grey.colour
    assert USE_FLIP <= grey.best_flip[TARGET] < SCAN_FLIP, grey.by_side
    monkeypatch.undo()
    # the clean twin has no lead to try again, and no target
    clean_model, clean_calib = trained_colour(poisoned=False)[:2]
    twin = scan(clean_model, clean_calib, PP_RGB, seed=0)
    assert twin.suspected_target is None and twin.best_flip.max() < USE_FLIP and not twin.colour, twin.by_side
    # nor does a colour start make one where it is tried: every candidate's best patch a lead
    monkeypatch.setattr(detection, "USE_FLIP", 0.0)
    tried = scan(clean_model, clean_calib, PP_RGB, seed=0)
    assert tried.suspected_target is None and len(tried.colour[3]) == 5, tried.colour
    assert max(tried.colour[3].values()) < 0.5, tried.colour


def test_a_colour_start_is_the_corner_colour_with_the_lowest_loss(colour):
    from digits_backdoor import PP_RGB
    from sanitizer.defense.probes import LARGE_PATCH_SIDE, _Optimiser, probe_name, synthesize

    model, calib, _, _ = colour
    opt = _Optimiser(model, calib[:32], PP_RGB, 255.0)
    corner = {probe_name("patch", 3, (13, 13))}
    # no optimiser step: the probe is its start, a corner of the RGB cube a little inside it
    start = opt.patches(TARGET, 0, share=LARGE_PATCH_SIDE, only=corner, colour_start=True)[0].delta.reshape(-1, 3)
    assert np.allclose(start, [0.95 * 255, 0.05 * 255, 0.95 * 255], atol=0.01), start[0]
    grey = opt.patches(TARGET, 0, share=LARGE_PATCH_SIDE, only=corner)[0]
    assert np.allclose(grey.delta, 127.5)
    # the defense's and the re-attack's probes (synthesize) start there when detection's leads say colour
    for colour_lead, expected in ((True, start[0]), (False, [127.5] * 3)):
        probe, = synthesize(model, calib, PP_RGB, TARGET, steps=0, only=corner, colour=colour_lead)
        assert np.allclose(probe.delta.reshape(-1, 3), expected, atol=0.01), probe.delta[0, 0]
    # one-channel images keep the grey start
    gray_model, gray_calib, _, _ = trained(poisoned=True)
    one = _Optimiser(gray_model, gray_calib[:8], PP, 255.0).patches(TARGET, 0, only={probe_name("patch", 2, (6, 6))},
                                                                   colour_start=True)[0]
    assert np.allclose(one.delta, 127.5)


def test_a_colour_trigger_is_removed_and_the_defense_probes_start_at_a_colour(colour, tmp_path, capsys):
    import onnxruntime as ort

    from digits_backdoor import _inputs, magenta_stamp
    from sanitizer.defense.detect import Leads
    from sanitizer.pipeline import split

    model, calib, x_test, y_test = colour
    report = _sanitize(model, calib, tmp_path, "--out", str(tmp_path / "o.onnx"), "--time-budget", "0")
    assert report["detection"]["suspected_target"] == TARGET
    assert report["detection"]["patch_scan"]["colour_start"]["3"][str(TARGET)] >= SCAN_FLIP
    assert Leads.of(report["detection"]).colour
    acc0, _ = acc_asr(model, x_test, y_test, magenta_stamp)
    acc, asr = acc_asr(onnx.load(tmp_path / "o.onnx"), x_test, y_test, magenta_stamp)
    assert asr <= 0.05 and acc >= acc0 - 0.02, (acc0, acc, asr)
    # how much of the target class the result keeps, against a count made here on the run's held-out half
    _, hold = split(len(calib), 0.5, 0)
    before, after = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                     .run(None, {"input": _inputs(calib[hold])})[0].argmax(1)
                     for m in (model, onnx.load(tmp_path / "o.onnx")))
    mine = before == TARGET
    kept = report["target_class"]
    assert (kept["class"], kept["of"], kept["kept"]) == (TARGET, int(mine.sum()), int((after[mine] == TARGET).sum()))
    assert kept["others_share"] == round(float((after[~mine] == before[~mine]).mean()), 4)
    assert f"class {TARGET} kept" in capsys.readouterr().out


def test_colour_leads_only_for_a_target_a_colour_start_found():
    from sanitizer.defense.detect import Leads

    found = {"suspected_target": 1, "patch_scan": {"colour_start": {"3": {"1": 0.95, "4": 0.6}}}}
    assert Leads.of(found).colour
    assert not Leads.of({**found, "suspected_target": 4}).colour
    assert not Leads.of({"suspected_target": 1, "patch_scan": {"colour_start": {}}}).colour
    assert not Leads.of({**found, "suspected_target": None}).colour and not Leads.of(None).colour
