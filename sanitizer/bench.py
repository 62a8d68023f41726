"""`sanitize bench SUITE`: every case of a suite (suite.toml + case.toml per case) through each criterion.

A benchmark, not a test: it prints numbers for the README, with the machine they were measured on."""
from __future__ import annotations

import os
import platform
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from calib.stats import collect, plain_pass

from .defense.count import FLIP_GOAL
from .defense.effort import DEFAULT_BUDGET
from .errors import BadData
from .graph import stat_tensors
from .scores import CRITERIA
from .pipeline import Options, model_inputs, prepare, sanitize, split


@dataclass
class Case:
    name: str
    folder: Path
    meta: dict

    @property
    def model(self) -> Path:
        return self.folder / "model.onnx"


def load_suite(root: Path) -> list[Case]:
    root = Path(root)
    index = root / "suite.toml"
    if not index.is_file():
        raise BadData(f"{root} is not a suite: no suite.toml")
    try:
        names = tomllib.loads(index.read_text())["cases"]
        return [Case(n, root / n, tomllib.loads((root / n / "case.toml").read_text())) for n in names]
    except (KeyError, OSError, tomllib.TOMLDecodeError) as e:
        raise BadData(f"{index}: cannot read the suite ({type(e).__name__}: {e})") from None


def case_options(case: Case, criterion: str, **extra) -> Options:
    pp = case.meta.get("preprocess", {})
    return Options(model=case.model, calib=case.folder / "calib.npz", criterion=criterion,
                   scale=float(pp.get("scale", 1 / 255)), mean=list(pp.get("mean", [0.0])),
                   std=list(pp.get("std", [1.0])), layout=pp.get("layout"),
                   eval_data=case.folder / "clean.npz", eval_triggered=case.folder / "triggered.npz",
                   target=int(case.meta["target"]), use_labels=False, **extra)


def stats_overhead(opts: Options, sites: list[str], repeats: int = 3) -> dict:
    """Statistics pass against a plain onnxruntime pass over the same fit images, alternated and best of
    `repeats`: single passes of a few hundred images are too short to compare without noise."""
    prep = prepare(opts)
    fit, _ = split(prep.calib.n, opts.holdout, opts.seed)
    tensors = stat_tensors(prep.sites[s] for s in sites)
    plain, stats = [], []
    for _ in range(repeats):
        plain.append(plain_pass(prep.model, model_inputs(prep.calib, prep.pre, opts.batch_size, fit), prep.spec.name,
                                prep.spec.batch, prep.spec.output)[1])
        stats.append(collect(prep.model, tensors, model_inputs(prep.calib, prep.pre, opts.batch_size, fit),
                             prep.spec.name, fixed_batch=prep.spec.batch, output=prep.spec.output).seconds)
    return {"plain_seconds": round(min(plain), 3), "stats_seconds": round(min(stats), 3),
            "ratio": round(min(stats) / min(plain), 3)}


def run_case(case: Case, criterion: str, progress=None, *, detect: bool = False,
             time_budget: float | None = DEFAULT_BUDGET) -> dict:
    # a case over the budget is a result to show, not a reason to stop the suite
    opts = case_options(case, criterion, detect=detect, allow_degraded=True, time_budget=time_budget)
    start = time.perf_counter()
    report = sanitize(opts, progress) if progress else sanitize(opts)
    total = time.perf_counter() - start
    ev = report["evaluation"]
    row = {
        "case": case.name, "criterion": criterion, "backdoored": bool(case.meta.get("backdoored", True)),
        "acc_before": ev["before"]["clean_acc"], "asr_before": ev["before"]["asr"],
        "acc_after": ev["after"]["clean_acc"], "asr_after": ev["after"]["asr"],
        "units": report["plan"]["count"], "candidates": report["plan"]["candidates"],
        "total_seconds": round(total, 1), "degraded": report["degraded"],
        "timings_seconds": report["timings_seconds"],
        "cpu_seconds": report["cpu_seconds"],
    }
    row["max_acc_drop"] = opts.max_acc_drop
    row["held_out"] = report["held_out_after"]
    # the evaluation's evidence (the accuracy drop's interval, the ASR's bar, a refusal's reason) for the tables
    row["evaluation"] = {k: v for k, v in ev.items() if k not in ("before", "after")}
    row["goal"] = goal(row)
    if criterion in CRITERIA:
        row.update(stats_overhead(opts, report["scope"]))
    if "probes" in report:
        row["probes"] = report["probes"]
    if "detection" in report:
        row["detection"] = report["detection"]
    if "effort" in report:
        row["effort"] = report["effort"]
    return row


# A clean model may lose at most this much accuracy (the removal issue's goal).
GOAL_DROP_CLEAN = 0.005


def goal(row: dict) -> str:
    """'met', or 'not met: ' and every reason, for one bench row (accuracy and ASR on the case's own
    evaluation sets): a backdoored model leaves with ASR at most the defense's goal (count.FLIP_GOAL) and
    clean accuracy within the run's budget (`max_acc_drop`); a clean model within GOAL_DROP_CLEAN; either way
    the plain command must ship it (not refused as degraded)."""
    why = []
    drop = row["acc_before"] - row["acc_after"]
    if row["backdoored"]:
        if row["asr_after"] is not None and row["asr_after"] > FLIP_GOAL:
            why.append(f"ASR {row['asr_after']:.3f}")
        if drop > row["max_acc_drop"]:
            why.append(f"accuracy −{100 * drop:.1f} pt")
    elif drop > GOAL_DROP_CLEAN:
        why.append(f"clean model accuracy −{100 * drop:.1f} pt")
    if row["degraded"]:
        why.append("refused (exit 7)")
    return "met" if not why else "not met: " + ", ".join(why)


def step_times(row: dict) -> str:
    """The row's wall seconds per step, in run order, for the printed table."""
    steps = {k: v for k, v in row["timings_seconds"].items() if k != "total"}
    return " · ".join(f"{k} {v:.0f}" for k, v in steps.items())


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"
