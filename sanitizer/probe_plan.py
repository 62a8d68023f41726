"""The default defense: probe toward the suspected target, rank units, prune until the probes fail, repair.

Units are ranked three ways, and the held-out images pick one: by how far the probes lift their ℓ∞ (max
over the spatial map) above what clean images do — the paper's signature, measured with synthesized probes
in place of the unknown trigger — in two normalisations, and by how much the probes' margin toward the
target rests on each unit (defense/rank.py), which finds the units that matter to the decision among
those that merely fire. How many to
prune is read off the probes on the held-out images: the smallest count at which every probe that
pruning can silence is at the attack-success goal; probes that no count silences before the model breaks
are ordinary adversarial weakness and do not count (unless no probe falls, then each must reach the
lowest rate it gets to). Statistics and every
decision run on onnxruntime; torch only synthesizes the probes and repairs.
"""
from __future__ import annotations

import numpy as np
import onnx

from calib.stats import collect

from . import rewrite
from .rewrite import apply_bounds
from .evaluate import Predictor
from .graph import Site, stat_tensors
from .plan import Plan, rank, safe_limit

# The attack-success level the defense aims for; also the smallest change in flip rate worth pruning for.
FLIP_GOAL = 0.05
# A probe that moves fewer than half the held-out images to the target is not following a shortcut.
USE_FLIP = 0.5
# Clean ℓ∞ below this share of the layer's mean counts as dormant (see ell_inf_gap).
DORMANT = 0.1
# A pruned model that agrees with the original on less than this share of held-out images is broken, not
# cleaned: its flip rates are noise, so the search does not look past it.
ALIVE = 0.5
# Pruning never goes past this share of the candidate units, whatever the probes say.
MAX_SHARE = 0.25
# Bounds tried, strongest last: each unit is capped at this quantile of its per-image clean ℓ∞ over the fit
# images (1.0: the largest any fit image reaches).
BOUND_QUANTILES = (1.0, 0.99, 0.95, 0.9, 0.8)
# Share of the accuracy budget the bounds may spend; the rest is the pruning's and the repair's.
BOUND_BUDGET = 0.5


def flips(model: onnx.ModelProto, spec, clean_x: np.ndarray, probed_x: list[np.ndarray], target: int,
          batch_size: int, paired: bool = True) -> tuple[np.ndarray, list[float]]:
    """The model's predictions on the clean held-out images (for the agreement, one session for both) and
    per probe the share of them it does not already call `target` that the probe sends there. Unpaired
    probed images (a user's suspicious samples) count as the share of them called `target`."""
    pred = Predictor(model, spec)
    base = pred.logits(clean_x, batch_size).argmax(1)
    if not paired:
        return base, [float((pred.logits(x, batch_size).argmax(1) == target).mean()) for x in probed_x]
    keep = base != target
    if not keep.any():
        return base, [1.0 for _ in probed_x]
    return base, [float((pred.logits(x[keep], batch_size).argmax(1) == target).mean()) for x in probed_x]


def raw_stats(model: onnx.ModelProto, tensors: dict, spec, pre, raw: np.ndarray, batch_size: int,
              keep_per_image: bool = False):
    """Statistics of `tensors` over raw images held in memory (probed copies, suspicious samples)."""
    batches = (pre.apply(raw[i:i + batch_size]) for i in range(0, len(raw), batch_size))
    return collect(model, tensors, batches, spec.name, fixed_batch=spec.batch, keep_per_image=keep_per_image,
                   output=spec.output).stats


def ell_inf_gaps(model: onnx.ModelProto, sites: list[Site], spec, pre, clean: dict,
                 probed_sets: list[np.ndarray], batch_size: int) -> dict[str, dict[str, np.ndarray]]:
    """Two rankings of the probed images' ℓ∞ rise over clean images, per site and unit, summed over sets.

    `relative`: the rise over the unit's own clean ℓ∞ — a backdoor unit is one clean images barely wake
    and the trigger drives hard; units left dormant are measured against DORMANT of the layer's mean.
    `spread`: the rise over the layer's typical spread of clean ℓ∞ across images — large where the rise
    is far outside anything clean images do in that layer.
    `clean`: raw_stats of the sites' tensors over the clean fit images.
    Which one separates the backdoor better depends on how the model spreads it; the held-out images
    decide (see defend)."""
    tensors = stat_tensors(sites)
    out = {"relative": {s.name: np.zeros(s.channels) for s in sites},
           "spread": {s.name: np.zeros(s.channels) for s in sites}}
    for raw in probed_sets:
        probed = raw_stats(model, tensors, spec, pre, raw, batch_size)
        for s in sites:
            c = np.abs(clean[s.tensor].agg("linf"))
            rise = probed[s.tensor].agg("linf") - clean[s.tensor].agg("linf")
            out["relative"][s.name] += rise / (c + DORMANT * c.mean() + 1e-12)
            out["spread"][s.name] += rise / (clean[s.tensor].agg("linf_std").mean() + 1e-12)
    return out


