"""Detection alone (defense.detect.detect, as the default run does it) on each case of a suite: verdict, candidates
and seconds. A benchmark, not a test.

    python scripts/detect_suite.py ../shared/bench/suite [--cases a,b]

Prints one JSON line per case: the verdict, what found it, the scan's candidate classes, the best patch flip
toward the target and toward any other class, the same per probe family where the family scan ran, the mask search's largest anomaly (when it ran), wall and CPU
(user+sys) seconds and the load average when the case started (the machine may be shared)."""
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
from sanitizer.defense.detect import detect  # noqa: E402
from sanitizer.pipeline import prepare, split  # noqa: E402


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", type=Path)
    ap.add_argument("--cases", default=None, help="only these cases (comma-separated)")
    args = ap.parse_args()
    wanted = set(args.cases.split(",")) if args.cases else None
    for case in load_suite(args.suite):
        if wanted and case.name not in wanted:
            continue
        opts = case_options(case, "probe")
        prep = prepare(opts)
        fit, _ = split(prep.calib.n, opts.holdout, opts.seed)
        load, wall, cpu = os.getloadavg()[0], time.perf_counter(), cpu_seconds()
        found = detect(prep, fit, opts.seed, lambda *a: None)
        flips, target = found["patch_scan"]["best_flip"], int(case.meta["target"])
        backdoored = bool(case.meta.get("backdoored", True))
        others = [f for c, f in enumerate(flips) if not (backdoored and c == target)]
        row = {"case": case.name, "true_target": target if backdoored else None, "verdict": found["verdict"],
               "found_by": found["found_by"], "candidates": found["patch_scan"]["candidates"],
               "flip_target": flips[target] if backdoored else None, "flip_best_other": max(others),
               # per probe family (when the family scan ran): the rate toward the target and the best other class
               "family_flip": {f: [rates[target] if backdoored else None,
                                   max(r for c, r in enumerate(rates) if not (backdoored and c == target))]
                               for f, rates in found.get("family_scan", {}).get("best_flip", {}).items()},
               "max_anomaly": (max(a for a in found["neural_cleanse"]["anomaly_index"] if a is not None)
                               if "neural_cleanse" in found else None),
               "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1),
               "load_average_at_start": round(load, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
