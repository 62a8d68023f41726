"""The README's default-defense tables from `sanitize bench --json` files (a benchmark aid, not a test).

    python scripts/suite_tables.py rows1.json [rows2.json ...]

Prints two markdown tables: per case the result of the default defense, and the stop rule judged as a
classifier — its held-out estimate of the accuracy drop (the number it ships or refuses on) against the drop
measured on the case's evaluation set, with the decision the plain command takes and whether the truth
agrees (a false refusal: refused while the measured drop is within the budget; a false ship: the reverse).
"""
from __future__ import annotations

import json
import sys

from sanitizer.defense.effort import cut_stages

def rows(paths: list[str]) -> list[dict]:
    out = []
    for path in paths:
        out += [r for r in json.loads(open(path).read())["rows"] if r["criterion"] == "probe"]
    return out


def bounds(r: dict) -> str:
    b = r.get("probes", {}).get("bounds")
    return "—" if not b or b["quantile"] is None else f"q = {b['quantile']:g}"


def fresh(r: dict) -> str:
    """The fresh probes' best flip toward the target; where some were judged against the control, the place
    where the target led the control most (reattack.py)."""
    ra = r.get("probes", {}).get("reattack")
    if not ra:
        return "—"
    text = f"{ra['max_fresh_flip']:.2f}"
    if "control" in ra:
        ctrl = ra["control"]
        n = max(ctrl["fresh_probe_flip"], key=lambda n: ra["fresh_probe_flip"][n] - ctrl["fresh_probe_flip"][n])
        text += (f"; {n}: {ra['fresh_probe_flip'][n]:.2f} vs {ctrl['fresh_probe_flip'][n]:.2f} toward class "
                 f"{ctrl['class'][n]}")
    return text + (" → removed" if ra["silenced"] else " → still reachable")


def units(r: dict) -> str:
    pr = r.get("probes")
    if not pr:
        return f"{r['units']}/{r['candidates']}"
    return f"{r['units']}/{r['candidates']} ({pr['ranking']}), {pr['chosen']}"


def effort(r: dict) -> str:
    """Each stage's share of the full effort (effort.py), or "full" (or "—": a row from before --time-budget)."""
    e = r.get("effort")
    if not e:
        return "—"
    cut = [f"{stage} {share}" for stage, share in cut_stages(e).items()]
    return ", ".join(cut) if cut else "full"


def default_table(rs: list[dict]) -> str:
    lines = ["| case | clean acc before → after | ASR before → after | units (ranking), kept | bounds | "
             "fresh probes' best flip; place vs any other class | goal | effort | total s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rs:
        asr = "—" if r["asr_before"] is None else f"{r['asr_before']:.4f} → {r['asr_after']:.4f}"
        lines.append(f"| {r['case']} | {r['acc_before']:.4f} → {r['acc_after']:.4f} | {asr} | {units(r)} | "
                     f"{bounds(r)} | {fresh(r)} | {r['goal']} | {effort(r)} | {r['total_seconds']:.0f} |")
    return "\n".join(lines)


def stop_rule_table(rs: list[dict]) -> str:
    lines = ["| case | estimated drop (held-out, n) | 80 % interval | measured drop (eval set) | decision | "
             "truth | rule right? |",
             "|---|---|---|---|---|---|---|"]
    for r in rs:
        h = r["held_out"]
        measured = r["acc_before"] - r["acc_after"]
        ships = h["drop_estimate"] <= r["max_acc_drop"]
        fits = measured <= r["max_acc_drop"]
        right = "yes" if ships == fits else ("false refusal" if fits else "false ship")
        lo, hi = h["drop_interval90"]
        lines.append(f"| {r['case']} | {h['drop_estimate']:.4f} ({h['n']}) | {lo:.4f} .. {hi:.4f} | {measured:.4f} | "
                     f"{'ship' if ships else 'refuse'} | {'within' if fits else 'over'} | {right} |")
    return "\n".join(lines)


if __name__ == "__main__":
    rs = rows(sys.argv[1:])
    print(default_table(rs))
    print()
    print(stop_rule_table(rs))
