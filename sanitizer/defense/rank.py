"""Rank: three orderings of every unit of every layer, of which the held-out images pick one (defend.py).

Two by how far the probes lift a unit's ℓ∞ (max over the spatial map) above what clean images do — the
signature Cheng et al. rank by ("Defending against Backdoor Attack on Deep Neural Networks"), measured with
synthesized probes in place of the unknown trigger — in two normalisations (ell_inf_gaps, on onnxruntime);
and one by margin attribution (margin_gradients, torch), which finds the units that matter to the decision
among those that merely fire. linf_histograms gives the per-image ℓ∞ of the top units for the figures.

Margin attribution: per unit, how much the probes' pull toward the target rests on it.
Every unit gets a multiplicative mask held at 1; the gradient of the target margin (target logit minus
the best other logit) with respect to that mask is the first-order change in the margin if the unit were
pruned. Averaged over probed images it says which units carry the probe to the target; the same average
over the clean images is subtracted, because units that lean clean images toward the target too are the
class's own features, not the shortcut. Unlike an ℓ∞ rise, the score is in logits for every layer, so conv
channels and dense neurons rank on one scale, and units that fire hard on the probe but do not matter to
the decision score nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from calib.preprocess import Preprocess
from calib.stats import collect

from ..errors import require
from ..graph import Site, stat_tensors
from .torchnet import classifier, device, make_input

if TYPE_CHECKING:
    from .context import Context

# Clean ℓ∞ below this share of the layer's mean counts as dormant (see ell_inf_gaps).
DORMANT = 0.1
# Units of the ranking whose per-image ℓ∞ the figures show.
TOP_UNITS = 4


def margin_gradients(model: onnx.ModelProto, sites: list[Site], pp: Preprocess, probed_sets: list[np.ndarray],
                     clean_raw: np.ndarray, target: int, batch_size: int, spec=None) -> dict[str, np.ndarray]:
    """Per site, per unit: mean margin gradient over the probed sets minus the mean over clean images.
    `spec`: the model's InputSpec (see torchnet.classifier)."""
    torch = require("torch", "torch")
    graph = classifier(model, spec, frozen=True)

    def mean_gradient(sets: list[np.ndarray]) -> dict[str, np.ndarray]:
        masks = {s.tensor: torch.ones(s.mask_shape, device=device(torch), requires_grad=True) for s in sites}
        n = 0
        for raw in sets:
            for i in range(0, len(raw), batch_size):
                logits, _ = graph(make_input(torch, torch.from_numpy(np.asarray(raw[i:i + batch_size], np.float32)),
                                             pp), masks=masks)
                others = logits.clone()
                others[:, target] = -torch.inf
                (logits[:, target] - others.max(1).values).sum().backward()
                n += len(logits)
        return {s.name: masks[s.tensor].grad.reshape(-1).cpu().numpy() / max(n, 1) for s in sites}

    probed, clean = mean_gradient(probed_sets), mean_gradient([clean_raw])
    return {name: probed[name] - clean[name] for name in probed}


def raw_stats(model: onnx.ModelProto, tensors: dict, spec, pre, raw: np.ndarray, batch_size: int,
              keep_per_image: bool = False):
    """Statistics of `tensors` over raw images held in memory (probed copies, suspicious samples)."""
    batches = (pre.apply(raw[i:i + batch_size]) for i in range(0, len(raw), batch_size))
    return collect(model, tensors, batches, spec.name, fixed_batch=spec.batch, keep_per_image=keep_per_image,
                   output=spec.output).stats


def ell_inf_gaps(ctx: Context, sites: list[Site], clean: dict, probed_sets: list[np.ndarray]
                 ) -> dict[str, dict[str, np.ndarray]]:
    """Two rankings of the probed images' ℓ∞ rise over clean images, per site and unit, summed over sets.

    `relative`: the rise over the unit's own clean ℓ∞ — a backdoor unit is one clean images barely wake
    and the trigger drives hard; units left dormant are measured against DORMANT of the layer's mean.
    `spread`: the rise over the layer's typical spread of clean ℓ∞ across images — large where the rise
    is far outside anything clean images do in that layer.
    `clean`: raw_stats of the sites' tensors over the clean fit images.
    Which one separates the backdoor better depends on how the model spreads it; the held-out images
    decide (see defend.defend)."""
    tensors = stat_tensors(sites)
    out = {"relative": {s.name: np.zeros(s.channels) for s in sites},
           "spread": {s.name: np.zeros(s.channels) for s in sites}}
    for raw in probed_sets:
        probed = raw_stats(ctx.prep.model, tensors, ctx.prep.spec, ctx.prep.pre, raw, ctx.opts.batch_size)
        for s in sites:
            c = np.abs(clean[s.tensor].agg("linf"))
            rise = probed[s.tensor].agg("linf") - clean[s.tensor].agg("linf")
            out["relative"][s.name] += rise / (c + DORMANT * c.mean() + 1e-12)
            out["spread"][s.name] += rise / (clean[s.tensor].agg("linf_std").mean() + 1e-12)
    return out


def linf_histograms(ctx: Context, order: list[tuple[str, int]], probed_raw: np.ndarray) -> list:
    """Per-image ℓ∞ of the first TOP_UNITS units of `order` on the clean fit images and probed images
    (onnxruntime), as (label, clean, probed) for plots.render."""
    sites_by_name = ctx.prep.sites
    top = order[:TOP_UNITS]
    tensors = stat_tensors(sites_by_name[s] for s, _ in top)
    clean, probed = (raw_stats(ctx.prep.model, tensors, ctx.prep.spec, ctx.prep.pre, raw, ctx.opts.batch_size,
                               keep_per_image=True)
                     for raw in (ctx.fit_raw, probed_raw))
    out = []
    for site, ch in top:
        t = sites_by_name[site].tensor
        out.append((f"{site} #{ch}", clean[t].per_image["linf"][:, ch], probed[t].per_image["linf"][:, ch]))
    return out