def bars(floor: np.ndarray) -> np.ndarray:
    """Per probe, the flip rate a count must bring it under, from the lowest rate it reaches on the grid."""
    good = np.maximum(FLIP_GOAL, floor + FLIP_GOAL)
    # A probe no count short of breaking the model silences is ordinary adversarial weakness: pruning only
    # wears it down with the model's accuracy, so it does not set the count while some probe does fall to
    # the goal — that one follows the shortcut.
    silenced = floor <= FLIP_GOAL
    return np.where(silenced, good, np.inf) if silenced.any() else good


def count_by_probes(prep, base: onnx.ModelProto, order: list[tuple[str, int]], limit: int, held,
                    clean_x: np.ndarray, probed_x: list[np.ndarray], paired: bool, target: int, batch_size: int,
                    progress) -> tuple[Plan, float, np.ndarray]:
    """Smallest count at which every probe that some count silences is at the goal (within the goal of its
    lowest rate); only when none is silenced, every probe within the goal of its lowest rate. Rates are read
    on a doubling grid while the pruned model still agrees with the original on at least ALIVE of the
    held-out images (past that, flips say nothing: the model is broken).
    Units are pruned from `base` (the original, or the original with its activations bounded); when `base`
    already has every probe at the goal, nothing is pruned.
    Returns the plan, the pruned model's held-out agreement and the flip rate each probe must get under
    (inf: the probe does not count)."""
    plan = Plan(order)
    cap = min(limit, max(1, int(MAX_SHARE * len(order))))
    flips_at: dict[int, list[float]] = {}
    agree_at: dict[int, float] = {}

    def measure(k: int) -> None:
        model = rewrite.apply(base, prep.sites, plan.pruned(k))
        pred, flips_at[k] = flips(model, prep.spec, clean_x, probed_x, target, batch_size, paired)
        agree_at[k] = held.agreement_of(pred).rate
        plan.trace.append({"units": k, "probe_flip": [round(r, 4) for r in flips_at[k]],
                           "agreement": round(agree_at[k], 6)})
        progress("search", len(plan.trace), 0)

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
    good = bars(np.min([flips_at[k] for k in grid], axis=0))

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


def choose_bounds(prep, clean: dict, held, clean_x: np.ndarray, probed_x: list[np.ndarray], paired: bool,
                  target: int, opts) -> tuple[onnx.ModelProto, dict]:
    """The original with every site's units bounded at a quantile of BOUND_QUANTILES (rewrite.apply_bounds), chosen
    the way count_by_probes chooses a count: over the quantiles whose held-out accuracy drop stays within
    BOUND_BUDGET of the budget (bounds tighten monotonically, so the first past it ends the search), the
    loosest at which every probe that some bound silences is under its bar (`bars`); probes no bound
    silences are ordinary adversarial weakness and do not count. When no probe falls, the loosest bound —
    the largest ℓ∞ any fit image reaches — is kept for nothing. Every prunable site is bounded, residual
    joins too.
    `clean`: raw_stats over the fit images with per-image reductions kept. Returns the bounded model (the
    original when even the loosest bound spends too much) and what was tried, for the report."""
    per_image = {s.name: clean[s.tensor].per_image["linf"] for s in prep.sites.values() if s.prunable}
    tried, models, rates = [], {}, {}
    for q in BOUND_QUANTILES:
        bounds = {name: np.quantile(v, q, axis=0) for name, v in per_image.items()}
        bounded = apply_bounds(prep.model, prep.sites, bounds)
        pred, rates[q] = flips(bounded, prep.spec, clean_x, probed_x, target, opts.batch_size, paired)
        ag = held.agreement_of(pred)
        tried.append({"quantile": q, "probe_flip": [round(r, 4) for r in rates[q]], **ag.to_dict()})
        if not ag.within(BOUND_BUDGET * opts.max_acc_drop):
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


def removed(target_flip: dict[str, float], bars: dict[str, float], control_flip: dict[str, float] | None) -> bool:
    """Whether fresh probes say the backdoor is gone. Only the probes the count judged (finite bar, by
    kind and place) take part: either each is under its bar, or the target is no easier to reach than a
    control class under the same budget — the best of those probes toward the target at most FLIP_GOAL
    above the best toward the control (what any class admits is ordinary adversarial weakness, not a
    backdoor)."""
    counted = [n for n, g in bars.items() if np.isfinite(g)]
    if all(target_flip[n] <= bars[n] for n in counted):
        return True
    if control_flip is None:
        return False
    return max(target_flip[n] for n in counted) <= max(control_flip[n] for n in counted) + FLIP_GOAL


