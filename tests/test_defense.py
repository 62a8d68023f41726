"""The default defense end to end on tiny digits CNNs trained here, and its parts on their own."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from digits_backdoor import PP, TARGET, acc_asr, trained  # noqa: E402
from sanitizer import rewrite  # noqa: E402
from sanitizer.cli import main  # noqa: E402
from sanitizer.graph import find_sites  # noqa: E402
from sanitizer.defense.probes import Probe, synthesize  # noqa: E402
from sanitizer.defense.repair import repair  # noqa: E402
from calib.stats import probe_shapes  # noqa: E402


def _run(model, calib, tmp_path, *extra):
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", X=calib.astype(np.uint8))
    code = main([str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--out", str(tmp_path / "o.onnx"),
                 "--report", str(tmp_path / "r.json"), *extra])
    return code, json.loads((tmp_path / "r.json").read_text()) if (tmp_path / "r.json").exists() else None


def test_default_removes_the_backdoor_within_the_budget(tmp_path):
    model, calib, x_test, y_test = trained(poisoned=True)
    acc0, asr0 = acc_asr(model, x_test, y_test)
    assert asr0 > 0.9
    # 150 held-out images of a 112-unit model cannot bound a loss of 2 points: the budget is what they can show
    code, report = _run(model, calib, tmp_path, "--max-acc-drop", "0.06")
    assert code == 0
    acc1, asr1 = acc_asr(onnx.load(tmp_path / "o.onnx"), x_test, y_test)
    assert asr1 <= 0.1, (asr0, asr1, report["plan"]["trace"])
    assert acc1 >= acc0 - 0.05, (acc0, acc1)
    assert report["criterion"] == "probe" and report["probes"]["target"] == TARGET
    assert report["plan"]["count"] > 0 and report["held_out_after"]["within_budget"]
    # the corner probe is the one that found the trigger
    used = [p["probe"] for p in report["probes"]["probes"] if p["used"]]
    assert "patch 2x2 at (6, 6)" in used, report["probes"]["probes"]
    # each candidate's probes against the bars the count set (None: a probe the count does not judge)
    for c in report["probes"]["candidates"]:
        assert len(c["probe_bars"]) == len(c["probe_flip"]) and any(b is not None for b in c["probe_bars"])
        assert c["probes_silenced"] == all(b is None or f <= b for f, b in zip(c["probe_flip"], c["probe_bars"]))
    # the patch scan found it: no family scan or mask search was run, or sized
    assert report["detection"]["found_by"] == "patch scan"
    assert set(report["effort"]) == {"budget_seconds", "patch scan", "defense"}, report["effort"]
    # wall seconds per step of the defense, adding up to no more than the whole run (each rounded to the
    # millisecond, so the sum may exceed it by half a millisecond per step)
    steps = report["timings_seconds"]
    assert set(steps) == {"setup", "detection", "probes", "linf statistics", "bounds", "attribution", "search",
                          "repair", "re-attack", "final checks", "write", "total"}, steps
    assert all(v >= 0 for v in steps.values())
    assert sum(steps.values()) - steps["total"] <= steps["total"] + 5e-4 * len(steps)


def test_default_removes_a_trigger_larger_than_the_small_probe(tmp_path):
    # the shipped demo: 16x16 digits, 3x3 trigger; the 15 % probe is 2x2, so only the 20 % probe covers it
    # `sanitize demo` is the default defense on it, plain flags: it must ship (exit 0) with the backdoor gone
    code = main(["demo", "--out", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    # at full effort whatever the machine's load: nothing was sized to a time budget
    assert "effort" not in report, report.get("effort")
    sizes = {p["probe"].split(" at ")[0] for p in report["probes"]["probes"] if p["probe"].startswith("patch")}
    assert sizes == {"patch 2x2", "patch 3x3"}
    before, after = report["evaluation"]["before"], report["evaluation"]["after"]
    assert before["asr"] > 0.9 and after["asr"] <= 0.1, (before, after)
    assert after["clean_acc"] >= before["clean_acc"] - 0.03, (before, after)
    # the evaluation's drop, image by image, and the interval the refusal rule reads
    drop = report["evaluation"]["accuracy_drop"]
    assert drop["measured"] == pytest.approx(before["clean_acc"] - after["clean_acc"], abs=1e-6)
    assert drop["interval80"][0] <= drop["measured"] <= drop["interval80"][1]
    # the result was attacked afresh: probes synthesized against it no longer reach the target either
    fresh = report["probes"]["reattack"]
    assert fresh["max_fresh_flip"] <= 0.1, fresh
    # judged at the goal (or against a control class), not at the count's looser bars; the sparse probe, free
    # pixels anywhere, at a shortcut's bar
    assert {b for n, b in fresh["bars"].items() if b is not None and not n.startswith("sparse")} == {0.05}, fresh
    assert fresh["bars"]["sparse probe of 9 pixels"] == 0.5, fresh
    # bounds: tried loosest first while within half the budget, the kept one picked from those by the
    # probes' flip rates
    from sanitizer.defense.bound import chosen_quantile

    bounds = report["probes"]["bounds"]
    assert [t["quantile"] for t in bounds["tried"]] == sorted((t["quantile"] for t in bounds["tried"]), reverse=True)
    within = {t["quantile"]: t["probe_flip"] for t in bounds["tried"] if t["drop_estimate"] <= 0.01}
    assert bounds["quantile"] == chosen_quantile(within)


def test_default_leaves_a_clean_model_unchanged(tmp_path, capsys):
    model, calib, x_test, y_test = trained(poisoned=False)
    code, report = _run(model, calib, tmp_path)
    assert code == 0
    assert report["detection"]["verdict"] == "no backdoor found" and report["plan"]["count"] == 0
    # "no backdoor found" is said with what was searched and what can pass under the bars
    said = " ".join(capsys.readouterr().out.split())
    assert "nearly every image (0.9; warps 0.5) to one class, and small masks" in said and "a backdoor that works on fewer images" in said, said
    before = onnx.load(tmp_path / "m.onnx")
    after = onnx.load(tmp_path / "o.onnx")
    assert [i.raw_data for i in after.graph.initializer] == [i.raw_data for i in before.graph.initializer]


def test_probe_apply_patch_and_blend():
    x = np.full((2, 8, 8, 1), 100.0, np.float32)
    patch = Probe("patch", (6, 0), np.full((2, 2, 1), 7.0, np.float32), 255.0).apply(x)
    assert (patch[:, 6:8, 0:2] == 7).all() and (patch[:, :6] == 100).all() and (patch[:, 6:8, 2:] == 100).all()
    blend = Probe("blend", None, np.full((8, 8, 1), 200.0, np.float32), 255.0).apply(x)
    assert (blend == 255).all(), "a blended probe stays inside the pixel range"
    assert (x == 100).all(), "probes never modify their input"


def test_sparse_probe_paints_its_pixels_only():
    x = np.full((2, 5, 4, 3), 100.0, np.float32)
    mask = np.zeros((5, 4), bool)
    mask[0, 3] = mask[4, 0] = True
    pattern = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    probe = Probe("sparse", None, pattern, 255.0, mask)
    out = probe.apply(x)
    assert (out[:, mask] == pattern[mask]).all() and (out[:, ~mask] == 100).all()
    assert (x == 100).all() and probe.describe() == "sparse probe of 2 pixels"


def test_sparse_probe_reaches_a_scattered_trigger_and_not_a_clean_model():
    # 8 white pixels spread over a 16x16 digit send it to the target; the probe may use 9 (the larger patch's
    # 3x3) anywhere
    from digits_backdoor import trained_sparse, trained_wide
    from sanitizer.defense.probes import _Optimiser
    from sanitizer.defense.torchnet import pixel_range

    rates = []
    for model, calib, _, _ in (trained_sparse(), trained_wide(poisoned=False)):
        fit, rest = calib[:64], calib[150:]
        opt = _Optimiser(model, fit, PP, pixel_range(calib))
        probe = opt.sparse(TARGET, 100)
        assert probe.mask.shape == (16, 16) and probe.mask.sum() == 9
        base, sent = opt.logits(rest).argmax(1), opt.logits(probe.apply(rest)).argmax(1)
        rates.append(float((sent[base != TARGET] == TARGET).mean()))
    assert rates[0] >= 0.9 and rates[1] <= 0.2, rates


def test_signal_probe_is_one_value_per_column_in_every_row():
    x = np.random.default_rng(0).uniform(0, 255, (2, 6, 5, 3)).astype(np.float32)
    delta = np.random.default_rng(1).uniform(-40, 40, (1, 5, 3)).astype(np.float32)
    probe = Probe("signal", None, delta, 255.0)
    out = probe.apply(x)
    np.testing.assert_allclose(out, np.clip(x + delta, 0, 255))
    assert probe.describe().startswith("signal along columns")
    assert Probe("signal", None, delta.reshape(5, 1, 3), 255.0).describe().startswith("signal along rows")


def test_synthesized_signal_is_shared_by_the_channels_and_made_of_few_periods():
    from onnx import TensorProto, helper, numpy_helper

    from calib.preprocess import Preprocess
    from sanitizer.defense import probes

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    fc = rng.normal(size=(3, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 22])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(fc, "fc")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.uniform(0, 255, (16, 12, 22, 3)).astype(np.float32)
    opt = probes._Optimiser(model, x, Preprocess(1 / 255, (0.0,) * 3, (1.0,) * 3, "nchw"), 255.0)
    for family, shape, n in (("signal along columns", (1, 22, 3), 22), ("signal along rows", (12, 1, 3), 12)):
        probe = opt.signal(family, 1, steps=15)
        assert probe.delta.shape == shape and probe.describe().startswith(family)
        assert (probe.delta == probe.delta[..., :1]).all(), "one signal for every channel"
        eps = probes.SIGNAL_EPS * 255
        assert np.abs(probe.delta).max() <= eps
        spectrum = np.abs(np.fft.rfft(np.arctanh(probe.delta[..., 0].ravel() / eps)))
        periods = min(probes.SIGNAL_PERIODS, (n - 1) // 2)
        top = spectrum[1:periods + 1].max()
        assert top > 1.0, "the signal moved"
        # float32 rounding, amplified by arctanh where tanh saturates, is all there is outside the periods
        assert spectrum[0] < 1e-3 * top and spectrum[periods + 1:].max() < 1e-3 * top, spectrum


def test_warp_probe_resamples_as_the_grid_sample_it_was_optimised_through():
    import torch

    from sanitizer.defense.probes import warp

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (3, 9, 12, 2)).astype(np.float32)
    flow = rng.uniform(-1.5, 1.5, (9, 12, 2)).astype(np.float32)     # (column, row) pixels, past the border too
    rows, cols = torch.meshgrid(torch.linspace(-1, 1, 9), torch.linspace(-1, 1, 12), indexing="ij")
    grid = (torch.stack([cols, rows], -1) + torch.from_numpy(flow) * torch.tensor([2 / 11, 2 / 8])).clamp(-1, 1)
    want = torch.nn.functional.grid_sample(torch.from_numpy(x).permute(0, 3, 1, 2), grid[None].expand(3, 9, 12, 2),
                                           align_corners=True, padding_mode="border").permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(warp(x, flow), want, atol=1e-3)
    np.testing.assert_array_equal(warp(x, np.zeros_like(flow)), x)
    assert Probe("warp", None, flow, 255.0).apply(x).shape == x.shape


def test_synthesized_probes_reach_the_target_only_where_the_trigger_is():
    model, calib, _, _ = trained(poisoned=True)
    probes = synthesize(model, calib, PP, TARGET, seed=0, steps=60)
    assert [p.kind for p in probes] == ["patch"] * 5 + ["blend"]
    sess_in = lambda x: np.ascontiguousarray((x / 255.0).astype(np.float32).transpose(0, 3, 1, 2))  # noqa: E731
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rate = {p.at: float((sess.run(None, {"input": sess_in(p.apply(calib))})[0].argmax(1) == TARGET).mean())
            for p in probes if p.kind == "patch"}
    assert rate[(6, 6)] > 0.9 and rate[(0, 0)] < 0.5, rate


def test_only_probes_that_pruning_silences_set_the_count():
    from sanitizer.defense.count import FLIP_GOAL, bars

    # trigger-like probes reach the goal (one within the goal of a small floor); the third never falls
    np.testing.assert_allclose(bars(np.array([0.0, 0.04, 0.3])), [FLIP_GOAL, 0.04 + FLIP_GOAL, np.inf])
    # when no probe falls, each must come within the goal of its own floor
    np.testing.assert_allclose(bars(np.array([0.2, 0.3])), [0.2 + FLIP_GOAL, 0.3 + FLIP_GOAL])
    # a family probe detection found the target with is evidence, never dismissed as adversarial weakness
    np.testing.assert_allclose(bars(np.array([0.0, 0.3, 0.4]), evidence=[2]), [FLIP_GOAL, np.inf, 0.4 + FLIP_GOAL])


def test_the_long_repair_unlearns_the_trigger_probe_and_keeps_accuracy():
    # no unit pruned: the repair alone must teach the model to ignore the probe at the trigger's place. The
    # probe's huge first losses once filled Adam's memory of squared gradients, so the clean images' pull back
    # came too slowly: accuracy 0.992 -> 0.922 (ASR 0.048); now 0.980 (ASR 0.014)
    model, calib, x_test, y_test = trained(poisoned=True)
    acc0, _ = acc_asr(model, x_test, y_test)
    x = PP.apply(calib[:1])
    shapes, ints = probe_shapes(model, {"input": x})
    sites = {s.name: s for s in find_sites(model, shapes, ints)}
    probe = synthesize(model, calib, PP, TARGET, seed=0, only={"patch 2x2 at (6, 6)"})
    run = (300, 1e-4)
    acc1, asr1 = acc_asr(repair(model, sites, {}, calib, PP, probe, seed=0, runs=(run,))[run], x_test, y_test)
    assert asr1 <= 0.05 and acc1 >= acc0 - 0.02, (acc0, acc1, asr1)


def test_repair_keeps_the_graph_and_the_pruned_channels_zero():
    model, calib, _, _ = trained(poisoned=True)
    x = PP.apply(calib[:1])
    shapes, ints = probe_shapes(model, {"input": x})
    sites = {s.name: s for s in find_sites(model, shapes, ints)}
    name = next(n for n, s in sites.items() if s.kind == "conv" and s.prunable)
    pruned = {name: [0, 3]}
    def run(*runs):
        return repair(model, sites, pruned, calib, PP, [], seed=0, runs=runs)

    def weights(models):
        return {k: [i.raw_data for i in m.graph.initializer] for k, m in models.items()}

    fixed = rewrite.apply(run((5, 1e-4))[(5, 1e-4)], sites, pruned)
    assert [n.op_type for n in fixed.graph.node] == [n.op_type for n in model.graph.node]
    moved = [a.name for a, b in zip(model.graph.initializer, fixed.graph.initializer) if a.raw_data != b.raw_data]
    assert moved, "repair tuned no weight"
    weight = next(onnx.numpy_helper.to_array(i) for i in fixed.graph.initializer if i.name == sites[name].zero[0][0])
    assert not weight[[0, 3]].any()
    # each run starts from the model and the seed: a run's result does not depend on the runs before it
    both, alone = weights(run((9, 1e-4), (5, 1e-4))), weights(run((5, 1e-4)))
    assert sorted(both) == [(5, 1e-4), (9, 1e-4)] and both[(5, 1e-4)] == alone[(5, 1e-4)]
    assert both[(9, 1e-4)] != both[(5, 1e-4)]


def test_a_backdoor_that_cannot_be_removed_within_the_budget_is_refused(tmp_path):
    model, calib, _, _ = trained(poisoned=True)
    code, report = _run(model, calib, tmp_path, "--max-acc-drop", "0")
    assert code == 7 and report is None and not (tmp_path / "o.onnx").exists()


def test_ratio_is_refused_with_the_probe_criterion(tmp_path):
    model, calib, _, _ = trained(poisoned=True)
    code, report = _run(model, calib, tmp_path, "--ratio", "0.1")
    assert code == 2 and report is None


def _suspects_and_rest(x_test, y_test):
    from digits_backdoor import _stamp

    others = np.flatnonzero(y_test != TARGET)
    return _stamp(x_test[others[:120]]), others[120:]


def test_suspect_samples_replace_the_probes(tmp_path):
    model, calib, x_test, y_test = trained(poisoned=True)
    suspects, rest = _suspects_and_rest(x_test, y_test)
    np.savez(tmp_path / "suspects.npz", X=suspects.astype(np.uint8))
    code, report = _run(model, calib, tmp_path, "--suspect", str(tmp_path / "suspects.npz"), "--max-acc-drop", "0.06")
    assert code == 0
    assert "detection" not in report and report["probes"]["source"] == "suspicious samples"
    assert report["probes"]["target"] == TARGET, "the target is the class the model gives the suspects"
    keep = np.concatenate([rest, np.flatnonzero(y_test == TARGET)])
    acc0, _ = acc_asr(model, x_test, y_test)
    acc1, asr1 = acc_asr(onnx.load(tmp_path / "o.onnx"), x_test[keep], y_test[keep])
    assert asr1 <= 0.1 and acc1 >= acc0 - 0.05, (acc0, acc1, asr1)


def test_suspect_needs_enough_images_and_the_probe_criterion(tmp_path):
    model, calib, x_test, y_test = trained(poisoned=True)
    suspects, _ = _suspects_and_rest(x_test, y_test)
    np.savez(tmp_path / "few.npz", X=suspects[:6].astype(np.uint8))
    code, _ = _run(model, calib, tmp_path, "--suspect", str(tmp_path / "few.npz"))
    assert code == 5 and not (tmp_path / "o.onnx").exists()
    np.savez(tmp_path / "s.npz", X=suspects.astype(np.uint8))
    code, _ = _run(model, calib, tmp_path, "--suspect", str(tmp_path / "s.npz"), "--criterion", "linf")
    assert code == 2
    # clean images of every class name no target: refused rather than "silenced"
    np.savez(tmp_path / "untriggered.npz", X=x_test[:120].astype(np.uint8))
    code, _ = _run(model, calib, tmp_path, "--suspect", str(tmp_path / "untriggered.npz"))
    assert code == 5 and not (tmp_path / "o.onnx").exists()


def test_suspects_that_still_reach_their_class_are_refused_not_shipped(tmp_path):
    # clean images of one class "suspected": no pruning within the budget sends them elsewhere, and with no
    # re-attack after suspects the verdict must be absolute (the count's bar is relative to its floor)
    model, calib, x_test, y_test = trained(poisoned=True)
    np.savez(tmp_path / "s.npz", X=x_test[y_test == 3][:120].astype(np.uint8))
    code, report = _run(model, calib, tmp_path, "--suspect", str(tmp_path / "s.npz"))
    assert code == 7 and not (tmp_path / "o.onnx").exists()
    code, report = _run(model, calib, tmp_path, "--suspect", str(tmp_path / "s.npz"), "--allow-degraded")
    # the bar: the goal, these calibration images having no labels to tell what reaches class 3 without a
    # backdoor (suspect_bar); not the goal plus the share of held-out images the original calls class 3 — those
    # are mostly class 3's own, which the samples are not
    assert report["probes"]["suspect_bar"] == 0.05 and report["degraded"]


def test_a_handful_of_suspects_cannot_show_the_backdoor_gone(tmp_path):
    # 10 triggered samples: 5 count them, and 0 of 5 reaching the target is an 80 % interval up to 0.25 — it
    # read 0.000 and shipped at a real ASR of 0.22. The top of the interval must be under the bar
    model, calib, x_test, y_test = trained(poisoned=True)
    suspects, _ = _suspects_and_rest(x_test, y_test)
    np.savez(tmp_path / "s.npz", X=suspects[:10].astype(np.uint8))
    code, report = _run(model, calib, tmp_path, "--suspect", str(tmp_path / "s.npz"), "--allow-degraded")
    final = report["held_out_after"]
    lo, hi = final["probe_flip_interval80"]
    assert final["probe_images"] == 5 and lo <= final["probe_flip"][0] <= hi and hi > report["probes"]["suspect_bar"]
    assert report["degraded"] and not final["probes_silenced"], final
    # what is shown and written is, within the budget, the candidate whose samples fall furthest — not the bounded
    # model that leaves every sample at the target
    within = [c for c in report["probes"]["candidates"] if c["drop_estimate"] <= report["max_acc_drop"]]
    assert within and report["probes"]["chosen"] == min(within, key=lambda c: max(c["probe_flip"]))["name"], within
    plain = tmp_path / "plain"
    plain.mkdir()
    code, _ = _run(model, calib, plain, "--suspect", str(tmp_path / "s.npz"))
    assert code == 7 and not (plain / "o.onnx").exists()


def test_the_suspect_bar_counts_other_classes_only():
    from sanitizer.defense.defend import suspect_bar

    class Held:
        labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
        reference = np.array([0, 0, 0, 1, 1, 1, 2, 2, 0, 2])   # 1 of the 6 images labelled 1 or 2 goes to 0
    assert suspect_bar(Held, 0) == pytest.approx(0.05 + 1 / 6)
    assert suspect_bar(Held, 2) == pytest.approx(0.05)
    Held.labels = None
    assert suspect_bar(Held, 0) == 0.05


def test_plots_are_written_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    from digits_backdoor import _stamp

    model, calib, x_test, y_test = trained(poisoned=True)
    keep = y_test != TARGET
    np.savez(tmp_path / "trig.npz", X=_stamp(x_test[keep]).astype(np.uint8), y=y_test[keep])
    code, report = _run(model, calib, tmp_path, "--max-acc-drop", "0.06", "--plots", str(tmp_path / "figs"),
                        "--eval-triggered", str(tmp_path / "trig.npz"), "--target", str(TARGET))
    assert code == 0
    names = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert names == ["linf_hist.png", "probes.png", "pruning_curve.png"]
    for name in names:
        assert (tmp_path / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(report["plots"]) == sorted(str(tmp_path / "figs" / n) for n in names)
    # an existing figure is not replaced without --force, and nothing else is written either
    (tmp_path / "o.onnx").unlink()
    code, _ = _run(model, calib, tmp_path, "--max-acc-drop", "0.06", "--plots", str(tmp_path / "figs"))
    assert code == 6 and not (tmp_path / "o.onnx").exists()


def test_without_torch_the_default_says_how_to_go_on(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    model, calib, _, _ = trained(poisoned=True)
    code, report = _run(model, calib, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 9 and report is None and len(err) == 1 and "--criterion linf" in err[0]


def _reattack(model, calib, bar, counted=None, sparse=False):
    """reattack on `model` toward TARGET with `bar` for the probes `counted` (None: every patch and the blend),
    and — `sparse`, as defend does — the sparse probe at a shortcut's bar (USE_FLIP)."""
    from types import SimpleNamespace

    from calib.preprocess import input_spec
    from sanitizer.defense import Context
    from sanitizer.defense.count import USE_FLIP
    from sanitizer.defense.probes import sparse_name, synthesize
    from sanitizer.defense.reattack import reattack

    spec = input_spec(model)
    names = [p.describe() for p in synthesize(model, calib[:16], PP, TARGET, steps=1)]
    prep = SimpleNamespace(pre=PP, spec=spec)
    opts = SimpleNamespace(seed=0, batch_size=64)
    fit, hold = calib[:150], calib[150:]
    bars = {n: bar if counted is None or n in counted else np.inf for n in names}
    if sparse:
        bars[sparse_name(calib)] = USE_FLIP
    # the re-attack reads no held-out agreement: no HeldOut needed
    ctx = Context(prep, opts, lambda *a: None, TARGET, fit, hold, None, PP.apply(hold))
    return reattack(ctx, model, bars)[0]


