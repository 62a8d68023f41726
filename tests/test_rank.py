"""Margin attribution against a brute-force run: onnxruntime on the graph with a mask multiplied into each site
tensor, one unit nudged at a time (central differences)."""
from __future__ import annotations

import numpy as np
import pytest

import models as M
from calib.preprocess import Preprocess
from masked import masked_reference
from test_rewrite import analyse

pytest.importorskip("torch")

from sanitizer.defense.rank import margin_gradients  # noqa: E402

PP = Preprocess(scale=1 / 255, mean=(0.5,), std=(0.25,), layout="nchw")
TARGET = 1


def _margins(model, raw: np.ndarray) -> np.ndarray:
    logits = M.run(model, {"input": PP.apply(raw)})[0].astype(np.float64)
    others = logits.copy()
    others[:, TARGET] = -np.inf
    return logits[:, TARGET] - others.max(1)


@pytest.mark.parametrize("builder", ["dense", "resnet", "mobilenet"])
def test_margin_gradients_match_central_differences(builder):
    model = M.BUILDERS[builder]()
    shapes, sites = analyse(model)
    chosen = [s for s in sites.values() if s.prunable]
    pool = M.images(160, seed=1)
    base, eps = _margins(model, pool), 1e-3
    slopes, kink = {}, np.zeros(len(pool), bool)
    for site in chosen:
        for unit in range(site.channels):
            def at(scale):
                mask = np.ones(site.channels)
                mask[unit] = scale
                return _margins(masked_reference(model, {site.tensor: (mask, len(shapes[site.tensor]))}), pool)
            up, down = at(1 + eps), at(1 - eps)
            right, left = (up - base) / eps, (base - down) / eps
            # a ReLU or the runner-up class switching inside ±eps: autograd takes one side, differences straddle
            kink |= np.abs(right - left) > 1e-3 * (1 + np.abs(right))
            slopes[site.name, unit] = (up - down) / (2 * eps)
    smooth = np.flatnonzero(~kink)
    assert len(smooth) >= 30, f"only {len(smooth)} of {len(pool)} images are away from every kink"
    probed, clean = smooth[:12], smooth[12:30]
    got = margin_gradients(model, chosen, PP, [pool[probed[:5]], pool[probed[5:]]], pool[clean], TARGET,
                           batch_size=4)
    for (name, unit), slope in slopes.items():
        expected = slope[probed].mean() - slope[clean].mean()
        assert got[name][unit] == pytest.approx(expected, abs=5e-4, rel=1e-2), (name, unit)
    assert len(slopes) >= 10 and max(np.abs(g).max() for g in got.values()) > 1e-2