def reattack(model: onnx.ModelProto, prep, fit_raw: np.ndarray, hold_raw: np.ndarray, clean_x: np.ndarray,
             target: int, bars: dict[str, float], opts, progress) -> dict:
    """Fresh probes synthesized against the sanitized `model` with the same budget as on the original: the
    backdoor is judged by attacking the result, not by replaying probes it was pruned against. Only the
    probes the count judged (finite bar) are synthesized: the others take no part in the verdict. When they
    pass a bar (`bars`: per probe description, the flip rate the count brought it under; inf: not
    counted), the same probes are synthesized toward a control class (defense.detect.control_class) and the
    target must be no easier to reach than it (see removed). Returns per probe its held-out flip rate
    toward `target` (and the control's), the bars and the verdict."""
    from .defense.detect import control_class
    from .defense.probes import synthesize

    counted = {n for n, g in bars.items() if np.isfinite(g)}

    def attack(cls: int) -> dict[str, float]:
        fresh = synthesize(model, fit_raw, prep.pre, cls, opts.seed, spec=prep.spec, only=counted)
        _, rates = flips(model, prep.spec, clean_x, [prep.pre.apply(p.apply(hold_raw)) for p in fresh], cls,
                         opts.batch_size)
        return {p.describe(): round(r, 4) for p, r in zip(fresh, rates)}

    progress("re-attack", 0, 2)
    toward_target, toward_control, control = attack(target), None, None
    if not removed(toward_target, bars, None):
        control = control_class(model, fit_raw, prep.pre, target, opts.seed, spec=prep.spec)
        toward_control = attack(control)
    progress("re-attack", 2, 2)
    out = {"fresh_probe_flip": toward_target, "max_fresh_flip": max(toward_target.values()),
           "bars": {n: (None if np.isinf(g) else round(g, 4)) for n, g in bars.items()},
           "silenced": removed(toward_target, bars, toward_control)}
    if control is not None:
        out["control"] = {"class": control, "fresh_probe_flip": toward_control,
                          "max_fresh_flip": max(toward_control.values())}
    return out


