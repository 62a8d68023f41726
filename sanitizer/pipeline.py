"""The whole job as plain functions: model + clean images → plan → exact rewrite → evaluated ONNX (→ engine).

Nothing here prints or exits; progress goes through a callback and failures are SanitizeError."""
from __future__ import annotations

import importlib.util
import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from calib.data import Dataset, open_dataset
from calib.preprocess import InputSpec, Preprocess, input_spec, resolve_preprocess
from calib.stats import collect, probe_shapes

from . import rewrite
from .atomic import check_writable, write_text
from .defense import defend
from .defense import effort as effort_sizing
from .defense.defend import probe_work, unconfirmed
from .defense.defend import work as defense_work
from .defense.count import FLIP_GOAL, USE_FLIP
from .defense.detect import Leads, detect, other_targets
from .defense.effort import FULL
from .defense.torchnet import pixel_range
from .engine import ENGINE_SUFFIXES, is_engine
from .errors import BadData, BadModel, SanitizeError, ExitCode
from .evaluate import Predictor, accuracy, agreement, attack_success, class_kept, probabilities, wilson
from .graph import Site, blocked_reasons, find_sites, last_stage, stat_tensors
from .model_io import LoadedModel, check, load_model, save_model, sha256_file
from .plan import Plan, largest_ok, rank, safe_limit
from .sanity import check_original
from .scores import CRITERIA, normalised

PROBE = "probe"
MIN_SUSPECTS = 5  # per half of --suspect
MIN_SPLIT = 20   # images on each side of the fit / held-out split: fewer gives no usable agreement bound


@dataclass
class Options:
    model: Path
    calib: Path
    out: Path | None = None
    criterion: str = "probe"              # probe (needs torch) or a clean-data statistic of scores.CRITERIA
    layers: str | None = None           # None: last conv stage; "all"; or comma-separated site names
    ratio: float | None = None
    max_acc_drop: float = 0.02
    holdout: float = 0.5
    scale: float = 1 / 255
    mean: list[float] | None = None
    std: list[float] | None = None
    layout: str | None = None
    input_name: str | None = None
    output_name: str | None = None      # the classifier output, when the model has several float [N, K] ones
    input_size: tuple[int, int] | None = None   # (H, W) for a model with dynamic height and width
    sanity_check: bool = True           # refuse when the original fails on the calibration images (sanity.py)
    eval_data: Path | None = None
    eval_triggered: Path | None = None
    target: int | None = None
    report: Path | None = None
    force: bool = False
    allow_degraded: bool = False
    seed: int = 0
    batch_size: int = 64
    use_labels: bool = True             # judge the stop rule on accuracy when --calib is labeled
    detect: bool = False                # synthesize a trigger per class first (needs torch); clean verdict → prune nothing
    suspect: Path | None = None         # images believed to carry the trigger: they replace detection and probes
    plots: Path | None = None           # folder for the PNG figures (needs matplotlib)
    report_html: Path | None = None     # one self-contained HTML page (figures inlined when matplotlib is there)
    command: str | None = None          # the command line that asked for this run, shown in the HTML report
    time_budget: float | None = effort_sizing.DEFAULT_BUDGET   # seconds the searches are sized to; None: full effort

    @property
    def figures_wanted(self) -> bool:
        return self.plots is not None or self.report_html is not None


Progress = Callable[[str, int, int], None]   # (stage, done, total)


def _quiet(stage: str, done: int, total: int) -> None:
    pass


