"""The sanity gate: the original model on the calibration images, before anything is pruned.

Every decision of the job compares a pruned model with the original on these images. If the original
already fails on them — labels that are not the model's classes, pixels on another scale than the one the
model was trained on, a wrong layout — the comparison is meaningless and the job would prune happily
(issue 10: 15 of 16 units pruned, true accuracy 0.98 → 0.26, "agreement 1.000"). So the gate refuses, with
the number that tripped it and the likely cause, unless --no-sanity-check.

The bars, none fitted to a case:
- *Input range*: all preprocessed values within a window narrower than MIN_INPUT_SPAN. Images under any
  common convention ([0, 1], [-1, 1], mean/std-normalised, [0, 255]) span at least ~1; a whole set inside
  0.02 is 5 grey levels of an 8-bit image in [0, 1] — what pixels already in [0, 1] give after another
  × 1/255 (span ≤ 0.0039).
- *Collapse*: one class gets more than COLLAPSE of the predictions while the labels — or, without labels,
  the expectation of a calibration set drawn from the classes — are spread (largest label class ≤ half).
- *Labels*: Cohen's κ between the labels and the original's predictions (chance agreement from both
  marginals). The gate trips when even the upper one-sided 99.9 % Wilson bound of the accuracy gives
  κ ≤ SLIGHT_KAPPA, Landis & Koch's (1977) "slight" agreement: a model that truly agrees with its labels
  beyond that is refused in at most 0.1 % of runs.
- *Coverage*: the classes the images stand for (their labels, else the original's predictions) are fewer
  than a set of this size drawn from all the model's classes would show. Every decision is judged on these
  images and the repair tunes on them alone, so a class they never show can lose its accuracy unseen: a
  model 0.998 accurate, calibrated on digits 0–4 only, shipped at 0.88 (0.78 on 5–9) with a held-out
  agreement of 0.985. Real sets are uneven (GTSRB's rarest class is 0.13 of a balanced share), so the bar
  allows any set whose every class is at least RARE_SHARE as frequent as in a balanced one: of such sets,
  the one with the fewest classes expected has all classes but one at that floor (the expected count is a
  sum of concave terms), each seen with q = 1 − (1 − RARE_SHARE/C)^n (C classes, n images); the gate trips
  when fewer classes show than 1 + the 0.1 % quantile of Binomial(C − 1, q). 500 GTSRB images need 20 of 43
  classes, 411 digits 8 of 10, 500 ImageNet images 30 of 1000.
"""
from __future__ import annotations

import math

import numpy as np
import onnx

from calib.data import Dataset
from calib.preprocess import InputSpec, Preprocess

from .errors import BadData, BadModel
from .evaluate import Predictor, wilson

MIN_INPUT_SPAN = 0.02
COLLAPSE = 0.9
SPREAD = 0.5          # labels are spread when no class holds more than this share
SLIGHT_KAPPA = 0.2
Z_999 = 3.0902        # one-sided 99.9 %
RARE_SHARE = 0.1      # the rarest class the coverage bar allows, as a share of a balanced set's
ALPHA_COVERAGE = 0.001
# Rows that are non-negative and sum to 1 within this are probabilities (16-bit outputs round at ~1e-3).
PROB_TOLERANCE = 1e-2