def test_reattack_judges_the_target_against_any_other_class_at_the_same_place():
    # bars no probe can pass (0): the verdict rests on the control alone
    model, calib, _, _ = trained(poisoned=True)
    backdoored = _reattack(model, calib, 0.0)
    control = backdoored["control"]
    assert not backdoored["silenced"] and TARGET not in control["class"].values(), backdoored
    worst = backdoored["worst"]
    assert worst["target_flip"] > worst["control_flip"] + 0.3 and worst["control_class"] != TARGET, backdoored
    # the clean twin: class 0 is no backdoor's target, and other classes are nearly as reachable place by
    # place. Not quite everywhere: a 2x2 patch blanking the centre of an 8x8 digit draws a 0's hole (0.11 of
    # the images, 0.05 for the best other class there) — so a re-attack on its own would refuse it; the
    # detection, which runs first, finds no backdoor in it (test_detect)
    clean, calib, _, _ = trained(poisoned=False)
    honest = _reattack(clean, calib, 0.0)

    def excess(r):
        return max(r["fresh_probe_flip"][n] - r["control"]["fresh_probe_flip"][n] for n in r["control"]["fresh_probe_flip"])
    assert TARGET not in honest["control"]["class"].values()
    assert excess(honest) < 0.1 < 0.3 < excess(backdoored), (honest, backdoored)
    # under bars every fresh probe passes, no control is synthesized; probes without a bar are not attacked
    passed = _reattack(model, calib, 1.0, counted={"patch 2x2 at (6, 6)", "blend ±0.1 of range"})
    assert passed["silenced"] and "control" not in passed
    assert set(passed["fresh_probe_flip"]) == {"patch 2x2 at (6, 6)", "blend ±0.1 of range"}


