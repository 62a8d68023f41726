"""Predictions, accuracy, attack success rate and agreement — with the estimated accuracy drop the stop rule
decides on and its interval."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from calib.preprocess import InputSpec
from calib.session import make_session, run

# The normal quantile of the intervals the report gives (one-sided 90 %: an 80 % two-sided interval): the
# agreement's Wilson interval and the drop estimate's. The stop rule decides on the estimate itself — a
# bound at this level refused results whose true drop was 1–2.5 points on a 2-point budget, since a few
# hundred held-out images cannot certify less.
Z = 1.2816


def wilson(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


class Predictor:
    """One onnxruntime session over preprocessed float32 batches [N, ...] (cast to the input's dtype by
    calib.session.run); `logits` returns the spec's classifier output as [N, classes] float32 (float64 for a
    float64 output) — logits or probabilities as spec.output_kind says (argmax is the same either way).
    A fixed-batch model gets full batches (the last one padded). Raises BadModel when onnxruntime cannot
    load or run the model."""

    def __init__(self, model: onnx.ModelProto | bytes, spec: InputSpec):
        self.session, self.provider = make_session(model)
        self.input_name = spec.name
        self.output = spec.output
        self.fixed_batch = spec.batch

    def logits(self, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
        step = self.fixed_batch or batch_size
        out = []
        for s in range(0, len(x), step):
            chunk = x[s:s + step]
            if self.fixed_batch and len(chunk) < step:  # pad a fixed-batch model's last batch
                pad = np.repeat(chunk[-1:], step - len(chunk), axis=0)
                out.append(self._run(np.concatenate([chunk, pad]))[:len(chunk)])
            else:
                out.append(self._run(chunk))
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def _run(self, x: np.ndarray) -> np.ndarray:
        y = run(self.session, [self.output], {self.input_name: x})[0]
        return y.reshape(len(x), -1)


@dataclass
class Agreement:
    """How a changed model's predictions on the held-out images compare with the original's.

    `change` holds, per image, the accuracy it is expected to lose: with labels 1 (was right, now wrong), -1
    (was wrong, now right) or 0; without labels, on an image whose prediction changed, the original model's
    own probability of its old class minus that of the new one (its best guess at which one is right), so an
    image the original was unsure of counts as a fraction of a loss, and one it was sure of as a whole one.
    The stop rule decides on the mean of `change` (an estimate of the accuracy drop, in [−1, 1])."""
    agree: int
    n: int
    change: np.ndarray
    labeled: bool

    @property
    def rate(self) -> float:
        return self.agree / self.n if self.n else 0.0

    @property
    def drop(self) -> float:
        return float(self.change.mean()) if self.n else 0.0

    @property
    def drop_interval(self) -> tuple[float, float]:
        """Two-sided 80 % normal interval of the mean drop (one-sided 90 % at each end)."""
        if self.n < 2:
            return -1.0, 1.0
        half = Z * float(self.change.std(ddof=1)) / math.sqrt(self.n)
        return self.drop - half, self.drop + half

    def within(self, budget: float) -> bool:
        return self.drop <= budget

    def to_dict(self) -> dict:
        lo, hi = wilson(self.agree, self.n)
        dlo, dhi = self.drop_interval
        return {"agreement": round(self.rate, 6), "interval90": [round(lo, 6), round(hi, 6)], "n": self.n,
                "drop_estimate": round(self.drop, 6), "drop_interval90": [round(dlo, 6), round(dhi, 6)],
                "judged_on": "accuracy" if self.labeled else "agreement weighted by the original's confidence"}


def probabilities(out: np.ndarray, kind: str = "logits") -> np.ndarray:
    """Class probabilities [N, K] from a model's [N, K] output of `kind` (InputSpec.output_kind, decided by
    sanity.check_original): kept as they are when they already are probabilities, else softmax of the logits."""
    out = np.asarray(out, np.float64)
    if kind == "probabilities":
        return out
    z = np.exp(out - out.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def agreement(reference: np.ndarray, pred: np.ndarray, labels: np.ndarray | None = None,
              reference_prob: np.ndarray | None = None) -> Agreement:
    """reference / pred / labels: int [N] classes; reference_prob: float [N, K] the original's probabilities
    (label-free estimate; without it every changed prediction counts as a whole loss)."""
    agree = int((reference == pred).sum())
    if labels is not None:
        change = (reference == labels).astype(np.float64) - (pred == labels)
    else:
        change = (reference != pred).astype(np.float64)
        if reference_prob is not None and len(pred):
            rows = np.arange(len(pred))
            change *= reference_prob[rows, reference] - reference_prob[rows, pred]
    return Agreement(agree, len(pred), change, labels is not None)


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((pred == labels).mean()) if len(labels) else float("nan")


def attack_success(pred: np.ndarray, target: int) -> float:
    return float((pred == target).mean()) if len(pred) else float("nan")


def class_kept(reference: np.ndarray, pred: np.ndarray, cls: int) -> dict:
    """How much of class `cls` a changed model keeps: of the images the original calls `cls` (`reference`, int
    [N], the original's predictions; `pred`, int [N], the changed model's on the same images), how many it still
    calls `cls`, with the share's 80 % Wilson interval, beside the share of the other images whose prediction is
    unchanged. Removing a backdoor costs its target class most (README, "A newcomer's pass on colour models"): an
    accuracy drop over all images hides a loss that falls on the one class."""
    mine = reference == cls
    kept, of = int((pred[mine] == cls).sum()), int(mine.sum())
    lo, hi = wilson(kept, of)
    others = ~mine
    return {"class": int(cls), "kept": kept, "of": of, "share": round(kept / of, 4) if of else None,
            "interval80": [round(lo, 4), round(hi, 4)],
            "others_share": round(float((pred[others] == reference[others]).mean()), 4) if others.any() else None}