def check_original(model: onnx.ModelProto, spec: InputSpec, pre: Preprocess, data: Dataset, *,
                   labels: np.ndarray | None, batch_size: int = 64, enforce: bool = True) -> dict:
    """Run the original `model` once over every image of `data` (streamed, `batch_size` at a time) and judge
    it. `labels`: [N] int64 class indices or None (unlabeled, or labels not to be used).

    Returns the numbers (JSON-ready): images, classes, input and raw pixel range, top class and its share,
    the classes the images stand for and the fewest a set drawn from all of them would show (coverage_floor),
    with labels accuracy / κ / its bound, the output's kind ("logits" or "probabilities": non-negative rows
    summing to 1 on every image, or a Softmax producer), and "tripped" (the refusal it would give, or None).
    Raises BadModel when the output has fewer than 2 scores per image (not overridable); BadData (exit 5)
    naming the likely cause (labels, --scale, --mean/--std, --layout) when a bar trips and `enforce`."""
    predictor = Predictor(model, spec)
    preds, raw_lo, raw_hi, lo, hi, probabilities, classes = [], np.inf, -np.inf, np.inf, -np.inf, True, None
    for _, raw in data.batches(batch_size):
        x = pre.apply(raw)
        scores = predictor.logits(x, batch_size)
        classes = scores.shape[1]
        if classes < 2:
            raise BadModel(f"output {spec.output} has {classes} value per image; a classifier needs one score per "
                           "class (single-sigmoid binary classifiers are not supported)")
        raw_lo, raw_hi = min(raw_lo, float(raw.min())), max(raw_hi, float(raw.max()))
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        probabilities &= bool((scores >= -PROB_TOLERANCE).all()
                              and (np.abs(scores.sum(1) - 1) <= PROB_TOLERANCE).all())
        preds.append(scores.argmax(1))
    pred = np.concatenate(preds)
    n = len(pred)
    counts = np.bincount(pred, minlength=classes)
    top = int(counts.argmax())
    kind = "probabilities" if probabilities or spec.output_kind == "probabilities" else "logits"
    out = {"images": n, "classes": classes, "raw_range": [raw_lo, raw_hi], "input_range": [lo, hi],
           "top_class": top, "top_share": round(float(counts[top] / n), 4),
           "output": {"name": spec.output, "kind": kind}, "enforced": enforce}
    if labels is not None:
        out.update(_label_numbers(pred, np.asarray(labels), classes))
    out["covered"] = int(len(np.unique(labels if labels is not None else pred)))
    out["coverage_floor"] = coverage_floor(classes, n)
    out["tripped"] = _verdict(out, pre, labels is not None)
    if out["tripped"] and enforce:
        raise BadData(out["tripped"])
    return out


def coverage_floor(classes: int, n: int) -> int:
    """The fewest classes `n` images drawn from `classes` classes show, each class at least RARE_SHARE as frequent
    as in a balanced set, but for a chance of at most 0.1 %: 1 (the frequent class) plus the 0.1 % quantile of
    Binomial(classes − 1, q), q = 1 − (1 − RARE_SHARE/classes)^n (the module's docstring; the classes' indicators
    are negatively correlated, so the binomial's tail is the wider one)."""
    m, q = classes - 1, 1 - (1 - RARE_SHARE / classes) ** n
    if q >= 1:
        return classes
    cdf, k = 0.0, 0
    while k <= m and q > 0:
        pmf = math.exp(math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) + k * math.log(q)
                       + (m - k) * math.log1p(-q))
        if cdf + pmf > ALPHA_COVERAGE:
            break
        cdf, k = cdf + pmf, k + 1
    return 1 + k


def narrow_input(input_range: tuple[float, float], raw_range: tuple[float, float], pre: Preprocess,
                 which: str) -> str | None:
    """The input-range bar: why preprocessed inputs spanning `input_range` (raw pixels `raw_range`) cannot be
    what the model was trained on, naming the likely flag, or None. `which`: the images' role, for the message."""
    lo, hi = input_range
    if hi - lo >= MIN_INPUT_SPAN:
        return None
    raw_lo, raw_hi = raw_range
    cause = ("pixels already in [0, 1]? pass --scale 1" if raw_hi <= 1 and pre.scale < 1 else
             "check --scale and --mean/--std")
    return (f"every {which} input lies within {lo:.4g}..{hi:.4g} after preprocessing (span {hi - lo:.2g} < "
            f"{MIN_INPUT_SPAN}; pixels {raw_lo:.4g}..{raw_hi:.4g} × --scale {pre.scale:.4g}): {cause}")