def test_reattack_finds_a_scattered_trigger_left_where_no_patch_place_is_counted():
    # no patch place counted — as after a pruning that silenced the part of the trigger under the 3x3 corner
    # probe — yet the fresh sparse probe still sends the images to the target, and no other class comes near:
    # the backdoor is named as still there. On the clean twin the same re-attack passes.
    from digits_backdoor import trained_sparse, trained_wide

    model, calib, _, _ = trained_sparse()
    left = _reattack(model, calib, 1.0, counted=set(), sparse=True)
    assert not left["silenced"] and left["worst"]["probe"] == "sparse probe of 9 pixels", left
    assert left["worst"]["target_flip"] >= 0.9 and left["worst"]["control_flip"] <= 0.5, left
    clean, calib, _, _ = trained_wide(poisoned=False)
    honest = _reattack(clean, calib, 1.0, counted=set(), sparse=True)
    assert honest["silenced"] and honest["fresh_probe_flip"]["sparse probe of 9 pixels"] <= 0.2, honest


def test_still_reachable_compares_place_by_place_and_only_probes_with_a_bar():
    from sanitizer.defense.count import FLIP_GOAL
    from sanitizer.defense.reattack import still_reachable

    bars = {"a": 0.05, "b": np.inf}
    assert not still_reachable({"a": 0.04, "b": 0.9}, bars, None), "a probe the count judged adversarial does not count"
    assert still_reachable({"a": 0.4, "b": 0.0}, bars, None) == ["a"]
    assert not still_reachable({"a": 0.4, "b": 0.0}, bars, {"a": 0.4 - FLIP_GOAL + 0.01, "b": 0.9})
    assert still_reachable({"a": 0.4, "b": 0.0}, bars, {"a": 0.3, "b": 0.9}) == ["a"]
    # place by place: another class reached easily elsewhere does not excuse the target at its trigger's place
    # (the open suite's ResNet-18: 0.13 toward the target at the trigger's corner, 0.02 toward any other class
    # there, 0.10 at the centre)
    two = {"a": 0.05, "c": 0.05}
    assert still_reachable({"a": 0.13, "c": 0.01}, two, {"a": 0.02, "c": 0.10}) == ["a"]


