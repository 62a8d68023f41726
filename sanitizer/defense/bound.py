"""Bound: the original with every unit capped at what clean images drive it to, at the loosest quantile past
which tighter bounds no longer take the probes off the target.

The graph rewrite is rewrite.apply_bounds (activation clipping, Wang, Xiang, Miller, Kesidis, MLSP 2024, on
the ℓ∞ signature of Cheng et al.); this step picks the quantile of each unit's per-image clean ℓ∞ on the
held-out images.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..rewrite import apply_bounds
from .count import FLIP_GOAL

if TYPE_CHECKING:
    from .context import Context

# Bounds tried, strongest last: each unit is capped at this quantile of its per-image clean ℓ∞ over the fit
# images (1.0: the largest any fit image reaches).
BOUND_QUANTILES = (1.0, 0.99, 0.95, 0.9, 0.8)
# Share of the accuracy budget the bounds may spend; the rest is the pruning's and the repair's.
BOUND_BUDGET = 0.5


def chosen_quantile(rates: dict[float, list[float]]) -> float:
    """Of the quantiles tried within the budget (`rates`: per quantile, loosest first, the used probes'
    held-out flip rates), the loosest whose mean flip rate is within FLIP_GOAL of the lowest mean any of
    them reaches: a tighter bound is taken only while it still takes probes off the target. Judged on the
    mean rather than probe by probe: a patch probe that falls from 0.54 to 0.054 has fallen, whether or not
    it crosses the goal, while a universal adversarial perturbation keeps falling slowly at every bound."""
    means = {q: float(np.mean(r)) for q, r in rates.items()}
    lowest = min(means.values())
    return next(q for q, m in means.items() if m <= lowest + FLIP_GOAL)


def choose_bounds(ctx: Context, clean: dict, probed_x: list[np.ndarray], paired: bool
                  ) -> tuple[onnx.ModelProto, dict]:
    """The original with every site's units bounded at a quantile of BOUND_QUANTILES (rewrite.apply_bounds):
    over the quantiles whose held-out accuracy drop stays within BOUND_BUDGET of the budget (bounds tighten
    monotonically, so the first past it ends the search), the one chosen_quantile picks from the probes'
    flip rates — where bounds do not move the probes (a blended or dense backdoor), the loosest, the largest
    ℓ∞ any fit image reaches, which changes (almost) nothing clean. Every prunable site is bounded,
    residual joins too.
    `clean`: rank.raw_stats over the fit images with per-image reductions kept. Returns the bounded model (the
    original when even the loosest bound spends too much) and what was tried, for the report."""
    prep = ctx.prep
    per_image = {s.name: clean[s.tensor].per_image["linf"] for s in prep.sites.values() if s.prunable}
    tried, models, rates = [], {}, {}
    for q in BOUND_QUANTILES:
        bounds = {name: np.quantile(v, q, axis=0) for name, v in per_image.items()}
        bounded = apply_bounds(prep.model, prep.sites, bounds)
        pred, rate = ctx.flips(bounded, probed_x, paired)
        ag = ctx.held.agreement_of(pred)
        tried.append({"quantile": q, "probe_flip": [round(r, 4) for r in rate], **ag.to_dict()})
        if not ag.within(BOUND_BUDGET * ctx.opts.max_acc_drop):
            break
        models[q], rates[q] = bounded, rate
    chosen = chosen_quantile(rates) if models else None
    return models.get(chosen, prep.model), {"quantile": chosen, "sites": len(per_image) if chosen is not None else 0,
                                            "tried": tried}
