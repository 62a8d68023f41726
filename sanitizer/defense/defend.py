"""The default defense, run: probe toward the suspected target, bound, rank units, prune until the probes fail,
repair, re-attack — and, when every candidate fails the re-attack, one unlearning round against what it found (the
steps and their sources: see the package's docstring).

Units are ranked three ways: by how far the probes lift their ℓ∞ (max over the spatial map) above what
clean images do — the paper's signature, measured with synthesized probes in place of the unknown trigger —
in two normalisations, and by how much the probes' margin toward the target rests on each unit
(rank.margin_gradients), which finds the units that matter to the decision among those that merely fire.
The held-out images pick one (count.preference): within the budget, the one whose count brings the most
probes to the goal, then the one that costs the held-out images least. How many to
prune is read off the probes on the held-out images: the smallest count at which every probe that
pruning can silence is at the attack-success goal; probes that no count silences before the model breaks
are ordinary adversarial weakness and do not count (unless no probe falls, then each must reach the
lowest rate it gets to). Statistics and every
decision run on onnxruntime; torch only synthesizes the probes and repairs.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .. import rewrite
from ..evaluate import wilson
from ..graph import Site, stat_tensors
from ..plan import Plan, rank, safe_limit
from .bound import BOUND_QUANTILES, choose_bounds
from .context import Context
from .count import FLIP_GOAL, MAX_SHARE, USE_FLIP, Checks, count_by_probes, preference
from .detect import Leads
from .effort import FULL, Effort
from .probes import COLOUR_STARTS, N_IMAGES, N_PLACES, STEPS, sparse_name, synthesize
from .rank import ell_inf_gaps, linf_histograms, margin_gradients, raw_stats
from .reattack import reattack
from .repair import BATCH as REPAIR_BATCH
from .repair import RUNS as REPAIR_RUNS
from .repair import repair
from .torchnet import pixel_range

if TYPE_CHECKING:
    from ..pipeline import HeldOut, Options, Prepared, Progress


def work(effort: Effort, n_fit: int, n_hold: int, n_units: int, leads: Leads = Leads(), *,
         suspects: int | None = None) -> tuple[float, float]:
    """The defense's work after detection at `effort` (n_fit / n_hold images, n_units prunable units), as
    effort.PassCost counts it: (torch forward+backward image passes, onnxruntime forward image passes), with
    every probe used and a count search of twice the doubling grid per ranking. `suspects`: the number of
    suspicious samples that replace the probes (half rank, half count; nothing synthesized, no re-attack).
    `leads`: the probes detection adds (detect.Leads)."""
    synthesized = suspects is None
    probes = _probe_count(leads) if synthesized else 1
    hold, ranked = (effort.tests(n_hold), effort.tests(n_fit)) if synthesized else (suspects // 2, suspects // 2)
    # the probes, then as many fresh ones and the sparse probe in the re-attack
    passes = (2 * probe_work(effort, 0, leads)[0] + effort.steps(STEPS) * effort.images(N_IMAGES)
              if synthesized else 0.0)
    passes += (probes + 1) * ranked                      # margin attribution
    # a clean and a probed batch per repair step; with suspects a third, kept off the target
    runs, batch = _repair_runs(effort)
    passes += (2 if synthesized else 3) * batch * sum(steps for steps, _ in runs)
    counts = 3 * 2 * (1 + np.log2(max(2, MAX_SHARE * n_units)))   # three rankings
    checks = len(BOUND_QUANTILES) + counts + len(REPAIR_RUNS) + (3 if synthesized else 2)  # before, pruned(, re-attack)
    # (and the re-attack's sparse probe tested once)
    forwards = n_fit + probes * ranked + checks * (n_hold + probes * hold) + (hold if synthesized else 0)
    return passes, forwards


def _repair_runs(effort: Effort) -> tuple[tuple[tuple[int, float], ...], int]:
    """repair.RUNS at `effort` — (steps, learning rate) per run — and the images per step they share."""
    runs = tuple((effort.updates(n, REPAIR_BATCH)[0], lr) for n, lr in REPAIR_RUNS)
    return runs, effort.updates(REPAIR_RUNS[0][0], REPAIR_BATCH)[1]


def _probe_count(leads: Leads) -> int:
    """Probes the probes step makes at most: a patch per place and side (and per place of `leads`), the blend, one
    per family of `leads` (the re-attack adds the sparse probe)."""
    return 2 * N_PLACES + len(leads.places) + 1 + len(leads.families)


def probe_work(effort: Effort, n_hold: int, leads: Leads = Leads()) -> tuple[float, float]:
    """The probes step's work alone (as `work`): what confirming a mask-search target costs (`unconfirmed`)."""
    probes = _probe_count(leads)
    passes = probes * effort.steps(STEPS) * effort.images(N_IMAGES)
    if leads.colour:
        # each patch first reads its solid-colour starts, forward alone
        passes += (2 * N_PLACES + len(leads.places)) * 0.5 * len(COLOUR_STARTS) * effort.images(N_IMAGES)
    return passes, n_hold + probes * effort.tests(n_hold)


