"""Criteria: small functions from statistics to one score per unit. Low scores are pruned first."""
from __future__ import annotations

from typing import Callable

import numpy as np

from calib.stats import TensorStats

Criterion = Callable[[TensorStats], np.ndarray]

CRITERIA: dict[str, Criterion] = {
    "linf": lambda s: s.agg("linf"),   # Cheng et al.: units least active in ℓ∞ on clean data go first
    "mean": lambda s: s.agg("mean"),   # Fine-Pruning: lowest mean activation first
    "l1": lambda s: s.agg("l1"),
    "l2": lambda s: s.agg("l2"),
}


def normalised(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Make layers comparable when ranked jointly: each layer's scores over its own mean magnitude."""
    return {k: v / (np.abs(v).mean() + 1e-12) for k, v in scores.items()}
