"""`--report-html`: one self-contained page with the run's numbers, written and refused like every artifact."""
from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from conftest import files_in
from sanitizer.demo import DEMO
from sanitizer.report_html import rate

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "screenshot_report.py"


class Links(HTMLParser):
    """Every URL-bearing attribute and every tag of a page."""

    def __init__(self):
        super().__init__()
        self.urls, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href", "srcset", "data", "action", "poster") and v]


def _links(page: str) -> Links:
    parser = Links()
    parser.feed(page)
    return parser


def _demo_run(cli, tmp_path, *extra):
    argv = [DEMO["model"], "--calib", DEMO["calib"], "--criterion", "linf", "--out", tmp_path / "o.onnx",
            "--report", tmp_path / "r.json", "--report-html", tmp_path / "r.html", "--eval-data", DEMO["clean"],
            "--eval-triggered", DEMO["triggered"], "--target", DEMO["target"],
            # linf leaves the demo's backdoor in place, which the triggered images show (exit 7 without it)
            "--allow-degraded", *extra]
    return cli(*argv)


def test_page_carries_the_reports_numbers_and_nothing_outside_it(cli, tmp_path):
    result = _demo_run(cli, tmp_path)
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "r.json").read_text())
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    held, ev, plan = report["held_out_after"], report["evaluation"], report["plan"]
    assert plan["count"] > 0
    # linf leaves the demo's backdoor, which its triggered images show: written only with --allow-degraded
    assert ("Degraded, written only because of --allow-degraded: the defense ran, but your --eval-triggered images "
            f"still reach the target on {ev['after']['asr']:.3f}") in page
    assert f"{plan['count']} of {plan['candidates']} units pruned (linf)." in page
    for number in (held["agreement"], *held["interval90"], held["drop_estimate"], ev["before"]["clean_acc"],
                   ev["after"]["clean_acc"], ev["before"]["asr"], ev["after"]["asr"], *ev["asr_evidence"]["interval80"],
                   ev["asr_evidence"]["bar"], ev["asr_evidence"]["natural_rate"]):
        assert rate(number) in page, number
    for t in plan["trace"]:   # the pruning curve's table, row by row
        assert f"<td>{t['units']}</td><td class=\"n\">{rate(t['agreement'])}</td>" in page, t
    for layer, units in plan["pruned"].items():
        assert f"<td>{layer}</td><td class=\"n\">{len(units)}</td><td>{', '.join(map(str, units))}</td>" in page
    assert report["input"]["sha256"] in page and report["output"]["sha256"] in page
    assert "--report-html" in page and str(tmp_path / "r.html") in page   # the command line
    links = _links(page)
    assert "script" not in links.tags and "link" not in links.tags
    assert links.urls and all(u.startswith("data:image/png;base64,") for u in links.urls), links.urls
    if importlib.util.find_spec("matplotlib") is not None:
        assert len(links.urls) == 1   # linf: the pruning curve; histograms and probes come with probe
        assert base64.b64decode(links.urls[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_page_keeps_the_numbers_and_says_why_no_figures(cli, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = _demo_run(cli, tmp_path)
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "r.json").read_text())
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Figures need matplotlib" in page and "<img" not in page
    assert rate(report["held_out_after"]["agreement"]) in page and rate(report["evaluation"]["after"]["asr"]) in page


def _existing(tmp, wm, wn):
    (tmp / "r.html").write_text("an older page")
    return [wm(), "--calib", wn(), "--out", tmp / "o.onnx", "--report-html", tmp / "r.html"]


REFUSED = {
    "exists_without_force": _existing,
    "same_as_report": lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "o.onnx", "--report", t / "r.json",
                                         "--report-html", t / "r.json"],
    "same_as_model": lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "o.onnx", "--report-html", t / "model.onnx"],
    "same_as_out": lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "o.onnx", "--report-html", t / "o.onnx"],
    "folder_missing": lambda t, wm, wn: [wm(), "--calib", wn(), "--out", t / "o.onnx", "--report-html", t / "no" / "r.html"],
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_before_any_work_with_exit_6(name, cli, write_model, write_npz, tmp_path):
    argv = REFUSED[name](tmp_path, write_model, write_npz)
    before = files_in(tmp_path)
    result = cli(*argv, "--criterion", "linf")
    assert result.code == 6, (result.code, result.err)
    assert len(result.err_lines) == 1 and result.err_lines[0].startswith("error: ")
    assert files_in(tmp_path) == before


def test_force_replaces_an_existing_page(cli, write_model, write_npz, tmp_path):
    argv = _existing(tmp_path, write_model, write_npz)
    result = cli(*argv, "--criterion", "linf", "--force", "--no-sanity-check")  # random model, random labels
    assert result.code == 0, result.err
    assert (tmp_path / "r.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r.html")]   # no temp file left


def test_probe_run_shows_detection_probes_and_their_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from digits_backdoor import trained
    from sanitizer.cli import main

    import onnx

    model, calib, _, _ = trained(poisoned=True)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", X=calib.astype(np.uint8))
    code = main([str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--out", str(tmp_path / "o.onnx"),
                 "--max-acc-drop", "0.06", "--report", str(tmp_path / "r.json"), "--report-html", str(tmp_path / "r.html")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert report["detection"]["verdict"] in page
    used = [p for p in report["probes"]["probes"] if p["used"]]
    for probe, after in zip(used, report["held_out_after"]["probe_flip"]):
        assert (f"<td>{probe['probe']}</td><td>yes</td><td class=\"n\">{rate(probe['flip_before'])}</td>"
                f"<td class=\"n\">{rate(after)}</td>") in page
    assert len(_links(page).urls) == 3   # pruning curve, ℓ∞ histograms, probes
    assert "ℓ∞ of the top suspect units" in page and "Probes on a clean image" in page


def test_page_renders_in_chromium(cli, tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import screenshot_report
    finally:
        sys.path.remove(str(SCRIPT.parent))
    if screenshot_report.browser() is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium); the page was not rendered")
    assert _demo_run(cli, tmp_path).code == 0
    res = subprocess.run([sys.executable, SCRIPT, tmp_path / "r.html", tmp_path / "shot.png", "--height", "1200"],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    from PIL import Image

    with Image.open(tmp_path / "shot.png") as shot:
        assert shot.size == (1200, 1200)
        gray = np.asarray(shot.convert("L"))
    # text, tables and the figure: a blank or error page is nearly one colour
    assert (gray < 128).mean() > 0.01 and gray.std() > 20


def test_reattack_table_shows_the_control_per_probe():
    from sanitizer.report_html import _probes

    pr = {"probes": [], "target": 0, "source": "synthesized", "ranking": "relative", "chosen": "pruned",
          "candidates": [], "reattack": {"silenced": True, "max_fresh_flip": 0.4, "bars": {"patch 2x2 at (0, 0)": 0.05},
                                     "fresh_probe_flip": {"patch 2x2 at (0, 0)": 0.4},
                                     "control": {"class": {"patch 2x2 at (0, 0)": 7}, "max_fresh_flip": 0.45,
                                                 "fresh_probe_flip": {"patch 2x2 at (0, 0)": 0.45}}}}
    page = _probes(pr, {})
    assert "<td class=\"n\">7</td>" in page and "control flip rate" in page and "0.4500" in page and "removed" in page
