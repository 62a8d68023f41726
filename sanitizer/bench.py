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

from .defense.count import FLIP_GOAL, USE_FLIP
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
    """The cases `root`/suite.toml lists (`cases = ["name", ...]`), each with its case.toml read and checked
    (_checked_meta). Raises BadData (exit 5) naming the file and the field on any mistake."""
    root = Path(root)
    index = root / "suite.toml"
    if not index.is_file():
        raise BadData(f"{root} is not a suite: no suite.toml")
    try:
        names = tomllib.loads(index.read_text())["cases"]
    except (KeyError, OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BadData(f"{index}: cannot read the suite ({type(e).__name__}: {e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise BadData(f'{index}: cases must be a list of case folder names, e.g. cases = ["a", "b"]')
    cases = []
    for n in names:
        path = root / n / "case.toml"
        try:
            meta = tomllib.loads(path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise BadData(f"{path}: cannot read the case ({type(e).__name__}: {e})") from None
        cases.append(Case(n, root / n, _checked_meta(path, meta)))
    return cases


def _is_number(value) -> bool:
    """An int or float read from TOML (a boolean is an int to Python, not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(path: Path, key: str, value) -> list[float]:
    """A number or a list of numbers (per channel) as a list of floats; BadData naming `key` otherwise."""
    values = value if isinstance(value, list) else [value]
    if not values or not all(_is_number(v) for v in values):
        raise BadData(f"{path}: preprocess.{key} must be a number or a list of numbers, got {value!r}")
    return [float(v) for v in values]


def _checked_meta(path: Path, meta: dict) -> dict:
    """case.toml's fields the bench reads (../shared/bench/README.md's format), checked: an integer `target` ≥ 0
    (a clean case names the class its triggered.npz is scored against too), a boolean `backdoored` if given,
    `preprocess` a table of a number `scale`, a number or list of numbers `mean` and `std` (normalised here
    to lists) and a `layout` of "nchw" or "nhwc" if given. Raises BadData naming the field."""
    target = meta.get("target")
    if target is None:
        raise BadData(f"{path}: no target — the class triggered.npz is scored against (a clean case names one too)")
    if not isinstance(target, int) or isinstance(target, bool) or target < 0:
        raise BadData(f"{path}: target must be a class index (an integer ≥ 0), got {target!r}")
    if not isinstance(meta.get("backdoored", True), bool):
        raise BadData(f"{path}: backdoored must be true or false, got {meta['backdoored']!r}")
    pp = meta.get("preprocess", {})
    if not isinstance(pp, dict):
        raise BadData(f"{path}: preprocess must be a table, e.g. preprocess = {{ scale = 0.00392, layout = \"nchw\" }}")
    checked = dict(pp)
    scale = pp.get("scale", 1 / 255)
    if not _is_number(scale):
        raise BadData(f"{path}: preprocess.scale must be a number, got {scale!r}")
    checked["scale"] = float(scale)
    checked["mean"] = _numbers(path, "mean", pp.get("mean", [0.0]))
    checked["std"] = _numbers(path, "std", pp.get("std", [1.0]))
    if pp.get("layout") not in (None, "nchw", "nhwc"):
        raise BadData(f'{path}: preprocess.layout must be "nchw" or "nhwc", got {pp["layout"]!r}')
    return {**meta, "preprocess": checked}


def case_options(case: Case, criterion: str, **extra) -> Options:
    pp = case.meta.get("preprocess", {})
    return Options(model=case.model, calib=case.folder / "calib.npz", criterion=criterion,
                   scale=pp["scale"], mean=pp["mean"], std=pp["std"], layout=pp.get("layout"),
                   eval_data=case.folder / "clean.npz", eval_triggered=case.folder / "triggered.npz",
                   target=case.meta["target"], use_labels=False, **extra)


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
    if row["backdoored"] and row["asr_before"] is not None and row["asr_before"] < USE_FLIP:
        # the case's triggered images do not reach its target on the original: its ASR after measures nothing
        why.append(f"ASR before only {row['asr_before']:.3f}: the case's target or triggered set is wrong")
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