def test_reach_is_the_best_other_class_among_images_not_already_in_it():
    from calib.preprocess import input_spec
    from sanitizer.defense.reattack import reach
    from sanitizer.evaluate import Predictor

    model, calib, _, _ = trained(poisoned=True)
    x = PP.apply(calib[:100])
    base = Predictor(model, input_spec(model)).logits(x, 64).argmax(1)
    # every image replaced by one image of a class other than the target: that class is reached from all
    # the images not already in it
    other = next(i for i in range(len(x)) if base[i] != TARGET)
    got = reach(model, input_spec(model), x, [np.repeat(x[other:other + 1], len(x), 0)], 64, TARGET)
    assert got == [(int(base[other]), 1.0)]
    # the target itself is never the control
    only_target = next(i for i in range(len(x)) if base[i] == TARGET)
    cls, rate = reach(model, input_spec(model), x, [np.repeat(x[only_target:only_target + 1], len(x), 0)], 64, TARGET)[0]
    assert cls != TARGET and rate == 0.0


def test_a_tighter_bound_is_taken_while_it_still_takes_probes_off_the_target():
    from sanitizer.defense.bound import chosen_quantile

    # flip rates measured on the suite's ResNet-18 (10 used probes, the last a full-image perturbation)
    resnet = {1.0: [0.0045, 0.536, 0.4459, 0.0405, 0.027, 0.009, 0.4279, 0.6216, 0.1081, 0.973],
              0.99: [0.0045, 0.2523, 0.2207, 0.045, 0.027, 0.009, 0.2072, 0.3784, 0.0991, 0.9459],
              0.95: [0.0045, 0.0852, 0.0762, 0.0359, 0.0269, 0.0045, 0.0628, 0.157, 0.0897, 0.87],
              0.9: [0.0045, 0.0538, 0.0538, 0.0359, 0.0179, 0.009, 0.0538, 0.1121, 0.0852, 0.7623]}
    assert chosen_quantile(resnet) == 0.95
    # probes bounds do not move (MNIST's dense backdoor): the loosest, which changes nothing clean
    assert chosen_quantile({1.0: [0.75, 1.0], 0.99: [0.74, 1.0], 0.95: [0.73, 1.0], 0.9: [0.70, 1.0]}) == 1.0
    assert chosen_quantile({1.0: [0.3]}) == 1.0