def defend(prep, sites: list[Site], fit: np.ndarray, hold: np.ndarray, held, target: int, opts, progress,
           suspects: np.ndarray | None = None) -> tuple[Plan, onnx.ModelProto, dict]:
    """Probe, rank, count, then keep the pruned model or its repair, whichever the held-out images favour.

    With `suspects` (raw images a user believes carry the trigger) those replace the synthesized probes:
    half of them rank the units, the other half count them."""
    from .defense.rank import margin_gradients
    from .defense.repair import repair

    fit_raw = prep.calib.subset(fit).read(0, len(fit))
    clean_x, paired = held.inputs(), suspects is None
    if paired:
        from .defense.probes import synthesize

        hold_raw = prep.calib.subset(hold).read(0, len(hold))
        progress("probes", 0, 1)
        probes = synthesize(prep.model, fit_raw, prep.pre, target, opts.seed, spec=prep.spec)
        progress("probes", 1, 1)
        probed_x = [prep.pre.apply(p.apply(hold_raw)) for p in probes]
        _, before = flips(prep.model, prep.spec, clean_x, probed_x, target, opts.batch_size)
        chosen = [i for i, f in enumerate(before) if f >= USE_FLIP] or [int(np.argmax(before))]
        used = [probes[i] for i in chosen]
        rank_sets = [p.apply(fit_raw) for p in used]
        described = [{"probe": p.describe(), "flip_before": round(before[i], 4), "used": i in chosen}
                     for i, p in enumerate(probes)]
    else:
        order = np.random.default_rng(opts.seed).permutation(len(suspects))
        half = len(suspects) // 2
        rank_sets, probed_x, chosen = [suspects[order[:half]]], [prep.pre.apply(suspects[order[half:]])], [0]
        used = []
        _, before = flips(prep.model, prep.spec, clean_x, probed_x, target, opts.batch_size, paired=False)
        described = [{"probe": f"{len(suspects)} suspicious samples", "flip_before": round(before[0], 4), "used": True}]
    used_x = [probed_x[i] for i in chosen]
    searches: dict[str, tuple[Plan, float, np.ndarray]] = {}
    progress("linf statistics", 0, 1)
    clean = raw_stats(prep.model, stat_tensors(s for s in prep.sites.values() if s.prunable), prep.spec, prep.pre,
                      fit_raw, opts.batch_size, keep_per_image=True)
    progress("bounds", 0, 1)
    base, bound_info = choose_bounds(prep, clean, held, clean_x, used_x, paired, target, opts)
    progress("linf statistics", 0, 1)
    scores = ell_inf_gaps(prep.model, sites, prep.spec, prep.pre, clean, rank_sets, opts.batch_size)
    progress("attribution", 0, 1)
    scores["attribution"] = margin_gradients(prep.model, sites, prep.pre, rank_sets, fit_raw, target, opts.batch_size,
                                               spec=prep.spec)
    for name, gap in scores.items():
        order = rank(gap, descending=True)
        limit = safe_limit(order, {s.name: s.channels for s in sites})
        searches[name] = count_by_probes(prep, base, order, limit, held, clean_x, used_x, paired, target,
                                         opts.batch_size, progress)
    # the ranking that silences the probes at the smaller cost to the held-out images
    ranking = max(searches, key=lambda n: (searches[n][1], -searches[n][0].count))
    plan, _, good = searches[ranking]
    pruned = rewrite.apply(base, prep.sites, plan.pruned())
    progress("repair", 0, 1)
    # suspicious samples have no clean twin to hold them to: the repair keeps them off the target instead
    avoid = None if paired else (rank_sets[0], target)
    repaired = rewrite.apply(repair(base, prep.sites, plan.pruned(), fit_raw, prep.pre, used, opts.seed,
                                    avoid=avoid, spec=prep.spec), prep.sites, plan.pruned())
    progress("repair", 1, 1)
    progress("final checks", 0, 1)
    candidates = []
    for name, model in (("pruned", pruned), ("pruned+repaired", repaired)):
        base, rates = flips(model, prep.spec, clean_x, used_x, target, opts.batch_size, paired)
        ag = held.agreement_of(base)
        candidates.append({"name": name, "model": model, "within_budget": ag.within(opts.max_acc_drop),
                           "probes_silenced": bool((np.array(rates) <= good).all()),
                           "probe_flip": [round(r, 4) for r in rates], **ag.to_dict()})
    # a repair can teach the backdoor back: a candidate counts only if the probes stay silenced
    ok = sorted((c for c in candidates if c["within_budget"] and c["probes_silenced"]),
                key=lambda c: max(c["probe_flip"]) - (FLIP_GOAL if c["name"] == "pruned" else 0))
    best = ok[0] if ok else min(candidates, key=lambda c: (not c["probes_silenced"], c["drop_estimate"]))
    best["within_budget"] = bool(ok)
    fresh = None
    if paired:
        # the bar of each used probe, applied to the fresh probe of the same kind and place: one the count
        # judged ordinary adversarial weakness (inf) does not count here either
        bars_by_name = {probes[i].describe(): float(g) for i, g in zip(chosen, good)}
        # in order of preference, the first candidate the fresh probes fail against is kept (else the last
        # one attacked, whose fresh flips the report then shows)
        for best in ok or [best]:
            fresh = reattack(best["model"], prep, fit_raw, hold_raw, clean_x, target, bars_by_name, opts, progress)
            best["fresh_probes_silenced"] = fresh["silenced"]
            if fresh["silenced"]:
                break
        best["within_budget"] = bool(ok) and fresh["silenced"]
    plan.trace.append({"units": plan.count, "final": best["name"],
                       **{k: v for k, v in best.items() if k not in ("model", "name")}})
    info = {"target": target, "source": "synthesized" if paired else "suspicious samples",
            "bounds": bound_info,
            **({"reattack": fresh} if fresh is not None else {}),
            "probes": described,
            "rankings": {n: {"units": pl.count, "pruned_agreement": round(a, 6)} for n, (pl, a, _) in searches.items()},
            "ranking": ranking,
            "candidates": [{k: v for k, v in c.items() if k != "model"} for c in candidates],
            "chosen": best["name"]}
    if opts.figures_wanted:
        from .plots import linf_histograms
        from .defense.torchnet import pixel_range

        shown = [(p.describe(), p.apply(fit_raw[:1])[0]) for p in used] or [
            (f"suspicious sample {i}", img) for i, img in enumerate(rank_sets[0][:4])]
        info["_figures"] = {"hi": pixel_range(fit_raw), "probe_images": shown,
                            "linf": linf_histograms(prep.model, prep.sites, plan.order, prep.spec, prep.pre, fit_raw,
                                                    rank_sets[0], opts.batch_size)}
    return plan, best["model"], info