class StepClock:
    """Wall and CPU (this process, all threads) seconds per step of a run, read off the progress reports it
    passes on: a step lasts from its stage's first report until another stage reports (or the run ends); a
    stage that comes back adds to its total. Steps are the progress stages, so timing needs no hook of its
    own in the steps' code. CPU seconds say what a step costs when the machine is shared."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._stage: str | None = None
        self._since, self._cpu_since = time.perf_counter(), time.process_time()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.switch(stage)
        self.progress(stage, done, total)

    def switch(self, stage: str | None) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if self._stage is not None:
            self.seconds[self._stage] = self.seconds.get(self._stage, 0.0) + now - self._since
            self.cpu[self._stage] = self.cpu.get(self._stage, 0.0) + cpu - self._cpu_since
        self._stage, self._since, self._cpu_since = stage, now, cpu

    def finish(self) -> tuple[dict[str, float], dict[str, float]]:
        """Wall and CPU seconds per step, in the order the steps ended."""
        self.switch(None)
        return ({k: round(v, 3) for k, v in self.seconds.items()}, {k: round(v, 3) for k, v in self.cpu.items()})


@dataclass
class Prepared:
    loaded: LoadedModel
    spec: InputSpec
    pre: Preprocess
    calib: Dataset
    sites: dict[str, Site]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def model(self) -> onnx.ModelProto:
        return self.loaded.model


def open_data(path: Path, spec: InputSpec) -> Dataset:
    return open_dataset(path, size=(spec.height, spec.width), channels=spec.channels)


def prepare(opts: Options) -> Prepared:
    start = time.perf_counter()
    loaded = load_model(opts.model)
    spec = input_spec(loaded.model, opts.input_name, opts.layout, output_name=opts.output_name, size=opts.input_size)
    pre = resolve_preprocess(spec, scale=opts.scale, mean=opts.mean, std=opts.std, layout=opts.layout)
    calib = open_data(opts.calib, spec)
    one = pre.apply(calib.read(0, 1))
    if spec.batch:
        one = np.repeat(one, spec.batch, axis=0)
    shapes, ints = probe_shapes(loaded.model, {spec.name: one})
    sites = {s.name: s for s in find_sites(loaded.model, shapes, ints)}
    return Prepared(loaded, spec, pre, calib, sites, {"load": time.perf_counter() - start})


# Sizes `sanitize layers` reads a model with a dynamic height and width at, when no --input-size is given: the
# usual classifier inputs (ImageNet, CIFAR, MNIST, then others), the first the model runs at. Units are channels or
# features, which do not depend on it; a model that runs at one size alone (a Flatten into a Gemm) finds it here.
LISTING_SIZES = (224, 32, 28, 64, 96, 128, 256, 299, 384, 512)


def listed_sites(model: onnx.ModelProto, spec: InputSpec) -> tuple[list[Site], tuple[int, int]]:
    """Every candidate site of `model` (graph.find_sites) and the (height, width) its shapes were read at: the
    spec's, or — where input_spec(..., size_free=True) left a dynamic one None — the first of LISTING_SIZES the
    model runs at. Raises a usage error naming --input-size when it runs at none (BadModel when the size was
    given or static: nothing else to try)."""
    tries = [(spec.height or n, spec.width or n) for n in LISTING_SIZES] if None in (spec.height, spec.width) else []
    for h, w in tries or [(spec.height, spec.width)]:
        shape = [spec.batch or 1] + ([spec.channels, h, w] if spec.layout == "nchw" else [h, w, spec.channels])
        try:
            shapes, ints = probe_shapes(model, {spec.name: np.zeros(shape, np.float32)})
        except BadModel:
            if not tries:
                raise
            continue
        return find_sites(model, shapes, ints), (h, w)
    raise SanitizeError(f"input {spec.name}: the model runs at none of the sizes "
                        f"{', '.join(f'{n}x{n}' for n in LISTING_SIZES)}; give its size with --input-size HxW",
                        ExitCode.USAGE)


def scope(prep: Prepared, layers: str | None) -> list[Site]:
    """The sites `--layers` asks for; empty when none is prunable (the caller refuses, see sanitize)."""
    prunable = [s for s in prep.sites.values() if s.prunable]
    if layers is None:
        return last_stage(prep.model, list(prep.sites.values()))
    if layers == "all":
        # a residual join is channel c of both branches: its units are already conv units upstream
        return [s for s in prunable if s.kind != "join"] or prunable
    chosen = []
    for name in (n.strip() for n in layers.split(",") if n.strip()):
        if name not in prep.sites:
            if name in {n.name for n in prep.model.graph.node}:
                raise SanitizeError(f"--layers: {name} is not a candidate layer: units are the outputs of a Conv, Gemm "
                                    "or MatMul that feed another weighted layer (the last layer's outputs are the "
                                    "classes); see `sanitize layers MODEL`", ExitCode.USAGE)
            raise SanitizeError(f"--layers: no layer named {name!r}; see `sanitize layers MODEL`", ExitCode.USAGE)
        if not prep.sites[name].prunable:
            raise SanitizeError(f"--layers: {name} cannot be pruned exactly ({prep.sites[name].why_blocked})", ExitCode.USAGE)
        chosen.append(prep.sites[name])
    if not chosen:
        raise SanitizeError(f"--layers {layers!r} names no layer; see `sanitize layers MODEL`", ExitCode.USAGE)
    return chosen


def split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic fit / held-out split of the calibration images."""
    if not 0 < holdout < 1:
        raise SanitizeError(f"--holdout must be between 0 and 1, got {holdout}", ExitCode.USAGE)
    n_hold = int(round(n * holdout))
    if n_hold < MIN_SPLIT or n - n_hold < MIN_SPLIT:
        raise BadData(f"calibration set has {n} image{'' if n == 1 else 's'}; need at least {MIN_SPLIT} on each side of the "
                      f"{holdout:.0%} held-out split")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def model_inputs(data: Dataset, pre: Preprocess, batch_size: int, indices: np.ndarray | None = None):
    for _, raw in data.batches(batch_size, indices):
        yield pre.apply(raw)


def predictions(predictor: Predictor, data: Dataset, pre: Preprocess, batch_size: int,
                indices: np.ndarray | None = None) -> tuple[np.ndarray, int | None]:
    """Top-1 classes int [N] of `data` (or its `indices`) and the model's number of classes (None: no image)."""
    parts, classes = [], None
    for x in model_inputs(data, pre, batch_size, indices):
        scores = predictor.logits(x, batch_size)   # argmax per batch: the scores of a whole set are never held
        parts.append(scores.argmax(1))
        classes = scores.shape[1]
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), classes


def predict(predictor: Predictor, data: Dataset, pre: Preprocess, batch_size: int,
            indices: np.ndarray | None = None) -> np.ndarray:
    return predictions(predictor, data, pre, batch_size, indices)[0]


def check_target(target: int | None, classes: int) -> None:
    """Raises a usage error when `target` is not one of the model's `classes` classes: an ASR toward a class
    the model cannot output would read 0, which looks like a removed backdoor."""
    if target is not None and not 0 <= target < classes:
        raise SanitizeError(f"--target {target} is not a class of this model: its output has {classes} classes "
                            f"(0..{classes - 1})", ExitCode.USAGE)