def test_refusal_names_the_reason_and_what_to_do():
    from sanitizer.pipeline import refusal

    final = {"drop_estimate": 0.01, "drop_interval90": [0.0, 0.03], "judged_on": "accuracy", "n": 250,
             "probe_flip": [0.02], "fresh_probes_silenced": False}
    info = {"reattack": {"worst": {"probe": "patch 6x6 at (26, 26)", "target_flip": 0.62, "control_flip": 0.2,
                                   "control_class": 3}}}
    msg = refusal(4, final, info, 0.02)
    assert "leaves the backdoor in place" in msg and "patch 6x6 at (26, 26)" in msg and "0.620" in msg
    assert "no other class gets over 0.200" in msg
    assert "--suspect" in msg and "--allow-degraded" in msg and "\n" not in msg
    over = refusal(4, {**final, "drop_estimate": 0.05}, info, 0.02)
    assert "breaks the accuracy budget" in over and "--max-acc-drop" in over
    probes = refusal(4, {**final, "fresh_probes_silenced": True, "probe_flip": [0.3]}, info, 0.02)
    assert "probes working (flip rate 0.300)" in probes
    both = refusal(0, {**final, "drop_estimate": 0.05, "probes_silenced": False, "probe_flip": [0.6]}, info, 0.02)
    assert "breaks the accuracy budget" in both and "probes working (flip rate 0.600)" in both
    assert both.startswith("the result, with no unit pruned, breaks") and over.startswith("pruning 4 units")
    # the target the defense was aimed at ends the reason: a user who knows the trigger sees a wrong one at once
    from sanitizer.pipeline import aim
    aimed = refusal(4, {**final, "drop_estimate": 0.05}, info, 0.02,
                    aim=aim({"target": 8, "source": "synthesized"}, {"found_by": "mask anomaly"}))
    assert "(the defense was aimed at class 8, named by the mask anomaly); nothing written" in aimed
    assert aim({"target": 2, "source": "suspicious samples"}, None) == "class 2, where the --suspect samples go"
    assert aim(None, {"found_by": "patch scan"}) is None


