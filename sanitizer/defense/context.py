"""What every step of the defense needs, in one object: `defend` builds a Context once per run and hands it
to the steps (bound, rank, count, re-attack) in place of the prepared model, the options, the progress
callback, the target and the images one by one."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .count import flips
from .detect import Leads
from .effort import FULL, Effort
from .probes import N_IMAGES, STEPS

if TYPE_CHECKING:
    from ..pipeline import HeldOut, Options, Prepared, Progress


@dataclass
class Context:
    prep: Prepared                  # the model, its sites, input spec, preprocessing and calibration images
    opts: Options                   # the run's options: seed, batch_size, max_acc_drop, figures_wanted, ...
    progress: Progress              # (stage, done, total) callback
    target: int                     # the class the backdoor is suspected to send images to
    fit_raw: np.ndarray             # raw pixels of the fit images: probes are fitted and units ranked on them
    hold_raw: np.ndarray | None     # raw pixels of the first held-out images (all at full effort), to probe;
                                    # None with suspicious samples
    held: HeldOut                   # the held-out images, on which every decision is judged
    clean_x: np.ndarray             # held.inputs(): the held-out images as model inputs
    leads: Leads = Leads()          # probe families and patch places detection adds to the fixed probes
    effort: Effort = FULL           # images and steps of the probes, repair and re-attack (effort.py)
    # (stage, work) -> the effort an optional stage may run at within the time budget left, or None when it
    # does not fit (pipeline.Sizing); None here: such a stage does not run
    afford: Callable[[str, Callable[[Effort], tuple[float, float]]], Effort | None] | None = None

    @property
    def rank_raw(self) -> np.ndarray:
        """The fit images the units are ranked on: the first effort.tests of them."""
        return self.fit_raw[:self.effort.tests(len(self.fit_raw))]

    def synthesize_kw(self) -> dict:
        """probes.synthesize's steps and images at this run's effort."""
        return {"steps": self.effort.steps(STEPS), "n_images": self.effort.images(N_IMAGES)}

    def flips(self, model: onnx.ModelProto, probed_x: list[np.ndarray], paired: bool = True,
              target: int | None = None) -> tuple[np.ndarray, list[float]]:
        """count.flips on the held-out images, in batches of the run's batch size, toward `target` (None: the
        run's target)."""
        return flips(model, self.prep.spec, self.clean_x, probed_x, self.target if target is None else target,
                     self.opts.batch_size, paired)
