"""Detection: which class, if any, a backdoor sends images to, from unlabeled clean images.

Three searches, cheapest first (`detect` runs them and writes the report's "detection" section):

The patch scan. Short patch probes (probes.py) toward any class, then toward the few classes those reach
most (K-Arm's pre-selection of target arms, Shen et al. 2021, with a patch in place of the mask); a class
some patch sends nearly every image to is the target. The smallest side first; larger ones (SCAN_SIDES) only
when it finds nothing. On colour images a candidate's lead under the bar is tried again from a solid colour,
which a grey start does not reach in a few steps.

The family scan, when no patch finds one or only a patch of the larger side does (then the finding further
past its bar stands): the same with each probe family of probes.FAMILIES — a signal
repeated along one axis (SIG), a smooth warp of a pixel (WaNet) — that no patch or small mask expresses.
Each family has few degrees of freedom, so a model without such a backdoor admits it for a fraction of the
images, as with patches.

The mask search (Neural-Cleanse style, Wang et al. 2019). For each class we search the smallest mask +
pattern that sends clean images to that class. A backdoor target needs a far smaller mask than any other
class, which the MAD anomaly index exposes without labels. To fit a CPU budget every class gets a short
first round and only the few smallest-mask candidates are refined (as in K-Arm); the anomaly index is
computed on the first round, where every class had the same number of steps, so refinement cannot
manufacture an outlier.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from calib.preprocess import Preprocess

from ..errors import require
from .count import USE_FLIP
from .effort import FULL, Effort
from .probes import COLOUR_STARTS, FAMILIES, LARGE_PATCH_SIDE, N_PLACES, PATCH_SIDE, Probe, _Optimiser, _split, probe_name
from .torchnet import check_images, class_scores, classifier, device, make_input, pixel_range

if TYPE_CHECKING:
    from ..pipeline import Prepared, Progress

# Anomaly index above which the smallest mask is called a backdoor (the Neural Cleanse threshold:
# two consistent-MAD units, ~95% of a normal distribution lies within it).
ANOMALY_THRESHOLD = 2.0
# Attack success the synthesized trigger must keep while the mask shrinks.
SUCCESS_TARGET = 0.95
# Classes the mask search runs on at most, so that its cost does not grow with the number of classes: past
# it, the candidates it is given and a seeded sample of the other classes, which is what the median and MAD
# of the anomaly index need.
MAX_CLASSES = 32
# Share of held-back images one patch probe must send to a class to call it a backdoor target: a patch
# trigger works on nearly every image (that is its attack success rate), while the universal patches a
# model admits without a backdoor reach a fraction of them (0.3-0.55 on the suite's models, see README).
SCAN_FLIP = 0.9
# The family scan's bar for the warp: a smooth warp of at most a pixel sends at most 0.13 of images to any
# class on models without a warp backdoor (eight models: clean, patch, blend and signal backdoors, MNIST,
# GTSRB; README, "The family scan"), while WaNet trains with random warps beside its own so that only fields
# near the trigger's work, which a 4x4-grid probe approximates (0.84 on a WaNet model whose own trigger
# reaches 0.68). Half the images is the mark of a shortcut (count.USE_FLIP). The signal families keep
# SCAN_FLIP: they reach up to 0.69 of images on clean models.
FAMILY_FLIP = {"signal along columns": SCAN_FLIP, "signal along rows": SCAN_FLIP, "warp": USE_FLIP}
# Patch sides the scan tries in turn (shares of the image side), the larger only when the smaller finds no
# target: a probe smaller than a trigger may not approach it (on 16x16 digits a 2x2 probe sends 0.01-0.73 of
# the images to the target of a 3x3 square or checkerboard, a 3x3 one 0.84-1.0; scripts/train_digits_attacks.py),
# while on any model a larger one admits more universal patches: at 0.2 of the side the open suite's models
# send up to 0.82 of the images to a class that is not a target, at 0.3 up to 0.995 (README, "The patch scan").
# The same sides as the defense's probes (probes.PATCH_SIDE, LARGE_PATCH_SIDE).
SCAN_SIDES = (PATCH_SIDE, LARGE_PATCH_SIDE)
# The scan probes every class, so each probe gets a fifth of the steps and half the images of a final probe.
SCAN_STEPS = 20
SCAN_IMAGES = 32
# Classes the scan probes one by one after the patches toward any class have named them.
SCAN_CANDIDATES = 5
# The mask search at full effort: first-round optimiser steps of BATCH images drawn from MASK_IMAGES, and
# the steps refining each of the MASK_REFINED smallest masks.
MASK_STEPS, MASK_BATCH, MASK_IMAGES, MASK_REFINE, MASK_REFINED = 60, 32, 64, 150, 3
# How detection names a target that a patch at the place of its smallest mask sends nearly every image to
MASK_PLACE = "patch at the mask's place"
# Classes the mask search keeps at the least effort: the anomaly index's median and MAD need about a dozen.
MIN_MASK_CLASSES = 12


def _per_class(values: np.ndarray, digits: int) -> list[float | None]:
    """A per-class array for the report; null where the class was not looked at (NaN)."""
    return [None if np.isnan(v) else round(float(v), digits) for v in values]


def scan_work(effort: Effort, n_fit: int, families: int = 0, sides: int = 1, colour: bool = False
              ) -> tuple[float, float]:
    """The patch scan's work at `effort` on `n_fit` images at `sides` patch sides (with `families` > 0: the
    family scan's, that many families), as effort.PassCost counts it: (torch forward+backward image passes,
    onnxruntime forward image passes), a torch forward counted as half a pass. `colour`: colour images, whose
    candidates' leads may each be tried again from a solid colour (scan)."""
    fit = min(effort.images(SCAN_IMAGES), n_fit // 2)
    probes = (families or N_PLACES * sides) * (1 + SCAN_CANDIDATES)
    tests = n_fit + probes * effort.tests(n_fit - fit)
    passes = probes * effort.steps(SCAN_STEPS) * fit + 0.5 * tests
    if colour and not families:
        leads = sides * SCAN_CANDIDATES
        passes += leads * ((effort.steps(SCAN_STEPS) + 0.5 * len(COLOUR_STARTS)) * fit + 0.5 * effort.tests(n_fit - fit))
    return passes, 0.0


def mask_work(effort: Effort, n_fit: int, n_classes: int) -> tuple[float, float]:
    """The mask search's work at `effort` on `n_fit` images of an `n_classes` model (as scan_work)."""
    images = min(effort.images(MASK_IMAGES), n_fit // 2)
    batch = min(effort.images(MASK_BATCH), images)
    classes = min(n_classes, mask_classes(effort))
    steps = classes * effort.steps(MASK_STEPS) + MASK_REFINED * effort.steps(MASK_REFINE)
    # then a patch of each side at each refined class's mask place, as the patch scan's (scan_work)
    fit = min(effort.images(SCAN_IMAGES), n_fit // 2)
    places = MASK_REFINED * len(SCAN_SIDES)
    return (steps * batch + 0.5 * (n_fit - images) + places * effort.steps(SCAN_STEPS) * fit
            + 0.5 * places * effort.tests(n_fit - fit)), 0.0


def mask_classes(effort: Effort) -> int:
    """Classes the mask search runs on at `effort`."""
    return max(MIN_MASK_CLASSES, round(MAX_CLASSES * effort.breadth()))


def _full(stage: str, work, optional: bool = False) -> Effort:
    return FULL


def detect(prep: Prepared, fit: np.ndarray, seed: int, progress: Progress,
           size: Callable[[str, Callable[[Effort], tuple[float, float]]], Effort] = _full) -> dict:
    """Which class, if any, a backdoor sends images to, judged on the fit images only.

    First short patch probes (cheap, and decisive for patch triggers): toward any class, then toward the
    few classes those reach most, at the smaller side of SCAN_SIDES, then, when it finds nothing, at the
    larger; then, unless the smaller side found the target, the family scan (a target of both scans: the
    finding further past its bar, `stronger`); when no scan finds a target, the Neural-Cleanse mask search
    over the candidates and a sample of the other classes, whose smallest-mask anomaly also catches triggers
    that are not a patch (blended, full-image). No step's cost grows with the number of classes. `size`:
    (search name, its work at an effort: scan_work, mask_work, optional=False) -> the Effort it runs at
    (effort.py; the pipeline's sizes each search as it comes, so a patch found at full effort pays for no mask
    search), or None for an optional search (the larger patch side) that does not fit: it is skipped."""
    progress("detection", 0, 3)
    start = time.perf_counter()
    raw = prep.calib.subset(fit).read(0, len(fit))
    colour = raw.shape[-1] == 3
    effort = size("patch scan", lambda e: scan_work(e, len(fit), colour=colour))
    # one torch copy of the model and one split of the images for the scans (unless their images differ)
    reach = _Reach(prep.model, raw, prep.pre, seed, effort.images(SCAN_IMAGES), prep.spec, effort.tests)

    def resized(stage: str, work, **kw) -> Effort | None:
        """`size` of a later scan; its own split of the images where its breadth differs from the last one's."""
        nonlocal reach
        new = size(stage, work, **kw)
        if new is not None and new.breadth() != effort.breadth():
            reach = _Reach(prep.model, raw, prep.pre, seed, new.images(SCAN_IMAGES), prep.spec, new.tests)
        return new

    patch = scan(prep.model, raw, prep.pre, seed, steps=effort.steps(SCAN_STEPS), spec=prep.spec,
                 reach=reach, shares=SCAN_SIDES[:1])
    larger = distinct_sides(reach.opt, SCAN_SIDES)[1:]
    if patch.suspected_target is None and larger:
        # sized as a stage of its own, so that a patch found at the smallest side costs what it did alone; a
        # second try, so it gives way (skipped, and said so) where even its least effort is over its part of
        # --time-budget, as on an ImageNet-size model (README, Where the time goes)
        wider = resized("larger patch scan", lambda e: scan_work(e, len(fit), sides=len(larger), colour=colour),
                        optional=True)
        if wider is not None:
            effort = wider
            patch = scan(prep.model, raw, prep.pre, seed, steps=effort.steps(SCAN_STEPS), spec=prep.spec,
                         reach=reach, shares=larger, before=patch)
    out = {"patch_scan": {"best_flip": _per_class(patch.best_flip, 4), "candidates": patch.candidates,
                          "threshold": SCAN_FLIP,
                          "by_side": {str(side): _per_class(v, 4) for side, v in patch.by_side.items()},
                          "found_at_side": patch.found_at and patch.found_at[0],
                          "found_at_share": patch.found_at and patch.found_at[1],
                          "colour_start": {str(side): {str(c): round(r, 4) for c, r in v.items()}
                                           for side, v in patch.colour.items()}}}
    target, how = patch.suspected_target, "patch scan"
    progress("detection", 1, 3)
    # A patch of the larger side has more freedom than a probe family: models without a backdoor admit one on
    # up to 0.84 of the images (README, Detection), so its target must not pre-empt a signal or warp backdoor
    # the family scan would find: the scan runs, and of two different targets the stronger finding stands.
    larger_found = target is not None and patch.found_at[1] != SCAN_SIDES[0]
    if target is None or larger_found:
        effort = resized("family scan", lambda e: scan_work(e, len(fit), len(FAMILIES)))
        fam = family_scan(prep.model, raw, prep.pre, seed, steps=effort.steps(SCAN_STEPS),
                          spec=prep.spec, reach=reach)
        out["family_scan"] = {"best_flip": {f: _per_class(v, 4) for f, v in fam.best_flip.items()},
                              "candidates": fam.candidates, "threshold": FAMILY_FLIP}
        if fam.suspected_target is not None and fam.suspected_target != target:
            finding = Finding(fam.suspected_target, f"family scan: {fam.family}",
                              float(np.nanmax(fam.best_flip[fam.family])), FAMILY_FLIP[fam.family])
            if target is not None:
                finding, weaker = stronger(Finding(target, how, float(patch.best_flip[target]), SCAN_FLIP), finding)
                out["overruled"] = weaker.to_dict()
            if finding.how != how:
                target, how = finding.target, finding.how
                out["family"] = fam.family
    progress("detection", 2, 3)
    if target is None:
        n_classes = len(patch.best_flip)
        effort = size("mask search", lambda e: mask_work(e, len(fit), n_classes))
        found = mask_search(prep.model, raw, prep.pre, seed, candidates=patch.candidates, spec=prep.spec,
                            n_images=effort.images(MASK_IMAGES), batch=effort.images(MASK_BATCH),
                            first_steps=effort.steps(MASK_STEPS),
                            refine_steps=effort.steps(MASK_REFINE), max_classes=mask_classes(effort))
        target, how = found.suspected_target, "mask anomaly"
        sides = [reach.opt.side(share) for share in distinct_sides(reach.opt, SCAN_SIDES)]
        places = {c: trigger_places(m, sides) for c, m in found.masks.items()}
        out["neural_cleanse"] = {"anomaly_index": _per_class(found.anomaly, 4),
                                 "mask_l1": _per_class(found.mask_norms, 3),
                                 "threshold": ANOMALY_THRESHOLD,
                                 "synthesized_trigger_flip_rate": round(found.flip_rate, 4),
                                 "trigger_places": {str(c): [list(p) for p in v] for c, v in places.items()}}
        if target is None:
            # the corners and the centre are where patch triggers usually sit, not everywhere one can: where the
            # smallest masks are, a patch of the scan's sides is judged as the scan judges one
            at_mask = mask_place_scan(reach, places, effort.steps(SCAN_STEPS))
            out["mask_place_scan"] = {"best_flip": {str(c): round(f, 4) for c, f in at_mask.items()},
                                      "threshold": SCAN_FLIP}
            best = max(at_mask, key=at_mask.get, default=None)
            if best is not None and at_mask[best] >= SCAN_FLIP:
                target, how = best, MASK_PLACE
    progress("detection", 3, 3)
    return {"verdict": "no backdoor found" if target is None else f"backdoor suspected, target class {target}",
            "suspected_target": target, "found_by": how if target is not None else None, **out,
            "seconds": round(time.perf_counter() - start, 1)}


@dataclass
class Finding:
    """A scan's suspected target: the class, the scan that named it, its best flip rate there and its bar."""

    target: int
    how: str
    flip: float
    bar: float

    def past_bar(self) -> float:
        """How far past its bar the flip rate is, as a share of the way from the bar to every image: a trigger
        works on nearly every image, whatever the probe that imitates it."""
        return (self.flip - self.bar) / (1.0 - self.bar)

    def to_dict(self) -> dict:
        return {"class": self.target, "by": self.how, "flip": round(self.flip, 4), "threshold": self.bar,
                "past_threshold": round(self.past_bar(), 4)}


def stronger(a: Finding, b: Finding) -> tuple[Finding, Finding]:
    """(the stronger, the weaker) of two findings that name different targets: the one further past its bar
    (past_bar); on a tie `a`."""
    return (a, b) if a.past_bar() >= b.past_bar() else (b, a)


@dataclass(frozen=True)
class Leads:
    """What detection tells the defense to probe beside the patches at the corners and the centre and the blend,
    for the target it names: the probe families that found it (families_for) and the patch places (side, row,
    col) where the mask search's mask toward it sits (places_for). The defense synthesizes them with its own
    probes and again in the re-attack; empty, the fixed probes alone. `colour`: the target was found by a patch
    started at a solid colour (scan), so the defense's patches start at one too."""

    families: tuple[str, ...] = ()
    places: tuple[tuple[int, int, int], ...] = ()
    colour: bool = False

    @classmethod
    def of(cls, detection: dict | None) -> Leads:
        """The leads of `detection` (detect's report section; None: detection did not run)."""
        return cls(families_for(detection), places_for(detection), colour_for(detection))


def colour_for(detection: dict | None) -> bool:
    """Whether the patch scan of `detection` (detect's report section) found its target with a patch started at
    a solid colour (a colour trigger the grey start does not reach)."""
    target = (detection or {}).get("suspected_target")
    by_side = (detection or {}).get("patch_scan", {}).get("colour_start", {})
    return target is not None and any(v.get(str(target), 0.0) >= SCAN_FLIP for v in by_side.values())


def families_for(detection: dict | None) -> tuple[str, ...]:
    """The probe families (probes.FAMILIES) the defense adds for the target `detection` (detect's report
    section) names: the one that found it, and any other whose scan sent at least half the images there (a
    signal at 0.7 is under its bar, but when the mask search then names the same class the
    shortcut it follows is the backdoor's; probes under half are not used anyway)."""
    target = (detection or {}).get("suspected_target")
    if target is None:
        return ()
    rates = detection.get("family_scan", {}).get("best_flip", {})
    return tuple(f for f in FAMILIES
                 if f == detection.get("family") or (f in rates and (rates[f][target] or 0.0) >= USE_FLIP))


def places_for(detection: dict | None) -> tuple[tuple[int, int, int], ...]:
    """The patch places (side, row, col) the defense probes beside the corners and the centre for the target
    `detection` (detect's report section) names: where the mask search's mask toward it sits, when the mask
    search ran. A patch trigger can sit anywhere, and a probe away from it does not approach it (a 3x3 square
    at the middle of a 16x16 digit's left edge: every corner and centre probe 0.06, the mask search's anomaly
    4.1 toward the right class); the mask toward the target says where to look."""
    target = (detection or {}).get("suspected_target")
    places = (detection or {}).get("neural_cleanse", {}).get("trigger_places", {})
    return tuple(tuple(p) for p in places.get(str(target), ())) if target is not None else ()


def other_targets(detection: dict | None) -> list[int]:
    """Classes besides the suspected target that a scan of `detection` (detect's report section) found over its
    bar too — the patch scan at any side, a probe family, a patch at a mask's place — less a finding the stronger
    one overruled (`stronger`): a second backdoor, which the defense, aimed at one target, leaves in place."""
    target = (detection or {}).get("suspected_target")
    if target is None:
        return []
    over = set()
    for rates in detection.get("patch_scan", {}).get("by_side", {}).values():
        over |= {c for c, r in enumerate(rates) if r is not None and r >= SCAN_FLIP}
    for family, rates in detection.get("family_scan", {}).get("best_flip", {}).items():
        over |= {c for c, r in enumerate(rates) if r is not None and r >= FAMILY_FLIP[family]}
    over |= {int(c) for c, r in detection.get("mask_place_scan", {}).get("best_flip", {}).items() if r >= SCAN_FLIP}
    over -= {target, detection.get("overruled", {}).get("class")}
    return sorted(over)


def mask_place_scan(reach: _Reach, places: dict[int, list[tuple[int, int, int]]], steps: int) -> dict[int, float]:
    """Per class of `places` (class -> (side, row, col) per patch side: trigger_places of its mask), the best
    share of the scan's test images a patch probe at those places sends to it (the patch scan's probe and
    images, `reach`; 0.0 where every image is already in the class)."""
    shares = {reach.opt.side(share): share for share in distinct_sides(reach.opt, SCAN_SIDES)}
    out = {}
    for c, at in places.items():
        fit = reach.outside(c)
        out[c] = 0.0
        if fit is None:
            continue
        for side, r, col in at:
            probes = reach.opt.patches(c, steps, fit, share=shares[side], places=[(side, r, col)],
                                       only={probe_name("patch", side, (r, col))})
            out[c] = max([out[c]] + [float(reach.rates(p)[c]) for p in probes])
    return out


def trigger_places(mask: np.ndarray, sides) -> list[tuple[int, int, int]]:
    """Per patch side s of `sides` (pixels), (s, row, col): the top-left corner of the s x s window that holds
    the most of `mask` ((H, W, 1) or (H, W), the mask search's), the first such window on a tie."""
    m = np.asarray(mask, np.float64).reshape(mask.shape[0], mask.shape[1])
    table = np.pad(m.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    out = []
    for s in sides:
        s = min(s, *m.shape)
        mass = table[s:, s:] - table[:-s, s:] - table[s:, :-s] + table[:-s, :-s]
        r, c = np.unravel_index(int(np.argmax(mass)), mass.shape)
        out.append((int(s), int(r), int(c)))
    return out


def evidence(detection: dict) -> str:
    """One line on what the verdict rests on, for summaries."""
    flips = detection["patch_scan"]["best_flip"]
    top = int(np.argmax(flips))
    sides = [int(side) for side in detection["patch_scan"].get("by_side", {})]
    tried = f" ({', '.join(f'{side}x{side}' for side in sides)} tried)" if len(sides) > 1 else ""
    parts = [f"best patch probe sends {flips[top]:.2f} of images to class {top}, "
             f"threshold {detection['patch_scan']['threshold']}{tried}"]
    scan = detection.get("family_scan", {})
    for family, rates in scan.get("best_flip", {}).items():
        top = int(np.nanargmax(np.array(rates, float)))
        parts.append(f"best {family} probe {rates[top]:.2f} to class {top}, threshold {scan['threshold'][family]}")
    if "neural_cleanse" in detection:
        nc = detection["neural_cleanse"]
        parts.append(f"max mask anomaly {max(a for a in nc['anomaly_index'] if a is not None):.2f}, "
                     f"threshold {nc['threshold']}")
    if "overruled" in detection:
        other = detection["overruled"]
        parts.append(f"class {other['class']} ({other['by']}, {other['flip']:.2f} against {other['threshold']}) "
                     f"overruled: the target's finding is further past its threshold")
    if "not_confirmed" in detection:
        doubt = detection["not_confirmed"]
        parts.append(f"class {doubt['class']} ({doubt['by']}) not confirmed: the best probe toward it, "
                     f"{doubt['best_probe']}, reaches {doubt['best_probe_flip']:.2f} of held-out images, "
                     f"under {USE_FLIP}")
    return "; ".join(parts)


# ---- the patch scan

@dataclass
class Scan:
    best_flip: np.ndarray          # per class: the highest share of test images one patch probe sends there
    suspected_target: int | None
    candidates: list[int]          # the classes probed one by one, side by side, most reached first
    by_side: dict[int, np.ndarray] # per patch side tried (pixels), per class: the best flip at that side
    found_at: tuple[int, float] | None = None   # the side (pixels, share) that found the target
    # per side, per class whose lead was tried again from a solid colour (colour images): that probe's flip
    colour: dict[int, dict[int, float]] = field(default_factory=dict)


def reach_rates(base: np.ndarray, sent: np.ndarray, n_classes: int) -> np.ndarray:
    """Per class (float [n_classes]), the share of the images a probe sends there among those the model does
    not already put in it: `base` int [N] the predictions without the probe, `sent` int [N] with it. Images
    already in a class say nothing about reaching it."""
    classes = np.arange(n_classes)
    outside = base[:, None] != classes[None, :]
    return ((sent[:, None] == classes[None, :]) & outside).sum(0) / np.maximum(outside.sum(0), 1)


class _Reach:
    """Per class, the share of test images a probe sends there among those the model does not already
    put in it; probes are fitted on the other images (`n_images` of `x_raw`, half when there are few).
    `tests`: how many of the rest to test on, of how many there are (all by default)."""

    def __init__(self, model: onnx.ModelProto, x_raw: np.ndarray, pp: Preprocess, seed: int, n_images: int, spec,
                 tests=lambda n: n):
        x_raw = check_images(x_raw)
        self.x_fit, self.x_test = _split(x_raw, min(n_images, len(x_raw) // 2), seed)
        self.x_test = self.x_test[:tests(len(self.x_test))]
        self.opt = _Optimiser(model, self.x_fit, pp, pixel_range(x_raw), spec)
        fit_logits = self.opt.logits(self.x_fit)
        self.fit_pred, self.n_classes = fit_logits.argmax(1), fit_logits.shape[1]
        self.test_pred = self.opt.logits(self.x_test).argmax(1)

    def rates(self, probe: Probe) -> np.ndarray:
        return reach_rates(self.test_pred, self.opt.logits(probe.apply(self.x_test)).argmax(1), self.n_classes)

    def any_class(self, steps: int, exclude: tuple[int, ...] = (), share: float = PATCH_SIDE) -> np.ndarray:
        """Per class, the best rate of a patch (of `share` of the image side) at each place pushed toward
        whichever class (but `exclude`) it can reach."""
        x = self.opt.torch.from_numpy(self.x_fit)
        return np.max([self.rates(p) for p in self.opt.patches(None, steps, x, share=share, exclude=exclude)], axis=0)

    def outside(self, c: int):
        """The fit images the model does not already put in class `c` (a torch tensor), or None when there
        are none, or no test image is outside it either."""
        fit = self.x_fit[self.fit_pred != c]
        return self.opt.torch.from_numpy(fit) if len(fit) and (self.test_pred != c).any() else None


def scan(model: onnx.ModelProto, x_raw: np.ndarray, pp: Preprocess, seed: int = 0, *,
         steps: int = SCAN_STEPS, n_images: int = SCAN_IMAGES, n_candidates: int = SCAN_CANDIDATES,
         spec=None, reach: _Reach | None = None, shares=SCAN_SIDES, before: Scan | None = None) -> Scan:
    """Short patch probes; a class some patch sends nearly every image to is the target.

    That is what a patch backdoor is — a small stamp that works on any image — while the universal patches
    a model admits without a backdoor reach a fraction of the images. So that the cost does not grow with
    the number of classes, a patch at each place first goes toward whichever class it can reach; the
    `n_candidates` classes those patches send most test images to are then probed one by one (K-Arm's
    pre-selection of target arms, Shen et al. 2021, with a patch in place of the mask). On colour images, when
    no class reaches the bar at a side, a candidate whose best own patch reaches count.USE_FLIP is tried again at
    that patch's place from a solid colour (probes._Optimiser.patches' colour_start; `Scan.colour`). A class's
    best flip is the best of these, over the sides tried: each of `shares` (of the image side; distinct_sides) in turn
    until one finds a target, skipping the sides `before` (an earlier scan of these images; returned as it is
    when it found a target) tried. Probes are
    fitted on `n_images` of `x_raw` and tested on the rest (half each when there are few), in both cases on
    images the model does not already put in the class. `reach`: the _Reach of these arguments, when the
    caller already made one."""
    if before is not None and before.suspected_target is not None:
        return before
    reach = reach or _Reach(model, x_raw, pp, seed, n_images, spec)
    by_side = dict(before.by_side) if before else {}
    colour = dict(before.colour) if before else {}
    candidates, found_at = list(before.candidates) if before else [], None
    for share in distinct_sides(reach.opt, shares):
        side = reach.opt.side(share)
        if side in by_side:
            continue
        best = reach.any_class(steps, share=share)
        probed = _candidates(best, n_candidates)
        candidates += [c for c in probed if c not in candidates]
        leads = {}   # per candidate, the place of its best patch toward it and that patch's rate
        for c in probed:
            fit = reach.outside(c)
            if fit is not None:
                rates = {p.at: float(reach.rates(p)[c]) for p in reach.opt.patches(c, steps, fit, share=share)}
                best[c] = max(best[c], *rates.values())
                leads[c] = max(rates.items(), key=lambda item: item[1])
        if best.max() < SCAN_FLIP and reach.opt.ch == 3:
            # a lead (half the images: the mark of a shortcut, count.USE_FLIP) that a grey start could not take
            # further may be a colour trigger: its place again, from the solid colour that suits it best
            for c, (at, lead) in leads.items():
                if lead < USE_FLIP:
                    continue
                probe, = reach.opt.patches(c, steps, reach.outside(c), share=share,
                                           only={probe_name("patch", side, at)}, colour_start=True)
                rate = float(reach.rates(probe)[c])
                colour.setdefault(side, {})[c] = rate
                best[c] = max(best[c], rate)
        by_side[side] = best
        if best.max() >= SCAN_FLIP:
            found_at = (side, share)
            break
    overall = np.max(list(by_side.values()), axis=0)
    top = int(np.argmax(overall))
    return Scan(overall, top if overall[top] >= SCAN_FLIP else None, candidates, by_side, found_at, colour)


def distinct_sides(opt: _Optimiser, shares) -> list[float]:
    """`shares` (of the image side) less those whose patch side in pixels an earlier one already has."""
    seen: dict[int, float] = {}
    for share in shares:
        seen.setdefault(opt.side(share), share)
    return list(seen.values())


def _candidates(best: np.ndarray, n: int) -> list[int]:
    return [int(c) for c in np.argsort(-best, kind="stable")[:n]]


@dataclass
class FamilyScan:
    best_flip: dict[str, np.ndarray]   # per family of probes.FAMILIES, per class: the best share of test images
    suspected_target: int | None
    family: str | None                 # the family that reached the target
    candidates: dict[str, list[int]]   # per family, the classes probed one by one


def family_scan(model: onnx.ModelProto, x_raw: np.ndarray, pp: Preprocess, seed: int = 0, *,
                steps: int = SCAN_STEPS, n_images: int = SCAN_IMAGES, n_candidates: int = SCAN_CANDIDATES,
                spec=None, reach: _Reach | None = None) -> FamilyScan:
    """The patch scan's search with each family of probes.FAMILIES in place of the patches: one probe toward
    any class, then one toward each of the `n_candidates` classes it reaches most; a class one probe sends
    its family's FAMILY_FLIP of the test images to is the target (of the family over its bar that reaches
    the most, on a tie the first in FAMILIES). Same images and steps as `scan` (`reach`: as there)."""
    reach = reach or _Reach(model, x_raw, pp, seed, n_images, spec)
    best, candidates = {}, {}
    for family in FAMILIES:
        rates = reach.rates(reach.opt.family(family, None, steps))
        candidates[family] = _candidates(rates, n_candidates)
        for c in candidates[family]:
            fit = reach.outside(c)
            if fit is not None:
                rates[c] = max(rates[c], float(reach.rates(reach.opt.family(family, c, steps, x=fit))[c]))
        best[family] = rates
    target, family = family_verdict(best)
    return FamilyScan(best, target, family, candidates)


def family_verdict(best: dict[str, np.ndarray]) -> tuple[int | None, str | None]:
    """The target and the family that found it from the family scan's best flip rate per family and class
    (float arrays, NaN where not measured): of the families whose best class reaches FAMILY_FLIP, the one that
    reaches the most (on a tie the first in FAMILIES); (None, None) when none does."""
    over = [f for f in FAMILIES if f in best and np.nanmax(best[f]) >= FAMILY_FLIP[f]]
    if not over:
        return None, None
    family = max(over, key=lambda f: np.nanmax(best[f]))
    return int(np.nanargmax(best[family])), family


# ---- the mask search (Neural Cleanse)

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
    masks: dict[int, np.ndarray] = field(default_factory=dict)   # refined classes' masks, (H, W, 1) in [0, 1]


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


def mask_search(model: onnx.ModelProto, x_raw: np.ndarray, pp: Preprocess, seed: int = 0, *,
          n_images: int = MASK_IMAGES, first_steps: int = MASK_STEPS, refine_steps: int = MASK_REFINE,
          n_refine: int = MASK_REFINED, batch: int = MASK_BATCH, candidates: list[int] = (), max_classes: int = MAX_CLASSES, spec=None) -> ProbeResult:
    """Neural-Cleanse search on `x_raw` (N, H, W, C raw pixels, N ≥ 8) over at most `max_classes` classes
    (`candidates` always among them); classes not searched get NaN norms and anomaly. `spec`: the model's
    InputSpec (see torchnet.classifier). Raises BadData on too few images."""
    torch = require("torch", "torch")
    x_raw = check_images(x_raw)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_raw))
    opt_idx, held_idx = order[: min(n_images, len(x_raw) // 2)], order[min(n_images, len(x_raw) // 2):]
    torch.manual_seed(seed)
    graph = classifier(model, spec, frozen=True)
    hi = pixel_range(x_raw)
    x_all = torch.from_numpy(x_raw).to(device(torch))
    logits = class_scores(torch, graph, x_all[torch.from_numpy(opt_idx)], pp)
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

    refined, masks = {}, {}
    for c in np.array(classes)[np.argsort(first[classes])[:n_refine]]:
        searches[int(c)].run(refine_steps, min(batch, len(searches[int(c)].x)))
        refined[int(c)] = searches[int(c)].norm
        masks[int(c)] = searches[int(c)].best[0].cpu().numpy().astype(np.float32)
    best = int(np.nanargmax(anomaly))
    mask, pattern = searches[best].best
    trigger = Trigger(best, mask.cpu().numpy().astype(np.float32), pattern.cpu().numpy().astype(np.float32))

    held = x_raw[held_idx]
    keep = class_scores(torch, graph, torch.from_numpy(held), pp).argmax(1).cpu().numpy() != best
    flip = 0.0
    if keep.any():
        stamped = class_scores(torch, graph, torch.from_numpy(trigger.stamp(held[keep])), pp)
        flip = float((stamped.argmax(1).cpu().numpy() == best).mean())
    suspected = best if anomaly[best] > ANOMALY_THRESHOLD else None
    return ProbeResult(first, anomaly, suspected, trigger, flip, refined, masks)