def test_the_ranking_that_brings_more_probes_to_the_goal_within_budget_is_preferred():
    from sanitizer.defense.count import preference
    from sanitizer.plan import Plan

    def plan(units, flips, drop, agreement):
        return Plan([("s", i) for i in range(100)], units,
                    [{"units": 0, "probe_flip": [1.0] * len(flips), "drop_estimate": 0.0, "agreement": 1.0},
                     {"units": units, "probe_flip": flips, "drop_estimate": drop, "agreement": agreement}])
    # the open suite's MobileNetV2: equal agreement; 'attribution' prunes 2 units and leaves two probes over the
    # goal (real ASR 0.082), 'relative' prunes 59 and brings all four patch probes under it (real ASR 0.038)
    rankings = {"relative": plan(59, [0.0388, 0.0129, 0.0431, 0.0474, 0.5819], 0.0096, 0.94),
                "spread": plan(7, [0.0676, 0.0135, 0.0586, 0.0495, 0.6216], 0.012, 0.924),
                "attribution": plan(2, [0.1106, 0.0221, 0.0752, 0.0398, 0.6504], 0.0096, 0.94)}
    assert max(rankings, key=lambda n: preference(rankings[n], 0.02)) == "relative"
    # over the budget it comes last, whatever its probes say
    rankings["relative"] = plan(59, [0.0388, 0.0129, 0.0431, 0.0474, 0.5819], 0.03, 0.94)
    assert max(rankings, key=lambda n: preference(rankings[n], 0.02)) == "attribution"
    # same probes at the goal: the higher agreement, then the fewer units
    same = {"a": plan(9, [0.01], 0.0, 0.95), "b": plan(3, [0.01], 0.0, 0.95), "c": plan(1, [0.01], 0.0, 0.9)}
    assert max(same, key=lambda n: preference(same[n], 0.02)) == "b"