def round_work(effort: Effort, n_hold: int, n_probes: int, n_left: int) -> tuple[float, float]:
    """The unlearning round's work (as `work`): the long repair against `n_probes` probes and the `n_left` fresh
    ones the re-attack found, its check, and a re-attack of those fresh probes with their control."""
    runs, batch = _repair_runs(effort)
    passes = 2 * batch * runs[-1][0] + 3 * n_left * effort.steps(STEPS) * effort.images(N_IMAGES)
    hold = effort.tests(n_hold)
    return passes, 2 * (n_hold + (n_probes + n_left) * hold)


def _context(prep: Prepared, fit: np.ndarray, hold: np.ndarray | None, held: HeldOut, target: int, opts: Options,
             progress: Progress, leads: Leads, effort: Effort, afford=None) -> Context:
    """The run's Context, with the fit images (and the first effort.tests held-out ones to probe, unless `hold`
    is None) read."""
    fit_raw = prep.calib.subset(fit).read(0, len(fit))
    probed = None if hold is None else hold[:effort.tests(len(hold))]
    hold_raw = None if hold is None else prep.calib.subset(probed).read(0, len(probed))
    return Context(prep, opts, progress, target, fit_raw, hold_raw, held, held.inputs(), leads, effort, afford)


def _unlearning_round(ctx: Context, base: onnx.ModelProto, plan: Plan, used: list, used_x: list[np.ndarray],
                      good: np.ndarray, left: list, bars: dict[str, float]) -> tuple[dict, dict] | None:
    """When the re-attack still reaches the target on every candidate, the fresh probes that did it join the
    probes and the long repair runs again from the pruned model: the defense unlearns what attacking its result
    found, not only what it probed the original with (the probes are synthesized once, on the original; a
    trigger's part they missed keeps working — README, How it works, step 8). The candidate (a dict like
    defend's) and its re-attack, or None when the round does not fit the time budget left (ctx.afford)."""
    prep = ctx.prep
    offered = ctx.afford("unlearning round", lambda e: round_work(e, len(ctx.clean_x), len(used), len(left)))
    if offered is None:
        return None
    ctx = replace(ctx, effort=Effort(min(offered.share, ctx.effort.share)))
    runs, batch = _repair_runs(ctx.effort)
    run = runs[-1]
    ctx.progress("unlearning round", 0, 1)
    tuned = repair(base, prep.sites, plan.pruned(), ctx.fit_raw, prep.pre, used + left, ctx.opts.seed, spec=prep.spec,
                   runs=(run,), batch=batch)[run]
    model = rewrite.apply(tuned, prep.sites, plan.pruned())
    left_x = [prep.pre.apply(p.apply(ctx.hold_raw)) for p in left]
    bar = np.concatenate([good, [bars[p.describe()] for p in left]])
    name = f"pruned+repaired against the re-attack's probes ({run[0]} steps at {run[1]:g})"
    candidate = _candidate(ctx, name, model, used_x + left_x, bar)
    fresh = None
    if candidate["within_budget"] and candidate["probes_silenced"]:
        fresh, _ = reattack(ctx, model, bars)
        candidate["fresh_probes_silenced"] = fresh["silenced"]
    ctx.progress("unlearning round", 1, 1)
    return candidate, fresh