def input_ranges(data: Dataset, pre: Preprocess, limit: int | None = None,
                 batch_size: int = 64) -> tuple[tuple[float, float], tuple[float, float]]:
    """(preprocessed min, max), (raw min, max) over the first `limit` images of `data` (None: all), read
    `batch_size` at a time."""
    lo, hi, raw_lo, raw_hi = np.inf, -np.inf, np.inf, -np.inf
    if limit is not None and limit < data.n:
        data = data.subset(np.arange(limit))
    for _, raw in data.batches(batch_size):
        x = pre.apply(raw)
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        raw_lo, raw_hi = min(raw_lo, float(raw.min())), max(raw_hi, float(raw.max()))
    return (lo, hi), (raw_lo, raw_hi)


def _label_numbers(pred: np.ndarray, labels: np.ndarray, classes: int) -> dict:
    n = len(pred)
    width = max(classes, int(labels.max()) + 1)
    label_share = np.bincount(labels, minlength=width) / n
    pred_share = np.bincount(pred, minlength=width) / n
    agree = int((pred == labels).sum())
    chance = float(label_share @ pred_share)
    upper = wilson(agree, n, Z_999)[1]
    kappa = (agree / n - chance) / (1 - chance) if chance < 1 else None
    kappa_upper = (upper - chance) / (1 - chance) if chance < 1 else None
    # the share of images an image's label would get right if every label stood for its most predicted
    # class: high when the labels are the model's classes in another order
    mapped = sum(int(np.bincount(pred[labels == c]).max()) for c in np.unique(labels)) / n
    return {"labels_max": int(labels.max()), "label_top_share": round(float(label_share.max()), 4),
            "accuracy": round(agree / n, 4), "chance": round(chance, 4),
            "kappa": None if kappa is None else round(kappa, 4),
            "kappa_upper999": None if kappa_upper is None else round(kappa_upper, 4),
            "mapped_accuracy": round(mapped, 4)}


def _verdict(r: dict, pre: Preprocess, labeled: bool) -> str | None:
    n, classes = r["images"], r["classes"]
    override = "; or pass --no-sanity-check"
    if labeled and r["labels_max"] >= classes:
        return (f"--calib labels go up to {r['labels_max']} but output {r['output']['name']} has {classes} classes "
                f"(0..{classes - 1}): the labels do not match the model's classes{override}")
    narrow = narrow_input(r["input_range"], r["raw_range"], pre, "calibration")
    if narrow:
        return narrow + override
    spread = not labeled or r["label_top_share"] <= SPREAD
    if spread and r["top_share"] > COLLAPSE:
        of = "whose labels are spread" if labeled else "(a calibration set is expected to cover the classes)"
        return (f"the original model gives class {r['top_class']} to {r['top_share']:.1%} of the {n} calibration "
                f"images {of}: the preprocessing likely differs from the model's — check --scale, --mean/--std and "
                f"--layout{override}")
    if labeled and r["kappa_upper999"] is not None and r["kappa_upper999"] <= SLIGHT_KAPPA:
        hint = (f"; mapping each label to its most predicted class would match {r['mapped_accuracy']:.1%}: "
                "another class order?" if r["mapped_accuracy"] >= 0.5 else "")
        return (f"the original model agrees with the --calib labels on {r['accuracy']:.1%} of {n} images (chance "
                f"{r['chance']:.1%}; Cohen's kappa {r['kappa']:.2f}, ≤ {r['kappa_upper999']:.2f} at 99.9 %): the "
                f"labels likely do not match the model's classes{hint} (else check --scale, --mean/--std, "
                f"--layout){override}")
    if r["covered"] < r["coverage_floor"]:
        by = "their labels" if labeled else "the original model's predictions"
        return (f"the {n} calibration images stand for {r['covered']} of the model's {classes} classes (by {by}), where "
                f"{n} images drawn from all of them, each at least {RARE_SHARE:g} as frequent as in a balanced set, "
                f"would show at least {r['coverage_floor']}: every check runs and the repair tunes on these "
                f"images alone, so the other classes can lose accuracy unseen — add images of the other "
                f"classes{override}")
    return None