def test_default_removes_a_signal_backdoor_found_by_the_family_scan(tmp_path, monkeypatch):
    import sanitizer.defense.probes as probes
    from digits_backdoor import _inputs, signal_stamp, trained_signal

    # the fixture answers the signal probe near its training amplitude (see test_detect)
    monkeypatch.setattr(probes, "SIGNAL_EPS", 0.2)
    model, calib, x_test, y_test = trained_signal()
    code, report = _run(model, calib, tmp_path, "--max-acc-drop", "0.03")
    assert report["detection"]["found_by"] == "family scan: signal along columns"
    names = [p["probe"] for p in report["probes"]["probes"]]
    assert names[-1].startswith("signal along columns") and report["probes"]["probes"][-1]["used"]
    # the re-attack synthesizes the family's probe afresh too
    assert any(n.startswith("signal along columns") for n in report["probes"]["reattack"]["fresh_probe_flip"])
    assert code == 0, report["probes"]["reattack"]
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"])
    keep = y_test != TARGET
    asr = float((sess.run(None, {"input": _inputs(signal_stamp(x_test[keep]))})[0].argmax(1) == TARGET).mean())
    acc = float((sess.run(None, {"input": _inputs(x_test)})[0].argmax(1) == y_test).mean())
    acc0, _ = acc_asr(model, x_test, y_test)
    assert asr <= 0.1 and acc >= acc0 - 0.05, (acc0, acc, asr)


@pytest.mark.parametrize("criterion", [[], ["--criterion", "linf", "--detect"]], ids=["probe", "linf"])
def test_a_suspicion_no_probe_confirms_leaves_the_model_alone(tmp_path, monkeypatch, criterion):
    # a mask anomaly on a clean model (what tiny clean models sometimes show) names a class no probe reaches;
    # with a clean-data criterion the suspicion would have the model pruned, within the budget but for nothing
    from sanitizer import pipeline

    real = pipeline.detect

    def false_alarm(*args):
        found = real(*args)
        return {**found, "verdict": "backdoor suspected, target class 3", "suspected_target": 3,
                "found_by": "mask anomaly"}

    monkeypatch.setattr(pipeline, "detect", false_alarm)
    model, calib, _, _ = trained(poisoned=False)
    code, report = _run(model, calib, tmp_path, *criterion)
    assert code == 0 and report["plan"]["count"] == 0 and "probes" not in report
    detection = report["detection"]
    assert detection["verdict"] == "no backdoor found" and detection["suspected_target"] is None
    assert detection["not_confirmed"]["class"] == 3 and detection["not_confirmed"]["by"] == "mask anomaly"
    assert detection["not_confirmed"]["best_probe_flip"] < 0.5
    before, after = onnx.load(tmp_path / "m.onnx"), onnx.load(tmp_path / "o.onnx")
    assert [i.raw_data for i in after.graph.initializer] == [i.raw_data for i in before.graph.initializer]