def _candidate(ctx: Context, name: str, model: onnx.ModelProto, probed_x: list[np.ndarray], bars: np.ndarray,
               paired: bool = True) -> dict:
    """A candidate result as defend weighs it: its held-out agreement (ag.to_dict()), whether that is within the
    budget, the probes' flip rates and whether each is under its bar (`bars`, per probed set; inf: none). With
    `paired` False (a user's suspicious samples) the top of the counting half's 80 % Wilson interval must be under
    the bar, and the candidate carries it (`probe_flip_interval80`) and the images counted (`probe_images`)."""
    pred, rates = ctx.flips(model, probed_x, paired)
    ag = ctx.held.agreement_of(pred)
    # the bars beside the flips: where no count silences a probe its bar is its own floor plus the goal,
    # which "probes_silenced" passes at a flip of 1.0 (the re-attack, at the goal, is then the verdict)
    shown = np.array(rates)
    extra = {}
    if not paired:
        # a user's samples are the verdict itself (no re-attack follows), and a handful of them can read 0.000
        # at a real rate of 0.2: the counting half must show its rate under the bar, the top of its interval
        n = len(probed_x[0])
        interval = wilson(round(rates[0] * n), n)
        shown = np.array([interval[1]])
        extra = {"probe_flip_interval80": [round(v, 4) for v in interval], "probe_images": n}
    return {"name": name, "model": model, "within_budget": ag.within(ctx.opts.max_acc_drop),
            "probes_silenced": bool((shown <= bars).all()),
            "probe_flip": [round(r, 4) for r in rates], **extra,
            "probe_bars": [round(float(g), 4) if np.isfinite(g) else None for g in bars],
            **ag.to_dict()}


def suspect_bar(held: HeldOut, target: int) -> float:
    """The rate toward `target` a user's suspicious samples must be shown under: the goal (count.FLIP_GOAL) plus
    the original's own rate toward it on the held-out images labelled another class — what would reach the
    target with no backdoor, in the spirit of the --eval-triggered verdict (pipeline.asr_evidence, which reads the
    result's rate on the user's labelled images, at the lower end of its interval, capped at one half). Not the share of
    every held-out image it calls the target: those are mostly the target's own images, which the samples,
    triggered copies of other classes, are not (a bar of 0.17 on digits shipped a real ASR of 0.12). Without
    labels that rate is unknown: the goal alone, so a sample of the target's own class counts as reaching it."""
    if held.labels is None:
        return FLIP_GOAL
    others = held.labels != target
    return FLIP_GOAL + (float((held.reference[others] == target).mean()) if others.any() else 0.0)


def _probe(ctx: Context) -> tuple[list, list[np.ndarray], list[float]]:
    """The probes toward ctx.target (probes.synthesize on the fit images), their held-out images as model
    inputs and the share of those each sends to the target on the original."""
    prep = ctx.prep
    ctx.progress("probes", 0, 1)
    probes = synthesize(prep.model, ctx.fit_raw, prep.pre, ctx.target, ctx.opts.seed, spec=prep.spec,
                        families=ctx.leads.families, places=ctx.leads.places, colour=ctx.leads.colour,
                        **ctx.synthesize_kw())
    ctx.progress("probes", 1, 1)
    probed_x = [prep.pre.apply(p.apply(ctx.hold_raw)) for p in probes]
    _, before = ctx.flips(prep.model, probed_x)
    return probes, probed_x, before


def _best(probes: list, before: list[float]) -> dict:
    best = int(np.argmax(before))
    return {"best_probe": probes[best].describe(), "best_probe_flip": round(before[best], 4)}


def unconfirmed(prep: Prepared, fit: np.ndarray, hold: np.ndarray, held: HeldOut, target: int, opts: Options,
                progress: Progress, leads: Leads = Leads(), effort: Effort = FULL) -> dict | None:
    """For a target the mask search named, with the clean-data criteria, or with the default when no prunable layer
    is in scope (otherwise defend checks this):
    the best synthesized probe toward `target` (with those of `leads`, detect.Leads) and its held-out
    flip rate when none sends USE_FLIP of the held-out images there — nothing confirms a shortcut — else None.
    Costs the default's probes step."""
    probes, _, before = _probe(_context(prep, fit, hold, held, target, opts, progress, leads, effort))
    return _best(probes, before) if max(before) < USE_FLIP else None


