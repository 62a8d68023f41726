"""Universal probes toward a suspected target class: what a trigger would do, found without one.

A backdoor is a shortcut: a small, input-independent change that sends any image to the target. So we
search for such changes directly — a square patch at each corner and at the centre (patch triggers sit
somewhere, we do not know where), and a faint full-image perturbation (blended and signal triggers) — each
optimised on clean images to reach the target. Where the model has a backdoor, the probe that finds it
drives the backdoor's units far above anything clean images do, which is the ℓ∞ signature Cheng et al.
rank by; probes that only find ordinary adversarial weakness spread over many units instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from calib.preprocess import Preprocess

from .errors import require
from .probe import make_input, pixel_range

# Patch side as a share of the image side: patch triggers in the literature cover ~1-4 % of the image.
PATCH_SIDE = 0.15
# ℓ∞ bound of the full-image probe, as a share of the pixel range (a blended trigger at α 0.1-0.2).
BLEND_EPS = 0.1
STEPS = 100
N_IMAGES = 64


@dataclass
class Probe:
    kind: str                      # "patch" | "blend"
    at: tuple[int, int] | None     # patch: top-left corner (row, col)
    delta: np.ndarray              # patch: pixels (s, s, C); blend: additive (H, W, C); raw pixel units
    hi: float                      # top of the raw pixel range

    def apply(self, x_raw: np.ndarray) -> np.ndarray:
        x = np.array(x_raw, np.float32, copy=True)
        if self.kind == "patch":
            r, c = self.at
            s = self.delta.shape[0]
            x[:, r:r + s, c:c + s, :] = self.delta
            return x
        return np.clip(x + self.delta, 0.0, self.hi).astype(np.float32)

    def describe(self) -> str:
        if self.kind == "patch":
            return f"patch {self.delta.shape[0]}x{self.delta.shape[1]} at {self.at}"
        return f"blend ±{BLEND_EPS:g} of range"


def _locations(h: int, w: int, s: int) -> list[tuple[int, int]]:
    return [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), ((h - s) // 2, (w - s) // 2)]


def synthesize(model: onnx.ModelProto, x_raw: np.ndarray, pp: Preprocess, target: int, seed: int = 0, *,
               steps: int = STEPS, n_images: int = N_IMAGES) -> list[Probe]:
    """One probe per location plus one full-image probe, each optimised to send `x_raw` to `target`."""
    torch = require("torch", "torch")
    from .torch_graph import to_torch

    x_raw = np.asarray(x_raw, np.float32)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(x_raw[np.sort(rng.permutation(len(x_raw))[:n_images])])
    graph = to_torch(model)
    for p in graph.parameters():
        p.requires_grad_(False)
    hi = pixel_range(x_raw)
    h, w, ch = x.shape[1:]
    s = max(2, int(round(PATCH_SIDE * min(h, w))))
    labels = torch.full((len(x),), target, dtype=torch.long)
    torch.manual_seed(seed)

    def optimise(shape, paint):
        param = torch.zeros(shape, requires_grad=True)
        opt = torch.optim.Adam([param], lr=0.1)
        for _ in range(steps):
            logits, _ = graph(make_input(torch, paint(param), pp))
            loss = torch.nn.functional.cross_entropy(logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return param.detach()

    probes = []
    for r, c in _locations(h, w, s):
        def paint(p, r=r, c=c):
            out = x.clone()
            out[:, r:r + s, c:c + s, :] = torch.sigmoid(p * 4) * hi
            return out
        p = optimise((s, s, ch), paint)
        probes.append(Probe("patch", (r, c), (torch.sigmoid(p * 4) * hi).numpy().astype(np.float32), hi))
    p = optimise((h, w, ch), lambda p: (x + torch.tanh(p) * BLEND_EPS * hi).clamp(0, hi))
    probes.append(Probe("blend", None, (torch.tanh(p) * BLEND_EPS * hi).numpy().astype(np.float32), hi))
    return probes