def evaluate(model: onnx.ModelProto, prep_spec: InputSpec, pre: Preprocess, *, data: Path | None,
             triggered: Path | None, target: int | None, batch_size: int = 64, keep: dict | None = None) -> dict:
    """Clean accuracy (needs labels) and ASR: the share of triggered images predicted as `target`, among
    those whose label (when the data has labels) is not the target already — the standard definition, so a
    triggered copy of the whole test set does not count the target class's own images as attacks.
    `keep`: when given, gets the clean images' predictions ("pred", int [N]) and labels ("labels"), and whether
    the triggered images had labels ("triggered_labelled").
    Raises BadData for labels that are not the model's classes, a usage error for such a `target`."""
    predictor = Predictor(model, prep_spec)
    result = {"clean_acc": None, "asr": None, "n_clean": None, "n_triggered": None}
    if data is not None:
        ds = open_data(data, prep_spec)
        if ds.labels is None:
            raise BadData(f"{data} has no labels; clean accuracy needs a labeled folder or an npz with y")
        pred, classes = predictions(predictor, ds, pre, batch_size)
        _check_labels(data, ds.labels, classes)
        result["clean_acc"] = accuracy(pred, ds.labels)
        result["n_clean"] = ds.n
        if keep is not None:
            keep.update(pred=pred, labels=ds.labels)
    if triggered is not None:
        if target is None:
            raise SanitizeError("--triggered needs --target (the attacker's class)", ExitCode.USAGE)
        ds = open_data(triggered, prep_spec)
        pred, classes = predictions(predictor, ds, pre, batch_size)
        check_target(target, classes)
        attacked = np.ones(ds.n, bool)
        if keep is not None:
            keep["triggered_labelled"] = ds.labels is not None
        if ds.labels is not None:
            _check_labels(triggered, ds.labels, classes)
            attacked = ds.labels != target
        if not attacked.any():
            raise BadData(f"{triggered}: every image is labelled {target}, the target: an attack success rate needs "
                          "triggered images of other classes")
        result["asr"] = attack_success(pred[attacked], target)
        result["n_triggered"] = int(attacked.sum())
    return result


def check_same_scale(flag: str, path: Path, spec: InputSpec, calib_top: float, batch_size: int) -> None:
    """Refuse (BadData) evaluation images on another pixel scale than the calibration images' (top of the raw
    range `calib_top`): one preprocessing serves both, so 0..1 floats beside 8-bit calibration images would
    be scaled twice and every number measured on them would be wrong while looking fine."""
    top = max((float(raw.max()) for _, raw in open_data(path, spec).batches(batch_size)), default=0.0)
    if pixel_range(np.asarray(top)) != pixel_range(np.asarray(calib_top)):
        raise BadData(f"{flag} {path}: pixels top out at {top:g} while the calibration images reach {calib_top:g}; "
                      "both must be on the same scale (the same --scale and --mean/--std apply to both)")


def _check_labels(path: Path, labels: np.ndarray, classes: int) -> None:
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= classes:
        raise BadData(f"{path}: labels run {lo}..{hi} but the model has {classes} classes (0..{classes - 1}); "
                      "the labels do not match the model's classes")


class HeldOut:
    """The held-out calibration images, read and preprocessed batch by batch at every prediction (nothing
    per image is kept beyond its index, its label and the original model's prediction)."""

    def __init__(self, prep: Prepared, indices: np.ndarray, batch_size: int, use_labels: bool = True):
        self.data = prep.calib
        self.pre = prep.pre
        self.indices = np.asarray(indices)
        self.labels = prep.calib.subset(self.indices).labels if use_labels else None
        self.spec = prep.spec
        self.batch_size = batch_size
        predictor = Predictor(prep.model, self.spec)
        self.provider = predictor.provider
        # the original's probabilities weigh each changed prediction by how sure it was of the old class
        start = time.perf_counter()
        out = [predictor.logits(x, batch_size) for x in self.batches()]
        # seconds per image of an onnxruntime forward (with reading the images), the session made: effort sizing
        self.forward_seconds = (time.perf_counter() - start) / max(len(self.indices), 1)
        self.reference_prob = (probabilities(np.concatenate(out), self.spec.output_kind).astype(np.float32)
                               if out else np.zeros((0, 0)))
        self.reference = self.reference_prob.argmax(1)

    def batches(self):
        """Preprocessed model inputs, `batch_size` images at a time, in index order."""
        return model_inputs(self.data, self.pre, self.batch_size, self.indices)

    def inputs(self) -> np.ndarray:
        """All held-out inputs as one array, built anew on each call: only the probe path (small calibration
        sets, torch) asks for it."""
        return np.concatenate(list(self.batches()))

    def _predict(self, predictor: Predictor) -> np.ndarray:
        return predict(predictor, self.data, self.pre, self.batch_size, self.indices)

    def predict(self, model: onnx.ModelProto) -> np.ndarray:
        return self._predict(Predictor(model, self.spec))

    def agreement(self, model: onnx.ModelProto):
        return self.agreement_of(self.predict(model))

    def agreement_of(self, pred: np.ndarray):
        """Agreement of predictions already made on these images, in index order."""
        return agreement(self.reference, pred, self.labels, self.reference_prob)


def choose_count(prep: Prepared, order: list[tuple[str, int]], held: HeldOut, opts: Options,
                 progress: Progress) -> Plan:
    """How many units of `order` to prune: a fixed --ratio, or the most the accuracy budget allows."""
    plan = Plan(order)
    limit = safe_limit(order, {name: s.channels for name, s in prep.sites.items()})

    def judge(k: int) -> bool:
        ag = held.agreement(rewrite.apply(prep.model, prep.sites, plan.pruned(k)))
        # the unchanged model loses nothing by definition, however few images bound the loss
        ok = k == 0 or ag.within(opts.max_acc_drop)
        plan.trace.append({"units": k, **ag.to_dict(), "within_budget": ok})
        progress("search", len(plan.trace), 0)
        return ok

    if opts.ratio is not None:
        if not 0 <= opts.ratio <= 1:
            raise SanitizeError(f"--ratio must be between 0 and 1, got {opts.ratio}", ExitCode.USAGE)
        plan.count = min(int(round(opts.ratio * len(order))), limit)
        judge(plan.count)
    else:
        judge(0)
        plan.count = largest_ok(0, limit, judge)
    plan.trace.sort(key=lambda t: t["units"])
    return plan