def test_nothing_to_prune_is_refused_only_when_the_suspicion_is_confirmed(tmp_path, monkeypatch):
    # a model whose every layer is blocked (an op the sites do not follow): a clean one with a false mask
    # anomaly is "no backdoor found" (exit 0, left as it is), not "no prunable layer" (exit 4); a backdoored
    # one still is refused, since nothing could be pruned
    from sanitizer import pipeline

    monkeypatch.setattr(pipeline, "scope", lambda *a: [])
    real = pipeline.detect
    monkeypatch.setattr(pipeline, "detect", lambda *a: {**real(*a), "verdict": "backdoor suspected, target class 3",
                                                        "suspected_target": 3, "found_by": "mask anomaly"})
    model, calib, _, _ = trained(poisoned=False)
    code, report = _run(model, calib, tmp_path)
    assert code == 0 and report["detection"]["not_confirmed"]["class"] == 3 and report["plan"]["count"] == 0
    monkeypatch.setattr(pipeline, "detect", real)
    model, calib, _, _ = trained(poisoned=True)
    (tmp_path / "b").mkdir()
    code, report = _run(model, calib, tmp_path / "b")
    assert code == 4 and report is None and not (tmp_path / "b" / "o.onnx").exists()


def test_a_patch_away_from_every_fixed_probe_place_is_found_where_its_mask_is_and_removed(tmp_path, monkeypatch):
    # a white 3x3 square at the middle of the left edge: no corner or centre patch approaches it, and the mask
    # search's anomaly index may stay under its bar (1.9 in one run, over 2 in another: a bar no index passes
    # stands in for the first); a patch where the smallest mask sits finds it, and the defense probes there too
    import sanitizer.defense.detect as detection
    from digits_backdoor import side_stamp, trained_side
    from sanitizer.defense.detect import MASK_PLACE, SCAN_FLIP

    monkeypatch.setattr(detection, "ANOMALY_THRESHOLD", float("inf"))
    model, calib, x_test, y_test = trained_side()
    acc0, asr0 = acc_asr(model, x_test, y_test, side_stamp)
    # full effort however busy the machine; the repair's held-out estimate sits near 0.02 (0.018 on one thread,
    # 0.024 on two), which 150 held-out images cannot tell apart: the budget is not what this test is about
    code, report = _run(model, calib, tmp_path, "--time-budget", "0", "--max-acc-drop", "0.05")
    found = report["detection"]
    assert max(found["patch_scan"]["best_flip"]) < 0.5, found["patch_scan"]
    assert code == 0 and (found["suspected_target"], found["found_by"]) == (TARGET, MASK_PLACE), found
    assert found["mask_place_scan"]["best_flip"][str(TARGET)] >= SCAN_FLIP
    assert "patch 3x3 at (7, 0)" in [p["probe"] for p in report["probes"]["probes"] if p["used"]]
    acc1, asr1 = acc_asr(onnx.load(tmp_path / "o.onnx"), x_test, y_test, side_stamp)
    assert asr0 > 0.9 and asr1 <= 0.05 and acc1 >= acc0 - 0.03, (acc0, acc1, asr0, asr1)


def test_the_unlearning_round_removes_a_scattered_trigger_the_probes_missed(tmp_path):
    # the probes toward the target find the 3x3 corner holding two of the trigger's 8 pixels; pruning and the
    # repairs silence that place while the re-attack's sparse probe still sends every image to the target. The
    # round repairs again against what the re-attack found, and its result passes a fresh re-attack
    from digits_backdoor import sparse_stamp, trained_sparse

    model, calib, x_test, y_test = trained_sparse()
    acc0, asr0 = acc_asr(model, x_test, y_test, sparse_stamp)
    # the round's held-out estimate sits at the 2-point budget (0.017 on one machine, 0.022 on another, for the
    # same 2.5-point drop on the test images): the budget is not what this test is about; full effort, whatever
    # else the machine runs
    code, report = _run(model, calib, tmp_path, "--max-acc-drop", "0.05", "--time-budget", "0")
    probes = report["probes"]
    assert code == 0 and "sparse probe of 9 pixels" in probes["unlearning_round"]["probes"], probes
    assert not probes["unlearning_round"]["reattack_before"]["silenced"] and probes["reattack"]["silenced"]
    assert probes["chosen"].startswith("pruned+repaired against the re-attack's probes"), probes["chosen"]
    acc1, asr1 = acc_asr(onnx.load(tmp_path / "o.onnx"), x_test, y_test, sparse_stamp)
    # 150 held-out images judge the 2-point budget: on the 397 test images the drop may be a little over it
    assert asr0 > 0.9 and asr1 <= 0.05 and acc1 >= acc0 - 0.03, (acc0, acc1, asr0, asr1)


def test_evaluation_sets_that_measure_nothing_are_named():
    from sanitizer.pipeline import evaluation_notes

    fine = {"clean_acc": 0.97, "asr": 1.0}
    assert evaluation_notes(fine, 1, 10, {"suspected_target": 1}) == []
    # swapped sets: the "clean" images are the triggered ones, on which the original is right on none
    swapped = evaluation_notes({"clean_acc": 0.0, "asr": 0.0056}, 1, 10, None)
    assert len(swapped) == 2 and "swapped" in swapped[0] and "--target 1" in swapped[1]
    # a wrong --target: the triggered images go elsewhere on the original, and detection aimed elsewhere too
    wrong = evaluation_notes({"clean_acc": 0.97, "asr": 0.0}, 2, 10, {"suspected_target": 8})
    assert "--target 2" in wrong[0] and "class 8, not --target 2" in wrong[1]
    assert evaluation_notes({"clean_acc": None, "asr": None}, None, 10, None) == []
