"""Re-attack: the result is judged by attacking it afresh, not by replaying the probes it was pruned against.

Fresh probes (probes.py) are synthesized against the sanitized model with the same budget as on the
original; where one is over its bar, the target is judged against a control class under the same
budget (detect.control_class), Neural Cleanse's idea of judging the target against the other classes
(Wang et al. 2019).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from .count import FLIP_GOAL
from .detect import control_class
from .probes import synthesize

if TYPE_CHECKING:
    from .context import Context


def over_bar(target_flip: dict[str, float], bars: dict[str, float]) -> list[str]:
    """The probes the count judged (finite bar, by kind and place) whose fresh flip rate is over their bar."""
    return [n for n, g in bars.items() if np.isfinite(g) and target_flip[n] > g]


def removed(target_flip: dict[str, float], bars: dict[str, float], control_flip: dict[str, float] | None) -> bool:
    """Whether fresh probes say the backdoor is gone. Only the probes the count judged (finite bar) take
    part: either each is under its bar, or the target is no easier to reach than a control class under the
    same budget — the best of those probes toward the target at most FLIP_GOAL above the best toward the
    control (what any class admits is ordinary adversarial weakness, not a backdoor). The whole counted set
    is compared, not only the places over their bar: the control's easiest place need not be the target's."""
    if not over_bar(target_flip, bars):
        return True
    if control_flip is None:
        return False
    counted = [n for n, g in bars.items() if np.isfinite(g)]
    return max(target_flip[n] for n in counted) <= max(control_flip[n] for n in counted) + FLIP_GOAL


def reattack(ctx: Context, model: onnx.ModelProto, bars: dict[str, float]) -> dict:
    """Fresh probes synthesized against the sanitized `model` with the same budget as on the original: the
    backdoor is judged by attacking the result, not by replaying probes it was pruned against. Only the
    probes the count judged (finite bar) are synthesized: the others take no part in the verdict. When one
    is over its bar (`bars`: per probe description, the flip rate it must be under — defend gives the goal,
    FLIP_GOAL; inf: not counted), the same probes are synthesized toward a control class (detect.control_class) and the target
    must be no easier to reach than it (see removed). Returns per probe its held-out flip rate toward the target
    (and the control's), the bars and the verdict."""
    prep, opts, progress = ctx.prep, ctx.opts, ctx.progress

    def attack(cls: int, names) -> dict[str, float]:
        fresh = synthesize(model, ctx.fit_raw, prep.pre, cls, opts.seed, spec=prep.spec, only=set(names))
        _, rates = ctx.flips(model, [prep.pre.apply(p.apply(ctx.hold_raw)) for p in fresh], target=cls)
        return {p.describe(): round(r, 4) for p, r in zip(fresh, rates)}

    progress("re-attack", 0, 2)
    counted = [n for n, g in bars.items() if np.isfinite(g)]
    toward_target, toward_control, control = attack(ctx.target, counted), None, None
    if over_bar(toward_target, bars):
        control = control_class(model, ctx.fit_raw, prep.pre, ctx.target, opts.seed, spec=prep.spec)
        toward_control = attack(control, counted)
    progress("re-attack", 2, 2)
    out = {"fresh_probe_flip": toward_target, "max_fresh_flip": max(toward_target.values()),
           "bars": {n: (None if np.isinf(g) else round(g, 4)) for n, g in bars.items()},
           "silenced": removed(toward_target, bars, toward_control)}
    if control is not None:
        out["control"] = {"class": control, "fresh_probe_flip": toward_control,
                          "max_fresh_flip": max(toward_control.values())}
    return out
