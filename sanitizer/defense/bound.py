"""Bound: the original with every unit capped at what clean images drive it to, at the loosest quantile that works.

The graph rewrite is rewrite.apply_bounds (activation clipping, Wang, Xiang, Miller, Kesidis, MLSP 2024, on
the ℓ∞ signature of Cheng et al.); this step picks the quantile of each unit's per-image clean ℓ∞ the way
count.py picks a count, on the held-out images.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..rewrite import apply_bounds
from .count import FLIP_GOAL, bars

if TYPE_CHECKING:
    from .context import Context

# Bounds tried, strongest last: each unit is capped at this quantile of its per-image clean ℓ∞ over the fit
# images (1.0: the largest any fit image reaches).
BOUND_QUANTILES = (1.0, 0.99, 0.95, 0.9, 0.8)
# Share of the accuracy budget the bounds may spend; the rest is the pruning's and the repair's.
BOUND_BUDGET = 0.5


def choose_bounds(ctx: Context, clean: dict, probed_x: list[np.ndarray], paired: bool
                  ) -> tuple[onnx.ModelProto, dict]:
    """The original with every site's units bounded at a quantile of BOUND_QUANTILES (rewrite.apply_bounds),
    chosen the way count.count_by_probes chooses a count: over the quantiles whose held-out accuracy drop
    stays within BOUND_BUDGET of the budget (bounds tighten monotonically, so the first past it ends the
    search), the loosest at which every probe that some bound silences is under its bar (count.bars); probes
    no bound silences are ordinary adversarial weakness and do not count. When no probe falls, the loosest
    bound — the largest ℓ∞ any fit image reaches — is kept for nothing. Every prunable site is bounded,
    residual joins too.
    `clean`: rank.raw_stats over the fit images with per-image reductions kept. Returns the bounded model (the
    original when even the loosest bound spends too much) and what was tried, for the report."""
    prep = ctx.prep
    per_image = {s.name: clean[s.tensor].per_image["linf"] for s in prep.sites.values() if s.prunable}
    tried, models, rates = [], {}, {}
    for q in BOUND_QUANTILES:
        bounds = {name: np.quantile(v, q, axis=0) for name, v in per_image.items()}
        bounded = apply_bounds(prep.model, prep.sites, bounds)
        pred, rates[q] = ctx.flips(bounded, probed_x, paired)
        ag = ctx.held.agreement_of(pred)
        tried.append({"quantile": q, "probe_flip": [round(r, 4) for r in rates[q]], **ag.to_dict()})
        if not ag.within(BOUND_BUDGET * ctx.opts.max_acc_drop):
            break
        models[q] = bounded
    chosen = None
    if models:
        floor = np.min([rates[q] for q in models], axis=0)
        good = bars(floor)
        chosen = BOUND_QUANTILES[0]
        if (floor <= FLIP_GOAL).any():
            chosen = next(q for q in models if (np.array(rates[q]) <= good).all())
    return models.get(chosen, prep.model), {"quantile": chosen, "sites": len(per_image) if chosen is not None else 0,
                                            "tried": tried}