def rank_units(prep: Prepared, sites: list[Site], criterion: str, fit: np.ndarray, opts: Options,
               progress: Progress) -> tuple[list[tuple[str, int]], dict]:
    if criterion not in CRITERIA:
        raise SanitizeError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}", ExitCode.USAGE)
    tensors = stat_tensors(sites)
    batches = model_inputs(prep.calib, prep.pre, opts.batch_size, fit)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        progress("statistics", done[0], len(fit))

    collected = collect(prep.model, tensors, batches, prep.spec.name, progress=tick, fixed_batch=prep.spec.batch,
                        output=prep.spec.output)
    scores = {s.name: CRITERIA[criterion](collected.stats[s.tensor]) for s in sites}
    if len(scores) > 1:
        scores = normalised(scores)
    info = {"provider": collected.provider}
    return rank(scores), info


def render_plots(opts: Options, prep: Prepared, plan: Plan, report: dict, figures: dict) -> dict[str, bytes]:
    from . import plots

    asr_curve = None
    if opts.eval_triggered is not None and opts.target is not None:
        triggered = open_data(opts.eval_triggered, prep.spec)
        attacked = None if triggered.labels is None else np.flatnonzero(triggered.labels != opts.target)
        counts = sorted({t["units"] for t in plan.trace if "agreement" in t})
        asr_curve = {k: attack_success(predict(Predictor(rewrite.apply(prep.model, prep.sites, plan.pruned(k)), prep.spec),
                                               triggered, prep.pre, opts.batch_size, attacked), opts.target)
                     for k in counts}
    return plots.render(report, figures, asr_curve)


def read_suspects(prep: Prepared, opts: Options) -> tuple[np.ndarray, int]:
    """The user's suspicious images and the class the original model sends most of them to (the target)."""
    data = open_data(opts.suspect, prep.spec)
    if data.n < 2 * MIN_SUSPECTS:
        raise BadData(f"--suspect: {data.n} images; need at least {2 * MIN_SUSPECTS} (half rank the units, "
                      "half count them)")
    raw = data.read(0, data.n)
    pred = Predictor(prep.model, prep.spec).logits(prep.pre.apply(raw), opts.batch_size).argmax(1)
    counts = np.bincount(pred)
    target = int(counts.argmax())
    # a working trigger sends its images to one class; a set that does not agree names no target, and
    # "silencing" it would report a removal that never happened
    if counts[target] < USE_FLIP * data.n:
        raise BadData(f"--suspect: the model sends at most {counts[target] / data.n:.0%} of these {data.n} images to "
                      f"one class (class {target}); images that carry a working trigger go to its target. Are they "
                      "triggered? Without --suspect, detection looks for the target itself")
    return raw, target


def pruned_units(sites: dict[str, Site], pruned: dict[str, list[int]]) -> dict:
    """For verifiers, per layer with pruned units: the ONNX tensor they live in, its rank, unit axis and number
    of units (`of`), and the pruned units. The pruned model equals the input with a 0/1 mask (0 at these units,
    along that axis) multiplied into each tensor, which anyone can rebuild with onnx alone (a repaired model,
    report["probes"]["chosen"], has other weights tuned as well)."""
    return {name: {"tensor": sites[name].tensor, "axis": sites[name].axis, "rank": sites[name].rank,
                   "of": sites[name].channels, "units": sorted(int(u) for u in units)}
            for name, units in pruned.items() if units}


def check_outputs(opts: Options, models: tuple[Path, ...]) -> Path | None:
    """Refuse, before any work, outputs that would replace an input or each other; return the ONNX path."""
    inputs = tuple(p for p in (*models, opts.calib, opts.eval_data, opts.eval_triggered, opts.suspect)
                   if p is not None)
    out_onnx = None
    if opts.out is not None:
        check_writable(opts.out, force=opts.force, inputs=inputs)
        out_onnx = opts.out.with_suffix(".onnx") if is_engine(opts.out) else opts.out
        if out_onnx != opts.out:
            check_writable(out_onnx, force=opts.force, inputs=inputs)
    outputs = tuple(p for p in (opts.out, out_onnx) if p is not None)
    if opts.report is not None:
        check_writable(opts.report, force=opts.force, inputs=inputs + outputs)
    if opts.report_html is not None:
        check_writable(opts.report_html, force=opts.force,
                       inputs=inputs + outputs + ((opts.report,) if opts.report is not None else ()))
    return out_onnx


