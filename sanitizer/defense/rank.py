"""Per unit, how much the probes' pull toward the target rests on it.

Every unit gets a multiplicative mask held at 1; the gradient of the target margin (target logit minus
the best other logit) with respect to that mask is the first-order change in the margin if the unit were
pruned. Averaged over probed images it says which units carry the probe to the target; the same average
over the clean images is subtracted, because units that lean clean images toward the target too are the
class's own features, not the shortcut. Unlike an ℓ∞ rise, the score is in logits for every layer, so conv
channels and dense neurons rank on one scale, and units that fire hard on the probe but do not matter to
the decision score nothing.
"""
from __future__ import annotations

import numpy as np
import onnx

from calib.preprocess import Preprocess

from ..errors import require
from ..graph import Site
from .torchnet import classifier, device, make_input


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
