"""Trigger synthesis and backdoor detection from unlabeled clean images (Neural-Cleanse style).

For each class we search the smallest mask + pattern that sends clean images to that class. A backdoor
target needs a far smaller mask than any other class, which the MAD anomaly index exposes without
labels. To fit a CPU budget every class gets a short first round and only the few smallest-mask
candidates are refined (as in K-Arm); the anomaly index is computed on the first round, where every
class had the same number of steps, so refinement cannot manufacture an outlier.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from calib.preprocess import Preprocess

from .errors import BadData, require

# Anomaly index above which the smallest mask is called a backdoor (the Neural Cleanse threshold:
# two consistent-MAD units, ~95% of a normal distribution lies within it).
ANOMALY_THRESHOLD = 2.0
# Attack success the synthesized trigger must keep while the mask shrinks.
SUCCESS_TARGET = 0.95
# Classes the mask search runs on at most, so that its cost does not grow with the number of classes: past
# it, the candidates it is given and a seeded sample of the other classes, which is what the median and MAD
# of the anomaly index need.
MAX_CLASSES = 32


@dataclass
class Trigger:
    """Mask (H, W, 1) in [0, 1] and pattern (H, W, C) in raw pixel units."""

    target: int
    mask: np.ndarray
    pattern: np.ndarray

    def stamp(self, x_raw: np.ndarray) -> np.ndarray:
        return ((1.0 - self.mask) * x_raw + self.mask * self.pattern).astype(np.float32)


@dataclass
class ProbeResult:
    mask_norms: np.ndarray      # per class: mask ℓ1 (pixels) after the equal-effort first round; NaN: not searched
    anomaly: np.ndarray         # per class: (median - norm) / (1.4826 * MAD); large = suspiciously small mask; NaN: not searched
    suspected_target: int | None
    trigger: Trigger            # refined trigger of the most anomalous class (returned even when not flagged)
    flip_rate: float            # share of held-out images the trigger sends to its class
    refined_norms: dict[int, float]


def pixel_range(x_raw: np.ndarray) -> float:
    """Upper end of the raw pixel range: 255 for 8-bit data, 1 for data already in [0, 1]."""
    return 255.0 if float(x_raw.max()) > 1.5 else 1.0


def device(torch):
    """Where all torch work runs (the one place it is chosen): the first CUDA GPU when torch sees one, else
    the CPU. Graphs go there with `.to(device(torch))`; make_input moves images there."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def classifier(model: onnx.ModelProto, spec=None, *, frozen: bool = False):
    """The model as a torch module on device(torch) whose output is the class scores in logit space: the
    spec's image input and classifier output (calib.preprocess.InputSpec; the first input and output when
    None), a Softmax output read before the Softmax. Raises BadModel for an op the interpreter lacks."""
    torch = require("torch", "torch")
    from .torch_graph import to_torch

    return to_torch(model, frozen=frozen, input_name=spec.name if spec else None,
                    output_name=spec.output if spec else None, logits=True).to(device(torch))


def make_input(torch, x_raw, pp: Preprocess):
    """Raw NHWC pixels (torch tensor, any device) -> model input on device(torch), differentiably."""
    x = x_raw.to(device(torch)) * pp.scale
    mean = torch.tensor(pp.mean, dtype=x.dtype, device=x.device)
    std = torch.tensor(pp.std, dtype=x.dtype, device=x.device)
    x = (x - mean) / std
    return x.permute(0, 3, 1, 2) if pp.layout == "nchw" else x


def check_images(x_raw: np.ndarray) -> np.ndarray:
    if x_raw.ndim != 4 or len(x_raw) < 8:
        raise BadData(f"need at least 8 calibration images as an NHWC array, got shape {x_raw.shape}")
    return np.asarray(x_raw, np.float32)


class _Search:
    """Mask/pattern optimisation for one class, resumable so a candidate can be refined later."""

    def __init__(self, torch, graph, pp, x, target, hi, seed):
        self.torch, self.graph, self.pp, self.x, self.target, self.hi = torch, graph, pp, x, target, hi
        g = torch.Generator().manual_seed(seed * 1000 + target)
        h, w, c = x.shape[1:]
        on = x.device
        self.mask_p = (torch.randn((h, w, 1), generator=g) * 0.1 - 2.0).to(on).requires_grad_(True)
        self.pattern_p = (torch.randn((h, w, c), generator=g) * 0.1).to(on).requires_grad_(True)
        self.opt = torch.optim.Adam([self.mask_p, self.pattern_p], lr=0.1, betas=(0.5, 0.9))
        self.lam = 1e-3
        self.best_norm = float("inf")
        self.best = self.current()
        self.streak_ok = self.streak_bad = 0

    def current(self):
        t = self.torch
        with t.no_grad():
            return t.sigmoid(self.mask_p).clone(), ((t.tanh(self.pattern_p) + 1) / 2 * self.hi).clone()

    def run(self, steps: int, batch: int):
        t = self.torch
        n = len(self.x)
        labels = t.full((batch,), self.target, dtype=t.long, device=self.x.device)
        for step in range(steps):
            idx = t.arange(step * batch, (step + 1) * batch, device=self.x.device) % n
            mask = t.sigmoid(self.mask_p)
            pattern = (t.tanh(self.pattern_p) + 1) / 2 * self.hi
            stamped = (1 - mask) * self.x[idx] + mask * pattern
            logits, _ = self.graph(make_input(t, stamped, self.pp))
            ce = t.nn.functional.cross_entropy(logits, labels)
            norm = mask.sum()
            loss = ce + self.lam * norm
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            success = float((logits.argmax(1) == self.target).float().mean())
            if success >= SUCCESS_TARGET and float(norm.detach()) < self.best_norm:
                self.best_norm = float(norm.detach())
                self.best = (mask.detach().clone(), pattern.detach().clone())
            # Neural Cleanse's λ schedule: tighten the mask while the attack holds, relax it when it breaks,
            # which keeps λ free of any per-model setting.
            self.streak_ok = self.streak_ok + 1 if success >= SUCCESS_TARGET else 0
            self.streak_bad = self.streak_bad + 1 if success < SUCCESS_TARGET else 0
            if self.streak_ok >= 5:
                self.lam, self.streak_ok = self.lam * 1.5, 0
            elif self.streak_bad >= 5:
                self.lam, self.streak_bad = self.lam / 1.5, 0

    @property
    def norm(self) -> float:
        if np.isfinite(self.best_norm):
            return self.best_norm
        return float(self.torch.sigmoid(self.mask_p.detach()).sum()) * 2  # never reached the target: penalise


