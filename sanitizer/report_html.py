"""`--report-html PATH`: the run on one self-contained page a reviewer opens in a browser.

Everything is inline — the `--plots` figures as base64 PNG data URIs, the style in a <style> block, no
script, no link to anything — so the page can be attached to a pipeline run or mailed as one file. Every
number is read from the report dict `pipeline.sanitize` returns (the one `--report` writes as JSON), so the
page and the JSON cannot disagree."""
from __future__ import annotations

import base64
import html

from .plots import FILES

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { padding: 0.8em 1em; border-left: 0.4em solid; margin: 1em 0; }
.ok { background: #eef8ee; border-color: #3a3; } .warn { background: #fff7e6; border-color: #e90; }
.bad { background: #fdecec; border-color: #c33; }
img { max-width: 100%; border: 1px solid #ddd; } pre { background: #f6f6f6; padding: 0.7em; white-space: pre-wrap; }
.note { color: #666; }
"""


def rate(x: float | None) -> str:
    """How every rate (agreement, accuracy, ASR, flip rate, bound) is printed on the page."""
    return "—" if x is None else f"{x:.4f}"


def _e(x) -> str:
    return html.escape(str(x))


def _table(header: list[str] | None, rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _figure(pngs: dict[str, bytes], name: str, alt: str) -> str:
    data = base64.b64encode(pngs[name]).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def verdict(report: dict) -> tuple[str, str]:
    """(css class, one sentence) saying what the run decided."""
    plan, held = report["plan"], report["held_out_after"]
    detection = report.get("detection")
    refused = report.get("evaluation", {}).get("refused")
    if refused:
        return "bad", (f"Degraded, written only because of --allow-degraded: {refused}; {plan['count']} of "
                       f"{plan['candidates']} units pruned ({report['criterion']}).")
    if detection is not None and detection["suspected_target"] is None:
        return "ok", "No backdoor found: nothing pruned, the model is unchanged."
    budget = (f"held-out agreement {rate(held['agreement'])}, estimated accuracy drop {rate(held['drop_estimate'])} "
              f"(budget {report['max_acc_drop']:g})")
    if report["degraded"]:
        return "bad", (f"Degraded, written only because of --allow-degraded: {plan['count']} of {plan['candidates']} "
                       f"units pruned; {budget}.")
    if plan["count"] == 0:
        return "warn", f"Nothing pruned: no unit of the ranking could go within the budget; {budget}."
    line = f"Sanitized: {plan['count']} of {plan['candidates']} units pruned ({report['criterion']}); {budget}."
    if "probe_flip" in held:
        line += f" Worst probe flip rate after: {rate(max(held['probe_flip']))}."
    return "ok", line


def _before_after(report: dict) -> list[list]:
    held = report["held_out_after"]
    lo, hi = held["interval90"]
    rows = [["held-out agreement with the original", rate(1.0),
             f"{rate(held['agreement'])} (80 % interval {rate(lo)}–{rate(hi)}, n={held['n']})"],
            [f"estimated accuracy drop, judged on {held['judged_on']}", "—",
             f"{rate(held['drop_estimate'])} (80 % interval {rate(held['drop_interval90'][0])}–"
             f"{rate(held['drop_interval90'][1])}; budget {report['max_acc_drop']:g})"]]
    ev = report.get("evaluation")
    if ev:
        for key, label in (("clean_acc", "clean accuracy (--eval-data)"), ("asr", "attack success rate (--eval-triggered)")):
            if ev["before"][key] is not None:
                rows.append([label, rate(ev["before"][key]), rate(ev["after"][key])])
        if "asr_evidence" in ev:
            e = ev["asr_evidence"]
            natural = ("unknown" if e["natural_rate"] is None else
                       f"{rate(e['natural_rate'])}, 80 % interval {rate(e['natural_interval80'][0])}–"
                       f"{rate(e['natural_interval80'][1])}")
            rows.append(["ASR 80 % interval and the bar it must not lie wholly above (5 % + the lower end of the "
                         "result's rate toward the target on --eval-data images of other classes)", "—",
                         f"{rate(e['interval80'][0])}–{rate(e['interval80'][1])}; bar {rate(e['bar'])} "
                         f"(natural rate {natural})"])
    if "probes" in report and "probe_flip" in held:
        used = [p for p in report["probes"]["probes"] if p["used"]]
        rows.append(["worst probe flip rate (held-out)", rate(max(p["flip_before"] for p in used)),
                     rate(max(held["probe_flip"]))])
    rows.append(["units pruned", "0", f"{report['plan']['count']} of {report['plan']['candidates']}"])
    return rows


def _detection(det: dict) -> str:
    from .defense.detect import evidence

    flips = det["patch_scan"]["best_flip"]
    nc = det.get("neural_cleanse")
    header = ["class", "best patch flip rate"] + (["mask anomaly index", "mask ℓ1"] if nc else [])
    rows = [[c, rate(f)] + ([f"{nc['anomaly_index'][c]:.2f}", f"{nc['mask_l1'][c]:.1f}"] if nc else [])
            for c, f in enumerate(flips)]
    return (f"<p><b>{_e(det['verdict'])}</b>" + (f" (found by {_e(det['found_by'])})" if det["found_by"] else "")
            + f"; {_e(evidence(det))}; {det['seconds']} s.</p>" + _table(header, rows, set(range(1, len(header)))))


def _probes(pr: dict, held: dict) -> str:
    after = iter(held.get("probe_flip", []))
    rows = [[p["probe"], "yes" if p["used"] else "no", rate(p["flip_before"]), rate(next(after, None)) if p["used"] else "—"]
            for p in pr["probes"]]
    out = (f"<p>Target class {_e(pr['target'])}, probes {_e(pr['source'])}; ranking kept: {_e(pr['ranking'])}; "
           f"model kept: {_e(pr['chosen'])}.</p>"
           + _table(["probe", "used", "flip rate before", "flip rate after (held-out)"], rows, {2, 3}))
    rows = [[c["name"], rate(c["agreement"]), rate(c["drop_estimate"]), rate(max(c["probe_flip"])) if c["probe_flip"] else "—",
             "yes" if c["probes_silenced"] else "no"] for c in pr["candidates"]]
    out += _table(["candidate", "held-out agreement", "estimated drop", "worst probe flip", "probes silenced"],
                  rows, {1, 2, 3})
    bounds = pr.get("bounds")
    if bounds:
        kept = "none kept" if bounds["quantile"] is None else f"kept: quantile {bounds['quantile']:g} on {bounds['sites']} sites"
        out += f"<p>Activation bounds (clean ℓ∞ quantile per unit), {_e(kept)}.</p>" + _table(
            ["quantile", "held-out agreement", "estimated drop", "worst probe flip"],
            [[f"{t['quantile']:g}", rate(t["agreement"]), rate(t["drop_estimate"]), rate(max(t["probe_flip"]))]
             for t in bounds["tried"]], {1, 2, 3})
    fresh = pr.get("reattack")
    if fresh:
        control = fresh.get("control")
        against = "; where one is over its bar, the same probe toward any other class (control)" if control else ""

        def other(n):
            if n not in control["fresh_probe_flip"]:
                return ["—", "—"]
            return [str(control["class"][n]), rate(control["fresh_probe_flip"][n])]
        out += (f"<p>Re-attack: probes synthesized afresh against the result{_e(against)}; backdoor "
                f"{'removed' if fresh['silenced'] else '<b>still reachable</b>'}.</p>"
                + _table(["fresh probe", "flip rate", "bar"] + (["control class", "control flip rate"] if control else []),
                         [[n, rate(f), rate(fresh["bars"].get(n)) if n in fresh["bars"] else "—"]
                          + (other(n) if control else [])
                          for n, f in fresh["fresh_probe_flip"].items()], {1, 2, 3, 4}))
    return out


def _curve(report: dict) -> str:
    rows = []
    for t in report["plan"]["trace"]:
        if "agreement" not in t:
            continue
        # the probe search's rows carry agreement and flip rates; only its final row is judged on the budget
        rows.append([t["units"] if "final" not in t else f"{t['units']} ({t['final']})", rate(t["agreement"]),
                     rate(t.get("drop_estimate")), {True: "yes", False: "no"}.get(t.get("within_budget"), "—")]
                    + ([rate(max(t["probe_flip"]))] if "probe_flip" in t else []))
    header = ["units pruned", "held-out agreement", "estimated drop", "within budget"]
    if any(len(r) > 4 for r in rows):
        header.append("worst probe flip")
        rows = [r + ["—"] * (5 - len(r)) for r in rows]
    return _table(header, rows, {1, 2, 4})


def _run_facts(report: dict) -> str:
    pre, cal = report["preprocess"], report["calibration"]
    rows = [["input model", f"{report['input']['model']} (sha256 {report['input']['sha256']})"]]
    if "output" in report:
        rows.append(["sanitized ONNX", f"{report['output']['onnx']} (sha256 {report['output']['sha256']})"])
    rows += [["calibration", f"{cal['source']}: {cal['images']} images, {cal['fit']} fit / {cal['held_out']} held out, "
                             f"labels {'used' if cal['labels_used'] else 'not used'}, seed {cal['seed']}"],
             ["preprocessing", ", ".join(f"{k}={v}" for k, v in sorted(pre.items()))],
             ["provider", report["provider"]],
             ["timings (s)", ", ".join(f"{k} {v}" for k, v in report.get("timings_seconds", {}).items())],
             ["machine", f"Python {report['machine']['python']}, {report['machine']['platform']}"],
             ["tool", report["tool"]]]
    return _table(None, rows)


def page(report: dict, pngs: dict[str, bytes], command: str | None) -> str:
    """The HTML page (UTF-8 text) for `report` (the dict `pipeline.sanitize` returns).

    `pngs`: figures by FILES name from `plots.render` — empty when matplotlib is not installed, in which case
    the page says so and keeps every number in its tables. `command`: the command line, shown as given."""
    cls, line = verdict(report)
    parts = [f"<h1>sanitize report</h1><p>{_e(report['input']['model'])}</p>",
             f'<div class="verdict {cls}"><b>{_e(line)}</b></div>',
             "<h2>Before and after</h2>", _table(["", "before", "after"], _before_after(report), {1, 2})]
    if "detection" in report:
        parts += ["<h2>Detection</h2>", _detection(report["detection"])]
    from .defense.effort import summary

    cut = summary(report.get("effort", {}))
    if cut:
        parts.append(f'<p class="note">{_e(cut)}</p>')
    if "probes" in report:
        parts += ["<h2>Probes</h2>", _probes(report["probes"], report["held_out_after"])]
    parts.append("<h2>Pruning curve</h2>")
    if not pngs:
        parts.append('<p class="note">Figures need matplotlib: pip install \'onnx-backdoor-sanitizer[plots]\'. '
                     "The numbers are all in the tables.</p>")
    if FILES[0] in pngs:
        parts.append(_figure(pngs, FILES[0], "pruning curve"))
    parts.append(_curve(report))
    if FILES[1] in pngs:
        parts += ["<h2>ℓ∞ of the top suspect units, clean vs probed images</h2>",
                  _figure(pngs, FILES[1], "l-infinity histograms")]
    if FILES[2] in pngs:
        parts += ["<h2>Probes on a clean image</h2>", _figure(pngs, FILES[2], "probes")]
    pruned = report["plan"]["pruned"]
    parts += ["<h2>Layers touched</h2>",
              _table(["layer", "units pruned", "unit indices"],
                     [[name, len(units), ", ".join(map(str, units))] for name, units in pruned.items()], {1})
              if pruned else "<p>None.</p>",
              f"<p class=\"note\">Scope: {len(report['scope'])} layer(s): {_e(', '.join(report['scope']))}.</p>",
              "<h2>Run</h2>", _run_facts(report)]
    if command is not None:
        parts += ["<h2>Command</h2>", f"<pre>{_e(command)}</pre>"]
    title = f"sanitize report: {report['input']['model']}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
