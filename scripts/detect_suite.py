"""Detection alone (defense.detect.detect, as the default run does it) on each case of a suite: verdict, candidates
and seconds. A benchmark, not a test.

    python scripts/detect_suite.py ../shared/bench/suite [--cases a,b] [--sides 0.15,0.2,0.3]

Prints one JSON line per case: the verdict, what found it (and the patch side that did, and a finding it
overruled), the scan's candidate classes, the best patch flip toward the target and toward any other class, the
same per patch side tried and per probe family where the family scan ran, the mask search's largest anomaly (when
it ran), wall and CPU (user+sys) seconds and the load average when the case started (the machine may be shared).
With --sides: instead of detection, the patch scan at each of those shares of the image side alone (any class,
then the candidates; detect.scan with one side), the flips toward the target and the best other class per side."""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sanitizer.bench import case_options, load_suite  # noqa: E402
from sanitizer.defense.detect import SCAN_IMAGES, _Reach, detect, scan  # noqa: E402
from sanitizer.pipeline import prepare, split  # noqa: E402


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", type=Path)
    ap.add_argument("--cases", default=None, help="only these cases (comma-separated)")
    ap.add_argument("--sides", default=None, help="the patch scan alone at each of these shares of the image side")
    args = ap.parse_args()
    wanted = set(args.cases.split(",")) if args.cases else None
    for case in load_suite(args.suite):
        if wanted and case.name not in wanted:
            continue
        opts = case_options(case, "probe")
        prep = prepare(opts)
        fit, _ = split(prep.calib.n, opts.holdout, opts.seed)
        load, wall, cpu = os.getloadavg()[0], time.perf_counter(), cpu_seconds()
        target, backdoored = int(case.meta["target"]), bool(case.meta.get("backdoored", True))

        def toward(rates) -> list:
            """[the rate toward the target (None: no backdoor), the best toward any other class]"""
            rates = [float(r) if r is not None else 0.0 for r in rates]
            return [round(rates[target], 4) if backdoored else None,
                    round(max(r for c, r in enumerate(rates) if not (backdoored and c == target)), 4)]

        if args.sides:
            raw = prep.calib.subset(fit).read(0, len(fit))
            reach = _Reach(prep.model, raw, prep.pre, opts.seed, SCAN_IMAGES, prep.spec)
            row = {"case": case.name}
            for share in map(float, args.sides.split(",")):
                side = scan(prep.model, raw, prep.pre, opts.seed, spec=prep.spec, reach=reach, shares=(share,))
                row[f"{share:g} ({reach.opt.side(share)} px)"] = toward(side.best_flip)
            print(json.dumps(row), flush=True)
            continue
        found = detect(prep, fit, opts.seed, lambda *a: None)
        patch = found["patch_scan"]
        row = {"case": case.name, "true_target": target if backdoored else None, "verdict": found["verdict"],
               "found_by": found["found_by"], "found_at_side": patch["found_at_side"],
               "overruled": found.get("overruled"), "candidates": patch["candidates"],
               "flip_target": toward(patch["best_flip"])[0], "flip_best_other": toward(patch["best_flip"])[1],
               # per patch side (pixels) and per probe family (when the family scan ran): the rate toward the
               # target and the best other class
               "side_flip": {side: toward(rates) for side, rates in patch["by_side"].items()},
               "family_flip": {f: toward(rates) for f, rates in found.get("family_scan", {}).get("best_flip", {}).items()},
               "max_anomaly": (max(a for a in found["neural_cleanse"]["anomaly_index"] if a is not None)
                               if "neural_cleanse" in found else None),
               "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1),
               "load_average_at_start": round(load, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