def refusal(count: int, final: dict, probe_info: dict | None, max_acc_drop: float, ratio: float | None = None,
            aim: str | None = None) -> str:
    """The one-line reason a result is not written (exit 7) and what the user can do about it. `final`:
    the chosen candidate's held-out record (evaluate.Agreement.to_dict plus the probe verdicts); `ratio`: the
    user's --ratio, when it set the count; `aim`: what the defense was aimed at (the target and what named it),
    said last — a wrong target is what a user who knows the trigger can tell at once, and no report is written."""
    if final["drop_estimate"] > max_acc_drop:
        lo, hi = final["drop_interval90"]
        why = (f"breaks the accuracy budget: estimated {final['judged_on'].split()[0]} drop "
               f"{final['drop_estimate']:.3f} (80 % interval {lo:.3f}..{hi:.3f}) > {max_acc_drop} on "
               f"{final['n']} held-out images")
        if not final.get("probes_silenced", True):
            # the least costly result still misses the goal too: a larger budget alone would not do
            why += f", and leaves the backdoor's probes working (flip rate {max(final['probe_flip']):.3f})"
        # more images only help an estimate whose interval reaches under the budget
        act = "; ".join(([f"a --ratio under {ratio:g} prunes fewer units"] if ratio is not None else [])
                        + (["more --calib images narrow the estimate"] if lo <= max_acc_drop else [])
                        + ["--max-acc-drop raises the budget"])
    else:
        act = "--suspect with triggered samples, if you have any, aims the search"
        if not final.get("fresh_probes_silenced", True):
            worst = probe_info["reattack"]["worst"]
            than = (f", where no other class gets over {worst['control_flip']:.3f}" if "control_flip" in worst else "")
            why = (f"leaves the backdoor in place: a {worst['probe']} synthesized afresh against the result still "
                   f"sends {worst['target_flip']:.3f} of held-out images to the target{than}")
        elif "probe_flip_interval80" in final:
            lo, hi = final["probe_flip_interval80"]
            why = (f"is not shown to remove the backdoor: the counting half of --suspect ({final['probe_images']} "
                   f"images) goes to the target on {final['probe_flip'][0]:.3f} (80 % interval {lo:.3f}..{hi:.3f}), "
                   f"and its top must be under {final['probe_bars'][0]:.3f}, the goal plus what clean images of "
                   "other classes reach")
            act = "more --suspect images narrow the interval; any of the target's own class count as reaching it"
        else:
            why = f"leaves the backdoor's probes working (flip rate {max(final['probe_flip']):.3f})"
    # with nothing pruned the result is the bounded (and maybe repaired) model: "pruning 0 units" misleads
    subject = f"pruning {count} units" if count else "the result, with no unit pruned,"
    aimed = f" (the defense was aimed at {aim})" if aim else ""
    return f"{subject} {why}{aimed}; nothing written ({act}; --allow-degraded writes it anyway)"


def aim(probe_info: dict | None, detection: dict | None) -> str | None:
    """What the default defense was aimed at, for a refusal: "class T, named by <the search that found it>" or
    "class T, where the --suspect samples go"; None without a defense."""
    if not probe_info or "target" not in probe_info:
        return None
    target = probe_info["target"]
    if probe_info.get("source") == "suspicious samples":
        return f"class {target}, where the --suspect samples go"
    found_by = (detection or {}).get("found_by")
    return f"class {target}, named by the {found_by}" if found_by else f"class {target}"


def asr_evidence(after: dict, clean: dict, target: int) -> dict:
    """The ASR's 80 % Wilson interval on the triggered images (`after`: evaluate()'s result for the result) and
    the bar it is judged against: FLIP_GOAL plus the lower end of the 80 % Wilson interval of the result's own
    rate toward `target` on the clean images whose label is another class (`clean`: evaluate()'s keep dict,
    with "pred", "labels" and "triggered_labelled"; natural_rate None and the bar one half without such
    images) — the share of triggered images that would reach the target with no backdoor at all, so a weak
    model's natural pull toward a class is not called a backdoor. The lower end, not the rate: a handful of
    evaluation images that happen to go to the target would otherwise loosen the bar by as much as they
    say, and the bar only grants what the evidence shows. Triggered images without labels are judged by the
    same bar (their class mix is unknown: any of the target's own count as reaching it, which the refusal
    says; "triggered_labelled")."""
    lo, hi = wilson(round(after["asr"] * after["n_triggered"]), after["n_triggered"])
    natural = None
    if "pred" in clean:
        others = clean["labels"] != target
        if others.any():
            hits = int((clean["pred"][others] == target).sum())
            natural = (hits / int(others.sum()), wilson(hits, int(others.sum())))
    bar = USE_FLIP if natural is None else min(USE_FLIP, FLIP_GOAL + natural[1][0])
    return {"interval80": [round(lo, 6), round(hi, 6)], "natural_rate": None if natural is None else round(natural[0], 6),
            **({"natural_interval80": [round(v, 6) for v in natural[1]]} if natural is not None else {}),
            "bar": round(bar, 6), "triggered_labelled": clean.get("triggered_labelled", True)}


def unfinished(detection: dict | None, criterion: str, clean_verdict: bool) -> tuple[str, str] | None:
    """Why a result that passed the held-out checks still must not ship looking fine (exit 7), and what the user
    can do, or None: detection found a backdoor that this run did not remove — toward a second class (the
    defense aims at one target: detect.other_targets), or any, under a clean-data criterion, which prunes without
    looking at a trigger."""
    if detection is None or clean_verdict or detection.get("suspected_target") is None:
        return None
    target = detection["suspected_target"]
    if criterion != PROBE:
        return (f"detection found a backdoor toward class {target} (by {detection['found_by']}), which --criterion "
                f"{criterion} does not remove: it prunes by clean-data statistics and never checks the trigger",
                "the default criterion removes it and checks; --allow-degraded writes this result anyway")
    others = other_targets(detection)
    if not others:
        return None
    return (f"detection found backdoors toward more than one class ({target}; {', '.join(map(str, others))}): the "
            f"defense removed class {target}'s and leaves the others, since it aims at one target per run",
            "--allow-degraded writes this result; sanitize it again to remove the next (each run's budget counts "
            "from its own input)")


