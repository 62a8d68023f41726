"""Re-attack: the result is judged by attacking it afresh, not by replaying the probes it was pruned against.

Fresh probes (probes.py) are synthesized against the sanitized model with the same budget as on the
original; where one is over its bar, the same probe — same kind, place, size and steps — is synthesized
toward whichever class other than the target it reaches most easily (then, where the target still leads,
toward that class alone, as the target's probe was aimed), and the target must be no easier to reach at
that place than that: Neural Cleanse's idea of judging the target against the other classes (Wang
et al. 2019), place by place, because a backdoor lives at its trigger's place while ordinary adversarial
patches reach some class from many places. A sparse probe (probes.py) joins them, judged the same way at a
shortcut's bar (half the images; its free pixels are an adversarial attack in their own right): a trigger
spread over the image keeps working through its pixels outside the place pruning silenced, which no probe of
a fixed place sees (a 16x16 digits model's 8-pixel trigger: ASR 1.0 -> 0.67 after a pruning that
silenced every patch; README, "The re-attack's sparse probe").
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..evaluate import Predictor
from .count import FLIP_GOAL
from .detect import reach_rates
from .probes import synthesize

if TYPE_CHECKING:
    from .context import Context


def over_bar(target_flip: dict[str, float], bars: dict[str, float]) -> list[str]:
    """The probes the count judged (finite bar, by kind and place) whose fresh flip rate is over their bar."""
    return [n for n, g in bars.items() if np.isfinite(g) and target_flip[n] > g]


def still_reachable(target_flip: dict[str, float], bars: dict[str, float],
                    control_flip: dict[str, float] | None) -> list[str]:
    """The probes that say the backdoor is still there: over their bar (over_bar) and — when the control's
    rates are known — more than FLIP_GOAL above the best any other class reaches with the same probe at the
    same place (what any class admits there is ordinary adversarial weakness, not a backdoor)."""
    over = over_bar(target_flip, bars)
    if control_flip is None:
        return over
    return [n for n in over if target_flip[n] > control_flip[n] + FLIP_GOAL]


def reach(model: onnx.ModelProto, spec, clean_x: np.ndarray, probed_x: list[np.ndarray], batch_size: int,
          exclude: int) -> list[tuple[int, float]]:
    """Per probed set (each paired image by image with the first len(x) of `clean_x`, model inputs), the class
    other than `exclude` the probe sends most images to and its detect.reach_rates share."""
    pred = Predictor(model, spec)
    logits = pred.logits(clean_x, batch_size)
    out = []
    for x in probed_x:
        rates = reach_rates(logits[:len(x)].argmax(1), pred.logits(x, batch_size).argmax(1), logits.shape[1])
        rates[exclude] = -1.0
        best = int(np.argmax(rates))
        out.append((best, float(max(rates[best], 0.0))))
    return out


def reattack(ctx: Context, model: onnx.ModelProto, bars: dict[str, float]) -> tuple[dict, list]:
    """Fresh probes synthesized against the sanitized `model` with the same budget as on the original: the
    backdoor is judged by attacking the result, not by replaying probes it was pruned against. Only the
    probes the count judged (finite bar) are synthesized — and the sparse probe, which `bars` names (defend
    gives it count.USE_FLIP): the others take no part in the verdict. When one
    is over its bar (`bars`: per probe description, the flip rate it must be under — defend gives the goal,
    FLIP_GOAL; inf: not counted), the probes over it are synthesized again toward whichever class but the
    target they reach (the control) — and where the target still leads, toward that class alone — and each
    must reach the target by at most FLIP_GOAL more than the control (still_reachable). Returns per probe
    its held-out flip rate toward the target (and the control's class and rate), the bars, the best flip of
    the probes judged at the goal (max_fresh_flip), the verdict and the worst place; and the fresh probes
    toward the target that say the backdoor is left (what defend's unlearning round adds)."""
    prep, opts, progress = ctx.prep, ctx.opts, ctx.progress

    def fresh(cls: int | None, names) -> list:
        probes = synthesize(model, ctx.fit_raw, prep.pre, cls, opts.seed, spec=prep.spec, only=set(names),
                            exclude=(ctx.target,), families=ctx.leads.families, places=ctx.leads.places, sparse=True,
                            colour=ctx.leads.colour, **ctx.synthesize_kw())
        return probes, [prep.pre.apply(p.apply(ctx.hold_raw)) for p in probes]

    progress("re-attack", 0, 2)
    counted = [n for n, g in bars.items() if np.isfinite(g)]
    probes, probed = fresh(ctx.target, counted)
    synthesized = {p.describe(): p for p in probes}
    _, rates = ctx.flips(model, probed)
    toward_target = {p.describe(): round(r, 4) for p, r in zip(probes, rates)}
    over, control = over_bar(toward_target, bars), None
    if over:
        probes, probed = fresh(None, over)
        got = reach(model, prep.spec, ctx.clean_x, probed, opts.batch_size, ctx.target)
        control = {p.describe(): (c, round(r, 4)) for p, (c, r) in zip(probes, got)}
        # the any-class objective spreads its effort over the classes: where the target still leads, the
        # class that probe reached gets one aimed at it alone, as the target's was, and the better counts
        leading = still_reachable(toward_target, bars, {n: r for n, (_, r) in control.items()})
        for cls in sorted({control[n][0] for n in leading}):
            probes, probed = fresh(cls, [n for n in leading if control[n][0] == cls])
            _, rates = ctx.flips(model, probed, target=cls)
            for p, r in zip(probes, rates):
                control[p.describe()] = (cls, max(control[p.describe()][1], round(r, 4)))
    progress("re-attack", 2, 2)
    control_flip = None if control is None else {n: r for n, (_, r) in control.items()}
    left = still_reachable(toward_target, bars, control_flip)
    # the best flip among the probes judged at the goal: the sparse probe's rate, under its own looser bar,
    # would read as a backdoor left beside the others'
    at_goal = [r for n, r in toward_target.items() if bars[n] <= FLIP_GOAL] or list(toward_target.values())
    out = {"fresh_probe_flip": toward_target, "max_fresh_flip": max(at_goal),
           "bars": {n: (None if np.isinf(g) else round(g, 4)) for n, g in bars.items()},
           "silenced": not left}
    if control is not None:
        out["control"] = {"fresh_probe_flip": control_flip, "class": {n: c for n, (c, _) in control.items()},
                          "max_fresh_flip": max(control_flip.values())}
    if left:
        worst = max(left, key=lambda n: toward_target[n] - (control_flip or {}).get(n, 0.0))
        out["worst"] = {"probe": worst, "target_flip": toward_target[worst],
                        **({"control_flip": control_flip[worst], "control_class": control[worst][0]}
                           if control is not None else {})}
    return out, [synthesized[n] for n in left]
