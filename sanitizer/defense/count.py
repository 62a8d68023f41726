"""Count: how many of a ranking's top units to prune, read off the probes on the held-out images.

The smallest count at which every probe that pruning can silence is at the attack-success goal; probes
that no count silences before the model breaks are ordinary adversarial weakness and do not count (unless
no probe falls, then each must reach the lowest rate it gets to). The same bars judge the candidates
(defend.py; a user's suspicious samples at defend.suspect_bar instead); the re-attack judges at FLIP_GOAL (its
sparse probe at USE_FLIP; reattack.py), the bounds by mean flip (bound.py). Every rate is read with onnxruntime.
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
    keep = base != target if paired else None
    return base, [flip_rate(pred, x, keep, target, batch_size) for x in probed_x]


def flip_rate(pred: Predictor, x: np.ndarray, keep: np.ndarray | None, target: int, batch_size: int) -> float:
    """Share of the probed images `x` [n, ...] (model inputs, float32) `pred` sends to `target`, counting only
    those whose clean twin (the first n held-out images) it does not already call `target` (`keep` [N] bool;
    None: unpaired, every image counts). 1.0 when no image is left to count: nothing shows the probe failing."""
    if keep is not None:
        x = x[keep[:len(x)]]
    return float((pred.logits(x, batch_size).argmax(1) == target).mean()) if len(x) else 1.0


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


class Checks:
    """The count search's reading of pruned models on the held-out images (`flips`' rule), kept by the set of
    units pruned, so that the rankings share the counts they have in common (the base at 0 units, often their
    first units), and lazy: a count's held-out predictions and agreement first, each probe's flip rate only
    when asked. A count the agreement already rules out, or that one probe over its bar already fails, costs
    no more: the decisions are those of reading every rate (onnxruntime inference is the step's whole cost)."""

    def __init__(self, ctx: Context, base: onnx.ModelProto, probed_x: list[np.ndarray], paired: bool):
        self.ctx, self.base, self.probed_x, self.paired = ctx, base, probed_x, paired
        self._seen: dict[frozenset, Check] = {}

    def at(self, units: list[tuple[str, int]]) -> Check:
        """The Check of `base` with `units` ((site, channel) pairs) pruned, measured once per set of units."""
        key = frozenset(units)
        if key not in self._seen:
            self._seen[key] = Check(self, Plan(list(units)).pruned(len(units)))
        return self._seen[key]

    def __len__(self) -> int:
        """Pruned models read so far."""
        return len(self._seen)


class Check:
    """One pruned model: its held-out predictions and agreement (read when made), its probes' flip rates (read
    when asked). Its onnxruntime session lives until `release`, and is made again if a rate is asked later."""

    def __init__(self, checks: Checks, pruned: dict[str, list[int]]):
        self._checks, self._pruned = checks, pruned
        ctx = checks.ctx
        self._pred: Predictor | None = None
        self.base = self._predictor().logits(ctx.clean_x, ctx.opts.batch_size).argmax(1)
        self.agreement = ctx.held.agreement_of(self.base)
        self._keep = self.base != ctx.target if checks.paired else None
        self.rates: dict[int, float] = {}

    def _predictor(self) -> Predictor:
        if self._pred is None:
            c = self._checks
            self._pred = Predictor(rewrite.apply(c.base, c.ctx.prep.sites, self._pruned), c.ctx.prep.spec)
        return self._pred

    def rate(self, i: int) -> float:
        """Flip rate of probe i (an index into the probed sets)."""
        if i not in self.rates:
            ctx = self._checks.ctx
            self.rates[i] = flip_rate(self._predictor(), self._checks.probed_x[i], self._keep, ctx.target,
                                      ctx.opts.batch_size)
        return self.rates[i]

    def first_over(self, bar: np.ndarray, order: Sequence[int]) -> int | None:
        """The first probe, in `order`, whose flip rate is over its `bar` (None: every one is within it); the
        probes after it are not read."""
        return next((i for i in order if self.rate(i) > bar[i]), None)

    def release(self) -> None:
        self._pred = None


def count_by_probes(ctx: Context, checks: Checks, order: list[tuple[str, int]], limit: int,
                    evidence: Sequence[int] = ()) -> tuple[Plan, float, np.ndarray]:
    """Smallest count at which every probe that some count silences is at the goal (within the goal of its
    lowest rate); only when none is silenced, every probe within the goal of its lowest rate. Rates are read
    on a doubling grid while the pruned model still agrees with the original on at least ALIVE of the
    held-out images (past that, flips say nothing: the model is broken).
    Units are pruned from `checks.base` (the original, or the original with its activations bounded); when
    the base already has every probe at the goal, nothing is pruned.
    Returns the plan (its trace has, per count measured, the held-out agreement, the estimated accuracy drop
    and the probes' flip rates — or, where one probe over its bar decided, that probe's), the pruned model's
    held-out agreement and the flip rate each probe must get under (inf: the probe does not count)."""
    plan = Plan(order)
    n = len(checks.probed_x)
    cap = min(limit, max(1, int(MAX_SHARE * len(order))))
    flips_at: dict[int, np.ndarray] = {}
    agree_at: dict[int, float] = {}

    def measure(k: int, bar: np.ndarray | None = None, first: Sequence[int] = (), alive_only: bool = False
                ) -> int | None:
        """Read count k: every probe's rate (bar None; none at all with `alive_only` when the agreement says
        the model is broken), or those up to the first over `bar`, in the order `first` then the rest, which
        is returned (None: every rate read)."""
        check = checks.at(order[:k])
        ag = check.agreement
        agree_at[k] = ag.rate
        entry = {"units": k, "agreement": round(ag.rate, 6), "drop_estimate": round(ag.drop, 6)}
        over = None
        if bar is not None:
            over = check.first_over(bar, [*first, *(i for i in range(n) if i not in first)])
        if over is not None:
            entry["probe_over_bar"] = {"probe": over, "flip": round(check.rates[over], 4)}
        elif not alive_only or ag.rate >= ALIVE:
            flips_at[k] = np.array([check.rate(i) for i in range(n)])
            entry["probe_flip"] = [round(r, 4) for r in flips_at[k]]
        check.release()
        plan.trace.append(entry)
        ctx.progress("search", len(plan.trace), 0)
        return over

    measure(0)
    if max(flips_at[0]) <= FLIP_GOAL:
        plan.count = 0
        return plan, agree_at[0], np.full(n, FLIP_GOAL)
    # the base itself (bounded) may already have every probe that counts under its bar
    grid, k = [0], 1
    # cap 0: the first unit would empty its layer (plan.safe_limit), so no count is read past the base
    while k <= cap:
        measure(k, alive_only=True)
        if agree_at[k] < ALIVE:
            break
        grid.append(k)
        if k == cap:
            break
        k = min(2 * k, cap)
    good = bars(np.min([flips_at[k] for k in grid], axis=0), evidence)

    def ok(k: int) -> bool:
        return bool((flips_at[k] <= good).all())

    # probes reach their floors at different counts; if no count has them all there, take the nearest miss
    hi = next((k for k in grid if ok(k)), min(grid, key=lambda k: (flips_at[k] - good).max()))
    lo = max([k for k in grid if k < hi], default=0)
    # every unit pruned past need costs clean accuracy: bisect between the grid points, reading first the
    # probes furthest over their bars at the count below (the likeliest to fail again)
    suspects = [int(i) for i in np.argsort(good - flips_at[lo], kind="stable")]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        over = measure(mid, good, suspects)
        if over is None:
            hi = mid
        else:
            lo = mid
            suspects = [over] + [i for i in suspects if i != over]
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