def evaluation_notes(before: dict, target: int | None, classes: int, detection: dict | None) -> list[str]:
    """What the user's evaluation sets say about themselves on the original (`before`: evaluate()'s result), for
    the summary: a clean set the original does no better on than a guess (1/`classes`: swapped sets or wrong
    labels?), triggered images that do not reach `target` on the original (count.USE_FLIP: a wrong --target, or
    images without the trigger?) — either way the after column measures nothing — and a detection target other
    than `target`. Their ASR and accuracy stay in the report as measured."""
    notes = []
    if before["clean_acc"] is not None and before["clean_acc"] <= 1 / classes:
        notes.append(f"the original is right on only {before['clean_acc']:.3f} of the --eval-data images, no better than "
                     f"a guess among {classes} classes: are --eval-data and --eval-triggered swapped, or the labels "
                     "wrong? Its clean accuracy measures nothing")
    if before["asr"] is not None and before["asr"] < USE_FLIP:
        notes.append(f"the original sends only {before['asr']:.3f} of the --eval-triggered images to --target {target}: "
                     "they show no backdoor there (a wrong --target, or images without the trigger?), so the ASR "
                     "after measures nothing")
    found = (detection or {}).get("suspected_target")
    if found is not None and target is not None and found != target:
        notes.append(f"detection aimed the defense at class {found}, not --target {target} (--target only measures)")
    return notes


def evaluation_refusal(evaluation: dict, max_acc_drop: float, clean_verdict: bool) -> tuple[str, str] | None:
    """Why to refuse (exit 7) on the user's own evaluation images and what the user can do, or None. Their labels and
    triggers are ground truth the held-out estimate is not: an accuracy drop whose whole 80 % interval
    (`evaluation["accuracy_drop"]`, image by image) is over the budget, or triggered images that still
    reach the target beyond what clean images do, is a result that must not ship looking fine — the same
    evidence the held-out stop rule asks for. The ASR's bar (`evaluation["asr_evidence"]`, asr_evidence())
    is the goal plus the result's own rate toward the target on the clean images of other classes (the lower
    end of its 80 % interval), and the
    whole 80 % interval of the ASR must be over it; without labelled clean images that rate is unknown and
    the bar is one half of the triggered images."""
    before, after = evaluation["before"], evaluation["after"]
    drop = evaluation.get("accuracy_drop")
    evidence = evaluation.get("asr_evidence")
    asr_over = after["asr"] is not None and (evidence["interval80"][0] > evidence["bar"] if evidence
                                             else after["asr"] > USE_FLIP)
    if drop is not None and drop["interval80"][0] > max_acc_drop:
        also = f"; its --eval-triggered images still reach the target on {after['asr']:.3f}" if asr_over else ""
        return (f"the result breaks the accuracy budget on your --eval-data: clean accuracy {before['clean_acc']:.4f}"
                f" -> {after['clean_acc']:.4f} on {before['n_clean']} images (drop {drop['measured']:.4f}, 80 % "
                f"interval {drop['interval80'][0]:.4f}..{drop['interval80'][1]:.4f}, budget {max_acc_drop}){also}",
                "--allow-degraded writes it anyway")
    if not asr_over:
        return None
    what = ("detection found no backdoor, but" if clean_verdict else "the defense ran, but")
    than = (f", while it sends {evidence['natural_rate']:.3f} of your --eval-data images of other classes there"
            if evidence and evidence["natural_rate"] is not None else "")
    unlabelled = evidence is not None and not evidence.get("triggered_labelled", True)
    note = " (they have no labels: any of the target class count as reaching it)" if unlabelled else ""
    return (f"{what} your --eval-triggered images still reach the target on {after['asr']:.3f} (before "
            f"{before['asr']:.3f}){than}{note}: the backdoor is still there",
            "--suspect with triggered samples aims the defense at it; --allow-degraded writes it anyway")


class Sizing:
    """Sizes each stage's effort (defense/effort.py) to what is left of opts.time_budget: measures the pass
    costs once, when a stage first asks (the onnxruntime forward's from the held-out reference the run made
    anyway, `forward` seconds per image), and records every choice for the report's "effort" section."""

    def __init__(self, opts: Options, prep: Prepared, fit: np.ndarray, forward: float, t0: float):
        self.opts, self.prep, self.fit, self.forward, self.t0 = opts, prep, fit, forward, t0
        self.cost = None
        self.report: dict = {}

    def __call__(self, stage: str, work, share: float = 1.0, optional: bool = False):
        """The effort of `stage`, whose work at an effort is `work(effort)` (PassCost.seconds' tuple), within
        `share` of the budget left; full effort without a budget. None for an `optional` stage that does not
        fit at its least effort either (recorded as skipped)."""
        if self.opts.time_budget is None:
            return FULL
        if self.cost is None:
            few = self.fit[:effort_sizing.COST_IMAGES]
            raw = self.prep.calib.subset(few).read(0, len(few))
            self.cost = effort_sizing.measure(self.prep.model, self.prep.spec, self.prep.pre, raw, self.forward)
        left = self.opts.time_budget - (time.perf_counter() - self.t0)
        effort, self.report[stage] = effort_sizing.sized(work, self.cost, max(left, 0.0) * share)
        self.report["budget_seconds"] = self.opts.time_budget
        if optional and self.report[stage]["over_budget"]:
            self.report[stage]["skipped"] = True
            return None
        return effort