def anomaly_index(norms: np.ndarray) -> np.ndarray:
    median = np.median(norms)
    mad = 1.4826 * np.median(np.abs(norms - median))
    return (median - norms) / max(mad, 1e-12)


def searched_classes(n_classes: int, candidates: list[int], seed: int, limit: int = MAX_CLASSES) -> list[int]:
    """Every class up to `limit`; past it the candidates first, then a seeded sample of the others."""
    if n_classes <= limit:
        return list(range(n_classes))
    chosen = list(dict.fromkeys(c for c in candidates if 0 <= c < n_classes))[:limit]
    rest = np.setdiff1d(np.arange(n_classes), chosen)
    sample = np.random.default_rng(seed).choice(rest, limit - len(chosen), replace=False)
    return sorted(chosen + [int(c) for c in sample])


def probe(model: onnx.ModelProto, x_raw: np.ndarray, pp: Preprocess, seed: int = 0, *,
          n_images: int = 64, first_steps: int = 60, refine_steps: int = 150, n_refine: int = 3,
          batch: int = 32, candidates: list[int] = (), max_classes: int = MAX_CLASSES, spec=None) -> ProbeResult:
    """Neural-Cleanse search on `x_raw` (N, H, W, C raw pixels, N ≥ 8) over at most `max_classes` classes
    (`candidates` always among them); classes not searched get NaN norms and anomaly. `spec`: the model's
    InputSpec (see classifier). Raises BadData on too few images."""
    torch = require("torch", "torch")
    x_raw = check_images(x_raw)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_raw))
    opt_idx, held_idx = order[: min(n_images, len(x_raw) // 2)], order[min(n_images, len(x_raw) // 2):]
    torch.manual_seed(seed)
    graph = classifier(model, spec, frozen=True)
    hi = pixel_range(x_raw)
    x_all = torch.from_numpy(x_raw).to(device(torch))
    with torch.no_grad():
        logits, _ = graph(make_input(torch, x_all[torch.from_numpy(opt_idx)], pp))
    preds = logits.argmax(1).cpu().numpy()
    n_classes = logits.shape[1]

    searches = {}
    classes = searched_classes(n_classes, list(candidates), seed, max_classes)
    for c in classes:
        # Images the model already assigns to c teach nothing about flipping to c.
        pool = opt_idx[preds != c]
        if len(pool) == 0:
            pool = opt_idx
        s = _Search(torch, graph, pp, x_all[torch.from_numpy(pool)], c, hi, seed)
        s.run(first_steps, min(batch, len(pool)))
        searches[c] = s
    first = np.full(n_classes, np.nan)
    first[classes] = [searches[c].norm for c in classes]
    anomaly = np.full(n_classes, np.nan)
    anomaly[classes] = anomaly_index(first[classes])

    refined = {}
    for c in np.array(classes)[np.argsort(first[classes])[:n_refine]]:
        searches[int(c)].run(refine_steps, min(batch, len(searches[int(c)].x)))
        refined[int(c)] = searches[int(c)].norm
    best = int(np.nanargmax(anomaly))
    mask, pattern = searches[best].best
    trigger = Trigger(best, mask.cpu().numpy().astype(np.float32), pattern.cpu().numpy().astype(np.float32))

    with torch.no_grad():
        held = x_raw[held_idx]
        held_logits, _ = graph(make_input(torch, torch.from_numpy(held), pp))
        keep = held_logits.argmax(1).cpu().numpy() != best
        flip = 0.0
        if keep.any():
            stamped, _ = graph(make_input(torch, torch.from_numpy(trigger.stamp(held[keep])), pp))
            flip = float((stamped.argmax(1).cpu().numpy() == best).mean())
    suspected = best if anomaly[best] > ANOMALY_THRESHOLD else None
    return ProbeResult(first, anomaly, suspected, trigger, flip, refined)
