"""The sanity gate's false alarms on a bench suite: the gate alone, on every case's calibration images.

    nice -n 10 python scripts/sanity_suite.py ../shared/bench/suite

Each case is opened with the preprocessing its case.toml gives, as `sanitize bench` does
(sanitizer.bench.case_options), and the original model is judged by sanitizer.sanity.check_original twice:
without labels, as the bench runs it, and with the calibration labels, as a plain run on a labelled npz
does. Prints one markdown row per case and judgement; exits 1 when the gate trips on any (a false alarm:
the suite's models are sound and their preprocessing right).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calib.preprocess import input_spec, resolve_preprocess  # noqa: E402
from sanitizer.bench import case_options, load_suite  # noqa: E402
from sanitizer.model_io import load_model  # noqa: E402
from sanitizer.pipeline import open_data  # noqa: E402
from sanitizer.sanity import check_original  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", type=Path)
    args = parser.parse_args()
    print("| case | labels | images | classes | covered (floor) | input range | top class share | accuracy "
          "| κ (upper 99.9 %) | output | s | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    alarms = 0
    for case in load_suite(args.suite):
        opts = case_options(case, "linf")
        model = load_model(opts.model).model
        spec = input_spec(model, opts.input_name, opts.layout)
        pre = resolve_preprocess(spec, scale=opts.scale, mean=opts.mean, std=opts.std, layout=opts.layout)
        data = open_data(opts.calib, spec)
        for labeled in (False, True):
            start = time.perf_counter()
            r = check_original(model, spec, pre, data, labels=data.labels if labeled else None, enforce=False)
            seconds = time.perf_counter() - start
            alarms += r["tripped"] is not None
            lo, hi = r["input_range"]
            acc = f"{r['accuracy']:.3f}" if labeled else "—"
            kappa = f"{r['kappa']:.3f} ({r['kappa_upper999']:.3f})" if labeled else "—"
            print(f"| {case.name} | {'yes' if labeled else 'no'} | {r['images']} | {r['classes']} | "
                  f"{r['covered']} ({r['coverage_floor']}) | {lo:.3g}..{hi:.3g} | {r['top_share']:.3f} (class {r['top_class']}) | {acc} | {kappa} | "
                  f"{r['output']['kind']} | {seconds:.1f} | {r['tripped'] or 'passed'} |", flush=True)
    return 1 if alarms else 0


if __name__ == "__main__":
    sys.exit(main())
