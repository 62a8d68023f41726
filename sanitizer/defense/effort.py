"""Effort: how much optimisation the defense's searches do, sized to a time budget (issue 13).

Every search of the defense (the detection scans and mask search, the probes, the repair, the re-attack) is
optimiser steps × images per step torch passes (forward and backward), and every check (bounds, count,
re-attack) forwards probed held-out images with onnxruntime. At full effort (each module's constants) a
CIFAR-size model costs 15-30 minutes on 2 cores; one pass of an ImageNet-size ResNet-50 at 224×224 costs 23×
the CIFAR ResNet-18's (README, Where the time goes), so the same work would take most of a day. Before each
stage (each detection search as it comes, then the rest of the defense) its work at full effort is priced
with the pass costs measured on this model on this machine (PassCost); when it does not fit its part of the
budget, the effort is halved until it does: first the optimiser steps (down to MIN_STEP_SHARE of them), then
the images each step sees (down to MIN_IMAGES) and the images each probe is tested on (down to MIN_TEST), by
the part of the cut the steps could not take — except a tuning run (the repair), which keeps its updates and
sees fewer images per step first (Effort.updates). Steps first because a probe tested on fewer held-out images
makes the re-attack's verdict a coin toss (the open suite's MobileNetV2 at half the images was refused on 125 of
them), while with a quarter of the steps, every image kept, ResNet-18 and MobileNetV2 kept the goal (README,
Where the time goes). Fewer steps can leave out a probe that crosses the bar for being used late (on ResNet-18
one patch place crosses it after 50 of 100 steps): which probes rank the units then changes.
Shares are powers of two, so timing noise moves the effort only near a boundary; the report says which was
used and why.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# The whole run's default budget, in seconds of wall time on the machine it runs on. At full effort the open
# suite's CIFAR-10 models cost up to 26 min on 2 idle cores; within 15 their defense runs at half the steps (every
# probe image kept) or in full and kept the goal (README, Benchmark); an ImageNet-size
# ResNet-50's detection runs at the floors (13.1 min on 2 cores, issue 13's bar; a backdoored one's defense
# would take over an hour more).
DEFAULT_BUDGET = 15 * 60
# Each detection search's part of the budget left when it starts (the patch scan, then the family scan and
# the mask search only when nothing was found); the defense gets all that is left after them.
DETECTION_SHARE = 0.25
# Floors of a reduced effort: images per optimiser step, share of the steps, images a probe is tested on.
MIN_IMAGES = 8
MIN_STEP_SHARE = 0.25
MIN_TEST = 64
# Images the torch pass cost is timed on: on small models a few images time the interpreter's overhead, which
# the searches' batches of 32-64 spread thin.
COST_IMAGES = 16
# The smallest share tried (1/64): below it the floors hold everything anyway.
SHARES = tuple(0.5 ** k for k in range(7))


@dataclass(frozen=True)
class Effort:
    """A share of the full work (1.0: each module's constants), turned into per-search numbers."""

    share: float = 1.0

    def _step_share(self) -> float:
        return min(1.0, max(MIN_STEP_SHARE, self.share))

    def breadth(self) -> float:
        """The part of the cut the steps could not take (their floor): the share of the images each step
        sees and each probe is tested on, and of the classes the mask search runs on, that a search keeps."""
        return self.share / self._step_share()

    def steps(self, full: int) -> int:
        """Optimiser steps for a search whose full effort is `full` steps."""
        return max(1, round(full * self._step_share()))

    def images(self, full: int) -> int:
        """Images per optimiser step for a search whose full effort uses `full`, down to MIN_IMAGES."""
        return min(full, max(MIN_IMAGES, round(full * self.breadth())))

    def updates(self, steps: int, batch: int) -> tuple[int, int]:
        """(steps, images per step) of a tuning run (the repair) whose full effort is `steps` of `batch` images:
        images first, down to MIN_IMAGES, then the steps, down to MIN_STEP_SHARE — a repair needs its number of
        updates (repair.RUNS; on the open suite's MNIST CNN 75 steps left an estimated drop of 0.050, 300 steps of
        16 images 0.027, README), a probe its images."""
        images = min(batch, max(MIN_IMAGES, round(batch * self.share)))
        left = self.share * batch / images
        return max(1, round(steps * min(1.0, max(MIN_STEP_SHARE, left)))), images

    def tests(self, n: int) -> int:
        """Images a probe is tested on, of `n` available, down to MIN_TEST."""
        return min(n, max(MIN_TEST, round(n * self.breadth())))


FULL = Effort()


@dataclass(frozen=True)
class PassCost:
    """Wall seconds per image on this machine: a torch forward + backward (to the input, as the searches do;
    the repair's backward to the weights costs about the same, README), and an onnxruntime forward."""

    backward: float
    forward: float

    def seconds(self, work: tuple[float, float]) -> float:
        """Wall seconds of `work`: (torch forward+backward image passes, onnxruntime forward image passes)."""
        return work[0] * self.backward + work[1] * self.forward


def measure(model, spec, pp, x_raw: np.ndarray, forward: float, repeats: int = 2) -> PassCost:
    """PassCost of `model` here: a torch forward + backward to the input on `x_raw` (N, H, W, C float32 raw
    pixels; a batch of the first COST_IMAGES), the best of `repeats` after a warm-up, and `forward` (seconds per
    image of an onnxruntime forward, timed by the caller on work it does anyway). Raises MissingDependency
    without torch."""
    from ..errors import require
    from .torchnet import classifier, make_input

    torch = require("torch", "torch")
    graph = classifier(model, spec, frozen=True)
    x = make_input(torch, torch.from_numpy(np.asarray(x_raw[:COST_IMAGES], np.float32)), pp)
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        xi = x.detach().clone().requires_grad_(True)
        graph(xi)[0].logsumexp(1).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()   # CUDA runs asynchronously: the clock would time the launches only
        if i:
            best = min(best, time.perf_counter() - start)
    return PassCost(best / len(x), forward)


def sized(work: Callable[[Effort], tuple[float, float]], cost: PassCost, budget: float) -> tuple[Effort, dict]:
    """The largest effort of SHARES whose `work` (see PassCost.seconds) costs at most `budget` seconds (the
    cheapest when none does: at the floors a smaller share can cost more, e.g. the mask search tests the fit
    images it no longer optimises on; of equal ones the smallest), and the report's record of the choice."""
    tried = []
    for share in SHARES:
        effort = Effort(share)
        seconds = cost.seconds(work(effort))
        if seconds <= budget:
            break
        tried.append((seconds, share, effort))
    else:
        seconds, _, effort = min(tried)
    return effort, {"share": effort.share, "estimated_seconds": round(seconds, 1), "over_budget": bool(seconds > budget),
                    "full_effort_seconds": round(cost.seconds(work(FULL)), 1), "budget_seconds": round(budget, 1),
                    "pass_seconds": {"torch_forward_backward": round(cost.backward, 5),
                                     "onnxruntime_forward": round(cost.forward, 5)}}


def _seconds(t: float) -> str:
    return f"{t:.0f} s" if t < 120 else f"{t / 60:.0f} min"


def cut_stages(record: dict) -> dict[str, str]:
    """The stages of `record` (the report's "effort" section) that ran below full effort, each with its share
    as "1/N" (every share is 1/2**k), or "skipped" (an optional stage whose least effort was over its part of
    the budget), in the order they ran."""
    return {stage: "skipped" if r.get("skipped") else f"1/{round(1 / r['share'])}"
            for stage, r in record.items() if isinstance(r, dict) and (r.get("skipped") or r["share"] < 1)}


def summary(record: dict) -> str | None:
    """One line on the stages that ran below full effort (`record`: the report's "effort" section), for the
    console, the HTML page and a refusal; None when every stage ran at full effort."""
    cut = cut_stages(record)
    if not cut:
        return None
    parts = []
    for stage, share in cut.items():
        r = record[stage]
        if share == "skipped":
            parts.append(f"{stage} skipped (about {_seconds(r['estimated_seconds'])} here at its least, over its "
                         f"{_seconds(r['budget_seconds'])})")
            continue
        over = f", still over its {_seconds(r['budget_seconds'])}" if r.get("over_budget") else ""
        parts.append(f"{stage} at {share} (full effort: about {_seconds(r['full_effort_seconds'])} "
                     f"here{over})")
    return (f"reduced effort for --time-budget {record['budget_seconds'] / 60:g} min: {', '.join(parts)}; fewer "
            f"images and steps per search can miss a backdoor the full effort finds (--time-budget 0: full effort)")