def sanitize(opts: Options, progress: Progress = _quiet) -> dict:
    """Run the job; write the sanitized ONNX (and report) atomically; return the report."""
    t0 = time.perf_counter()
    progress = clock = StepClock(progress)
    clock.switch("setup")
    if opts.criterion == PROBE and importlib.util.find_spec("torch") is None:
        raise SanitizeError("the default criterion 'probe' needs torch: pip install "
                            "'onnx-backdoor-sanitizer[torch]', or pass --criterion linf", ExitCode.MISSING_DEP)
    if opts.time_budget is not None and not 0 < opts.time_budget < float("inf"):
        raise SanitizeError(f"--time-budget is minutes (0: full effort), got {opts.time_budget / 60:g}", ExitCode.USAGE)
    if not 0 <= opts.max_acc_drop < 1:
        raise SanitizeError(f"--max-acc-drop is a share of accuracy in [0, 1), got {opts.max_acc_drop}", ExitCode.USAGE)
    if opts.eval_triggered is not None and opts.target is None:
        raise SanitizeError("--eval-triggered needs --target (the attacker's class, for the ASR)", ExitCode.USAGE)
    if opts.target is not None and opts.eval_triggered is None:
        raise SanitizeError("--target is the attacker's class for the ASR on --eval-triggered images; nothing "
                            "else uses it (detection finds the target itself): pass --eval-triggered too",
                            ExitCode.USAGE)
    out_onnx = check_outputs(opts, (opts.model,))
    prep = prepare(opts)
    check_outputs(opts, (opts.model, *prep.loaded.data_files))
    # after the outputs are checked against every input (an external-data file has no .onnx suffix either)
    if opts.out is not None and opts.out.suffix.lower() != ".onnx" and not is_engine(opts.out):
        raise SanitizeError(f"--out {opts.out}: the output is an ONNX model (.onnx) or a TensorRT engine "
                            f"({', '.join(ENGINE_SUFFIXES)}), named by its suffix", ExitCode.USAGE)
    if opts.plots is not None:
        from . import plots

        plots.check(opts.plots, opts.force, (opts.model, *prep.loaded.data_files, opts.calib))
    fit, hold = split(prep.calib.n, opts.holdout, opts.seed)
    probing = opts.criterion == PROBE
    if not probing and opts.criterion not in CRITERIA:
        raise SanitizeError(f"unknown criterion {opts.criterion!r}; choose from {', '.join((PROBE, *CRITERIA))}",
                            ExitCode.USAGE)
    if probing and opts.ratio is not None:
        raise SanitizeError("--ratio forces a share for linf, mean, l1 or l2; the probe criterion counts units "
                            "itself (pass --criterion linf to force a ratio)", ExitCode.USAGE)
    # the probes look for the backdoor's units wherever they are; clean statistics only trust the last stage
    sites = scope(prep, "all" if probing and opts.layers is None else opts.layers)
    if opts.suspect is not None and not probing:
        raise SanitizeError("--suspect works with the probe criterion", ExitCode.USAGE)
    # the flags are checked; before any decision rests on the original's predictions, are they sound?
    sanity = check_original(prep.model, prep.spec, prep.pre, prep.calib, batch_size=opts.batch_size,
                            labels=prep.calib.labels if opts.use_labels else None, enforce=opts.sanity_check)
    prep.spec = replace(prep.spec, output_kind=sanity["output"]["kind"])
    check_target(opts.target, sanity["classes"])
    for flag, path in (("--eval-data", opts.eval_data), ("--eval-triggered", opts.eval_triggered)):
        if path is not None:
            check_same_scale(flag, path, prep.spec, sanity["raw_range"][1], opts.batch_size)
    held = HeldOut(prep, hold, opts.batch_size, opts.use_labels)
    sizing = Sizing(opts, prep, fit, held.forward_seconds, t0)
    suspects, detection = None, None
    if opts.suspect is not None:
        suspects, target = read_suspects(prep, opts)
    elif opts.detect or probing:
        detection = detect(prep, fit, opts.seed, progress,
                           lambda stage, work, **kw: sizing(stage, work, effort_sizing.DETECTION_SHARE, **kw))
        target = detection["suspected_target"]
    clean_verdict = detection is not None and target is None
    info = {"provider": held.provider}
    plan, probe_info, refused = None, None, None
    unconfirmed_by = None
    leads = Leads.of(detection)
    if detection is not None and detection["found_by"] == "mask anomaly" and not (probing and sites):
        # the scans' targets come with a probe over their bar; the mask search's need one too (the default's
        # defense checks it itself; with no layer to prune, before the model is refused for that)
        effort = sizing("probes", lambda e: probe_work(e, len(hold), leads))
        unconfirmed_by = unconfirmed(prep, fit, hold, held, target, opts, progress, leads, effort)
        clean_verdict = unconfirmed_by is not None
    if not sites and not clean_verdict:
        # writing the input back as "sanitized" would claim a defense that never ran
        raise BadModel(f"no prunable layer in scope: {blocked_reasons(prep.sites.values())}")
    if probing and not clean_verdict:
        units, n_suspects = sum(s.channels for s in sites), None if suspects is None else len(suspects)
        effort = sizing("defense", lambda e: defense_work(e, len(fit), len(hold), units, leads, suspects=n_suspects))
        plan, sanitized, probe_info = defend(prep, sites, fit, hold, held, target, opts, progress, suspects,
                                             leads=leads, effort=effort,
                                             afford=lambda stage, work: sizing(stage, work, optional=True))
        if plan is None:
            unconfirmed_by, probe_info = probe_info, None
    if unconfirmed_by is not None:
        # a backdoor is a shortcut: when no probe toward the suspected class finds one, the suspicion (a
        # mask anomaly on a small clean model, as a rule) is not confirmed and the model is left alone
        detection.update(verdict="no backdoor found", suspected_target=None, found_by=None,
                         not_confirmed={"class": target, "by": detection["found_by"], **unconfirmed_by})
        clean_verdict = True
    if clean_verdict:
        plan = Plan([], 0, [{"units": 0, **held.agreement(prep.model).to_dict(), "within_budget": True}])
        sanitized = prep.model
    elif not probing:
        order, info = rank_units(prep, sites, opts.criterion, fit, opts, progress)
        plan = choose_count(prep, order, held, opts, progress)
        sanitized = rewrite.apply(prep.model, prep.sites, plan.pruned())
    clock.switch("final checks")
    check(sanitized)
    # the held-out drop averages over the classes; removing a backdoor costs its target class most
    target_kept = (class_kept(held.reference, held.predict(sanitized), probe_info["target"])
                   if probe_info is not None and "target" in probe_info else None)
    figures = (probe_info or {}).pop("_figures", {})
    final = [t for t in plan.trace if t["units"] == plan.count][-1]
    degraded = not final["within_budget"]

    report = {
        "tool": "sanitize 0.1.0",
        # the .onnx file's hash alone would not change with weights kept in external data files
        "input": {"model": str(opts.model), "sha256": prep.loaded.sha256, "external_data": prep.loaded.external,
                  **({"data_sha256": {str(p): sha256_file(p) for p in prep.loaded.data_files}}
                     if prep.loaded.data_files else {})},
        "preprocess": {**prep.pre.to_dict(), "input_name": prep.spec.name,
                       "input_size": [prep.spec.height, prep.spec.width]},
        "model_output": sanity.pop("output"),
        "sanity": sanity,
        "criterion": opts.criterion,
        "scope": [s.name for s in sites],
        "calibration": {"source": str(opts.calib), "images": prep.calib.n, "fit": len(fit), "held_out": len(hold),
                        "labels_used": held.labels is not None, "seed": opts.seed},
        "max_acc_drop": opts.max_acc_drop,
        "plan": plan.to_dict(),
        "pruned_per_layer": {k: len(v) for k, v in plan.pruned().items()},
        "pruned_units": pruned_units(prep.sites, plan.pruned()),
        "held_out_after": {k: v for k, v in final.items() if k != "units"},
        **({"target_class": target_kept} if target_kept is not None else {}),
        "degraded": degraded,
        "provider": info["provider"],
        **({"detection": detection} if detection is not None else {}),
        **({"probes": probe_info} if probe_info is not None else {}),
        **({"effort": sizing.report} if sizing.report else {}),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    refused = unfinished(detection, opts.criterion, clean_verdict)
    if refused is not None:
        report["refused"] = refused[0]
        report["degraded"] = True
    if opts.eval_data is not None or opts.eval_triggered is not None:
        clock.switch("evaluation")
        kw = dict(data=opts.eval_data, triggered=opts.eval_triggered, target=opts.target, batch_size=opts.batch_size)
        was, now = {}, {}
        report["evaluation"] = {"before": evaluate(prep.model, prep.spec, prep.pre, keep=was, **kw),
                                "after": evaluate(sanitized, prep.spec, prep.pre, keep=now, **kw)}
        if "pred" in was:
            # image by image, as the held-out estimate: its 80 % interval says whether the drop is evidence
            drop = agreement(was["pred"], now["pred"], was["labels"])
            lo, hi = drop.drop_interval
            report["evaluation"]["accuracy_drop"] = {"measured": round(drop.drop, 6),
                                                     "interval80": [round(lo, 6), round(hi, 6)]}
        if report["evaluation"]["after"]["asr"] is not None:
            report["evaluation"]["asr_evidence"] = asr_evidence(report["evaluation"]["after"], now, opts.target)
        notes = evaluation_notes(report["evaluation"]["before"], opts.target, held.reference_prob.shape[1], detection)
        if notes:
            report["evaluation"]["notes"] = notes
        evaluated = evaluation_refusal(report["evaluation"], opts.max_acc_drop, clean_verdict)
        if evaluated is not None:
            # degraded for every reader of the report (the HTML verdict, bench), written only with --allow-degraded;
            # the user's own evidence is the reason given first
            report["evaluation"]["refused"] = evaluated[0]
            report["degraded"] = True
            refused = evaluated
    # a refusal after a search ran below full effort says so: more time is the first thing to try
    cut = effort_sizing.summary(sizing.report)
    also = f" [{cut}]" if cut else ""
    if degraded and not opts.allow_degraded:
        why = refusal(plan.count, final, probe_info, opts.max_acc_drop, opts.ratio, aim(probe_info, detection))
        raise SanitizeError(why + also, ExitCode.DEGRADED)
    if refused is not None and not opts.allow_degraded:
        raise SanitizeError(f"{refused[0]}; nothing written ({refused[1]}){also}", ExitCode.DEGRADED)
    clock.switch("write")
    if out_onnx is not None:
        written = save_model(sanitized, out_onnx, external=prep.loaded.external)
        report["output"] = {"onnx": str(out_onnx), "sha256": sha256_file(out_onnx),
                            "files": [str(p) for p in written]}
    # without matplotlib the HTML report still has every number, in tables, and says what the figures need
    pngs = {}
    if opts.plots is not None or (opts.report_html is not None and importlib.util.find_spec("matplotlib") is not None):
        clock.switch("plots")
        pngs = render_plots(opts, prep, plan, report, figures)
    if opts.plots is not None:
        from . import plots

        report["plots"] = [str(p) for p in plots.write(opts.plots, pngs)]
    # per step (the progress stages; "statistics" is the clean-data pass of the linf/mean/l1/l2 criteria)
    wall, cpu = clock.finish()
    report["timings_seconds"] = {**wall, "total": round(time.perf_counter() - t0, 3)}
    report["cpu_seconds"] = {**cpu, "total": round(sum(cpu.values()), 3)}
    if opts.report is not None:
        write_text(opts.report, json.dumps(report, indent=2, sort_keys=True) + "\n")
    if opts.report_html is not None:
        from .report_html import page

        write_text(opts.report_html, page(report, pngs, opts.command))
    report["_model"] = sanitized
    return report