def defend(prep: Prepared, sites: list[Site], fit: np.ndarray, hold: np.ndarray, held: HeldOut, target: int,
           opts: Options, progress: Progress, suspects: np.ndarray | None = None, *,
           leads: Leads = Leads(), effort: Effort = FULL, afford=None) -> tuple[Plan, onnx.ModelProto, dict]:
    """Probe, rank, count, then keep the pruned model or its repair, whichever the held-out images favour.
    Returns no plan (None, the original, the best probe and its flip rate) when no synthesized probe sends
    half the held-out images to `target`: nothing confirms a backdoor there.

    With `suspects` (raw images a user believes carry the trigger) those replace the synthesized probes:
    half of them rank the units, the other half count them. `leads`: the probe families and patch places
    detection adds to the fixed probes (detect.Leads), synthesized again by the re-attack. `effort`: images and steps of
    the probes, repair and re-attack, images the units are ranked and the probes tested on (effort.py).
    `afford`: Context.afford, which sizes the unlearning round (_unlearning_round) when the re-attack refuses
    every candidate; None: no such round."""
    paired = suspects is None
    ctx = _context(prep, fit, hold if paired else None, held, target, opts, progress, leads, effort, afford)
    fit_raw = ctx.fit_raw
    if paired:
        probes, probed_x, before = _probe(ctx)
        if max(before) < USE_FLIP:
            # no probe sends half the held-out images to the target: no shortcut there to remove (pipeline
            # reports the suspicion as not confirmed and leaves the model alone)
            return None, prep.model, _best(probes, before)
        chosen = [i for i, f in enumerate(before) if f >= USE_FLIP]
        used = [probes[i] for i in chosen]
        rank_sets = [p.apply(ctx.rank_raw) for p in used]
        described = [{"probe": p.describe(), "flip_before": round(before[i], 4), "used": i in chosen}
                     for i, p in enumerate(probes)]
    else:
        order = np.random.default_rng(opts.seed).permutation(len(suspects))
        half = len(suspects) // 2
        rank_sets, probed_x, chosen = [suspects[order[:half]]], [prep.pre.apply(suspects[order[half:]])], [0]
        used = []
        _, before = ctx.flips(prep.model, probed_x, paired=False)
        described = [{"probe": f"{len(suspects)} suspicious samples", "flip_before": round(before[0], 4), "used": True}]
    used_x = [probed_x[i] for i in chosen]
    # the family probes (signal, warp) are there because detection found the target with them, or their scan sent
    # half the images there (families_for)
    evidence = [j for j, p in enumerate(used) if p.kind in ("signal", "warp")]
    searches: dict[str, tuple[Plan, float, np.ndarray]] = {}
    progress("linf statistics", 0, 1)
    clean = raw_stats(prep.model, stat_tensors(s for s in prep.sites.values() if s.prunable), prep.spec, prep.pre,
                      fit_raw, opts.batch_size, keep_per_image=True)
    progress("bounds", 0, 1)
    base, bound_info = choose_bounds(ctx, clean, used_x, paired)
    progress("linf statistics", 0, 1)
    scores = ell_inf_gaps(ctx, sites, clean, rank_sets)
    progress("attribution", 0, 1)
    scores["attribution"] = margin_gradients(prep.model, sites, prep.pre, rank_sets, ctx.rank_raw, target,
                                             opts.batch_size, spec=prep.spec)
    checks = Checks(ctx, base, used_x, paired)
    for name, gap in scores.items():
        order = rank(gap, descending=True)
        limit = safe_limit(order, {s.name: s.channels for s in sites})
        searches[name] = count_by_probes(ctx, checks, order, limit, evidence)
    ranking = max(searches, key=lambda n: preference(searches[n][0], opts.max_acc_drop))
    plan, _, good = searches[ranking]
    if not paired:
        # no re-attack follows a user's triggered samples, so the count's bar — relative to the lowest rate
        # any count reached — cannot be the verdict: suspect_bar's, which the counting half must be shown under
        good = np.full(len(good), suspect_bar(held, target))
    pruned = rewrite.apply(base, prep.sites, plan.pruned())
    progress("repair", 0, 1)
    # suspicious samples have no clean twin to hold them to: the repair keeps them off the target instead
    avoid = None if paired else (rank_sets[0], target)
    runs, batch = _repair_runs(effort)
    repaired = repair(base, prep.sites, plan.pruned(), fit_raw, prep.pre, used, opts.seed, avoid=avoid, spec=prep.spec,
                      runs=runs, batch=batch)
    progress("repair", 1, 1)
    progress("final checks", 0, 1)
    candidates = [_candidate(ctx, name, model, used_x, good, paired)
                  for name, model in (("pruned", pruned),
                                      *((f"pruned+repaired ({n} steps at {lr:g})",
                                         rewrite.apply(m, prep.sites, plan.pruned()))
                                        for (n, lr), m in repaired.items()))]
    # a repair can teach the backdoor back: a candidate counts only if the probes stay silenced. The pruned
    # model is preferred unless a repair silences the probes by more than the goal; repairs (repair.RUNS: how
    # far to tune is the held-out images' choice) by their probes, the gentler on a tie
    ok = sorted((c for c in candidates if c["within_budget"] and c["probes_silenced"]),
                key=lambda c: max(c["probe_flip"]) - (FLIP_GOAL if c["name"] == "pruned" else 0))
    # when none passes, the one shown (and written under --allow-degraded): within the budget, the one that
    # silences the most — not the gentlest, which is the bounded model that silences nothing (a user's samples
    # read 1.000 beside a repair at 0.150) — else one that silences, at the least drop
    best = ok[0] if ok else min(candidates, key=lambda c: (not c["within_budget"], not c["probes_silenced"],
                                                           max(c["probe_flip"]) if c["within_budget"]
                                                           else c["drop_estimate"]))
    best["within_budget"] = bool(ok)
    fresh, round_info = None, None
    if paired:
        # the fresh probe of each used probe's kind and place must be at the goal, or the target no easier
        # to reach there than any other class (reattack.still_reachable); one the count judged ordinary adversarial
        # weakness (inf) does not count here either. Not the count's own bar: where pruning silenced no
        # probe that bar is the probe's floor plus the goal, which an untouched backdoor passes too.
        bars_by_name = {probes[i].describe(): (FLIP_GOAL if np.isfinite(g) else np.inf) for i, g in zip(chosen, good)}
        # and a sparse probe, which attacks the rest of a trigger spread beyond the places probed (reattack.py).
        # Its bar is a shortcut's, half the images: free pixels anywhere are an adversarial attack that sends a
        # fifth of a CIFAR-10 model's images to the target and an eighth to another class where the backdoor
        # is gone (README, "The re-attack's sparse probe"), while a scattered trigger's remains take most
        bars_by_name[sparse_name(fit_raw)] = USE_FLIP
        # in order of preference, the first candidate the fresh probes fail against is kept (else the last
        # one attacked, whose fresh flips the report then shows)
        left, first = None, None
        for best in ok or [best]:
            fresh, reaching = reattack(ctx, best["model"], bars_by_name)
            # what still reaches the most preferred candidate is what the unlearning round adds
            if left is None:
                left, first = reaching, fresh
            best["fresh_probes_silenced"] = fresh["silenced"]
            if fresh["silenced"]:
                break
        best["within_budget"] = bool(ok) and fresh["silenced"]
        if not fresh["silenced"] and left and ctx.afford is not None:
            got = _unlearning_round(ctx, base, plan, used, used_x, good, left, bars_by_name)
            if got is not None:
                again, again_fresh = got
                candidates.append(again)
                round_info = {"probes": [p.describe() for p in left], "reattack_before": first}
                if again_fresh is not None and again_fresh["silenced"]:
                    best, fresh = again, again_fresh
                    best["within_budget"] = True
                elif again_fresh is not None:
                    round_info["reattack_after"] = again_fresh
    plan.trace.append({"units": plan.count, "final": best["name"],
                       **{k: v for k, v in best.items() if k not in ("model", "name")}})
    info = {"target": target, "source": "synthesized" if paired else "suspicious samples",
            "bounds": bound_info,
            **({"reattack": fresh} if fresh is not None else {}),
            **({"unlearning_round": round_info} if round_info is not None else {}),
            "probes": described,
            "rankings": {n: {"units": pl.count, "pruned_agreement": round(a, 6)} for n, (pl, a, _) in searches.items()},
            "ranking": ranking,
            **({"suspect_bar": round(float(good[0]), 4)} if not paired else {}),
            "candidates": [{k: v for k, v in c.items() if k != "model"} for c in candidates],
            "chosen": best["name"]}
    if opts.figures_wanted:
        shown = [(p.describe(), p.apply(fit_raw[:1])[0]) for p in used] or [
            (f"suspicious sample {i}", img) for i, img in enumerate(rank_sets[0][:4])]
        info["_figures"] = {"hi": pixel_range(fit_raw), "probe_images": shown,
                            "linf": linf_histograms(ctx, plan.order, rank_sets[0])}
    return plan, best["model"], info
