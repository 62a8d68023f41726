"""Count: how many of a ranking's top units to prune, read off the probes on the held-out images.

The smallest count at which every probe that pruning can silence is at the attack-success goal; probes
that no count silences before the model breaks are ordinary adversarial weakness and do not count (unless
no probe falls, then each must reach the lowest rate it gets to). The same bars judge the candidates
(defend.py); the re-attack judges at FLIP_GOAL (reattack.py), the bounds by mean flip (bound.py). Every
rate is read with onnxruntime.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .. import rewrite
from ..evaluate import Predictor
from ..plan import Plan

if TYPE_CHECKING:
    from .context import Context

# The attack-success level the defense aims for; also the smallest change in flip rate worth pruning for.
FLIP_GOAL = 0.05
# A probe that moves fewer than half the held-out images to the target is not following a shortcut.
USE_FLIP = 0.5
# A pruned model that agrees with the original on less than this share of held-out images is broken, not
# cleaned: its flip rates are noise, so the search does not look past it.
ALIVE = 0.5
# Pruning never goes past this share of the candidate units, whatever the probes say.
MAX_SHARE = 0.25


def flips(model: onnx.ModelProto, spec, clean_x: np.ndarray, probed_x: list[np.ndarray], target: int,
          batch_size: int, paired: bool = True) -> tuple[np.ndarray, list[float]]:
    """The model's predictions on the clean held-out images (for the agreement, one session for both) and
    per probe the share of them it does not already call `target` that the probe sends there; a probed set
    holds the first len(x) held-out images (fewer at a reduced effort). Unpaired probed images (a user's
    suspicious samples) count as the share of them called `target`."""
    pred = Predictor(model, spec)
    base = pred.logits(clean_x, batch_size).argmax(1)
    if not paired:
        return base, [float((pred.logits(x, batch_size).argmax(1) == target).mean()) for x in probed_x]
    keep = base != target
    if not keep.any():
        return base, [1.0 for _ in probed_x]
    return base, [float((pred.logits(x[keep[:len(x)]], batch_size).argmax(1) == target).mean())
                  if keep[:len(x)].any() else 1.0 for x in probed_x]


def bars(floor: np.ndarray, evidence: Sequence[int] = ()) -> np.ndarray:
    """Per probe, the flip rate a count must bring it under, from the lowest rate it reaches on the grid.
    `evidence`: probes that always count (a family probe that detection found the target with)."""
    good = np.maximum(FLIP_GOAL, floor + FLIP_GOAL)
    # A probe no count short of breaking the model silences is ordinary adversarial weakness: pruning only
    # wears it down with the model's accuracy, so it does not set the count while some probe does fall to
    # the goal — that one follows the shortcut. Not a probe of the family the target was found with: that one
    # is the backdoor's evidence, and a patch the pruning silences instead says nothing about it.
    silenced = floor <= FLIP_GOAL
    counted = silenced.copy()
    counted[list(evidence)] = True
    return np.where(counted, good, np.inf) if silenced.any() else good


def count_by_probes(ctx: Context, base: onnx.ModelProto, order: list[tuple[str, int]], limit: int,
                    probed_x: list[np.ndarray], paired: bool, evidence: Sequence[int] = ()) -> tuple[Plan, float, np.ndarray]:
    """Smallest count at which every probe that some count silences is at the goal (within the goal of its
    lowest rate); only when none is silenced, every probe within the goal of its lowest rate. Rates are read
    on a doubling grid while the pruned model still agrees with the original on at least ALIVE of the
    held-out images (past that, flips say nothing: the model is broken).
    Units are pruned from `base` (the original, or the original with its activations bounded); when `base`
    already has every probe at the goal, nothing is pruned.
    Returns the plan (its trace has, per count measured, the probes' flip rates, the held-out agreement and
    the estimated accuracy drop), the pruned model's held-out agreement and the flip rate each probe must
    get under (inf: the probe does not count)."""
    plan = Plan(order)
    cap = min(limit, max(1, int(MAX_SHARE * len(order))))
    flips_at: dict[int, list[float]] = {}
    agree_at: dict[int, float] = {}

    def measure(k: int) -> None:
        model = rewrite.apply(base, ctx.prep.sites, plan.pruned(k))
        pred, flips_at[k] = ctx.flips(model, probed_x, paired)
        ag = ctx.held.agreement_of(pred)
        agree_at[k] = ag.rate
        plan.trace.append({"units": k, "probe_flip": [round(r, 4) for r in flips_at[k]],
                           "agreement": round(agree_at[k], 6), "drop_estimate": round(ag.drop, 6)})
        ctx.progress("search", len(plan.trace), 0)

    measure(0)
    if max(flips_at[0]) <= FLIP_GOAL:
        plan.count = 0
        return plan, agree_at[0], np.full(len(probed_x), FLIP_GOAL)
    # the base itself (bounded) may already have every probe that counts under its bar
    grid, k = [0], 1
    while True:
        measure(k)
        if agree_at[k] < ALIVE:
            break
        grid.append(k)
        if k >= cap:
            break
        k = min(2 * k, cap)
    good = bars(np.min([flips_at[k] for k in grid], axis=0), evidence)

    def ok(k: int) -> bool:
        return bool((np.array(flips_at[k]) <= good).all())

    # probes reach their floors at different counts; if no count has them all there, take the nearest miss
    hi = next((k for k in grid if ok(k)), min(grid, key=lambda k: (np.array(flips_at[k]) - good).max()))
    lo = max([k for k in grid if k < hi], default=0)
    # every unit pruned past need costs clean accuracy: bisect between the grid points
    while hi - lo > 1:
        mid = (lo + hi) // 2
        measure(mid)
        if ok(mid):
            hi = mid
        else:
            lo = mid
    plan.count = hi
    plan.trace.sort(key=lambda t: t["units"])
    return plan, agree_at[hi], good


def preference(plan: Plan, max_acc_drop: float) -> tuple:
    """How a ranking's count (count_by_probes' plan, read off its trace) ranks against the other rankings', larger
    first: within the accuracy budget on the held-out estimate; then the more used probes brought to the goal
    — each one a shortcut the ranking's top units carry, while a probe left over it (or judged ordinary
    adversarial weakness) is one whose units the ranking did not find; then the higher held-out agreement and
    the fewer units."""
    at = next(t for t in reversed(plan.trace) if t["units"] == plan.count)
    return (at["drop_estimate"] <= max_acc_drop, sum(f <= FLIP_GOAL for f in at["probe_flip"]), at["agreement"],
            -plan.count)
