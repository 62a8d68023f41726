"""Universal probes toward a suspected target class: what a trigger would do, found without one.

A backdoor is a shortcut: a small, input-independent change that sends any image to the target. So we
search for such changes directly — a square patch at each corner and at the centre (patch triggers sit
somewhere, we do not know where), and a faint full-image perturbation (blended and signal triggers) — each
optimised on clean images to reach the target. Where the model has a backdoor, the probe that finds it
drives the backdoor's units far above anything clean images do, which is the ℓ∞ signature Cheng et al.
rank by; probes that only find ordinary adversarial weakness spread over many units instead.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx

from calib.preprocess import Preprocess

from ..errors import require
from .torchnet import classifier, device, make_input, pixel_range

# Patch sides as a share of the image side: patch triggers in the literature cover ~1-4 % of the image,
# i.e. a side of 10-20 %. A probe smaller than the trigger can be silenced while the trigger still works,
# so the defense probes at both ends; the detection scan, run for every class, at the smaller side only.
PATCH_SIDE = 0.15
LARGE_PATCH_SIDE = 0.2
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
        return probe_name(self.kind, self.delta.shape[0], self.at)


def probe_name(kind: str, side: int | None = None, at: tuple[int, int] | None = None) -> str:
    """How a probe is named in reports and matched across syntheses: its kind, side and place."""
    return f"patch {side}x{side} at {at}" if kind == "patch" else f"blend ±{BLEND_EPS:g} of range"


def _locations(h: int, w: int, s: int) -> list[tuple[int, int]]:
    return [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), ((h - s) // 2, (w - s) // 2)]


class _Optimiser:
    """Probes toward one class at a time on a fixed set of clean images, through one torch copy of the model."""

    def __init__(self, model: onnx.ModelProto, x_fit: np.ndarray, pp: Preprocess, hi: float, spec=None):
        self.torch = torch = require("torch", "torch")
        self.on = device(torch)
        self.graph = classifier(model, spec, frozen=True)
        self.pp, self.hi = pp, hi
        self.x = torch.from_numpy(x_fit).to(self.on)
        self.h, self.w, self.ch = self.x.shape[1:]

    def _fit(self, x, target: int | None, shape, paint, steps: int, exclude: tuple[int, ...] = ()):
        torch = self.torch
        loss_of = self._toward(x, target, exclude)
        param = torch.zeros(shape, device=self.on, requires_grad=True)
        opt = torch.optim.Adam([param], lr=0.1)
        for _ in range(steps):
            logits, _ = self.graph(make_input(torch, paint(x, param), self.pp))
            loss = loss_of(logits)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return param.detach()

    def _toward(self, x, target: int | None, exclude: tuple[int, ...] = ()):
        """The loss of a probe toward `target`, or — None — toward whichever class it can reach (other
        than `exclude`): the largest (soft maximum over classes) mean log-probability of a class among the
        images not already in it, so the probe settles on the class easiest to send every image to."""
        torch = self.torch
        if target is not None:
            labels = torch.full((len(x),), target, dtype=torch.long, device=self.on)
            return lambda logits: torch.nn.functional.cross_entropy(logits, labels)
        with torch.no_grad():
            logits = self.graph(make_input(torch, x, self.pp))[0]
            outside = (logits.argmax(1)[:, None] != torch.arange(logits.shape[1], device=self.on)[None, :]).float()
        count = outside.sum(0)
        # a class every image is already in cannot be reached: it takes no part
        unreachable = torch.where(count > 0, 0.0, -torch.inf)
        unreachable[list(exclude)] = -torch.inf

        def loss(logits):
            logp = torch.log_softmax(logits, 1)
            mean = (logp * outside).sum(0) / count.clamp(min=1) + unreachable
            return -torch.logsumexp(mean, 0)
        return loss

    def side(self, share: float) -> int:
        return max(2, int(round(share * min(self.h, self.w))))

    def patches(self, target: int | None, steps: int, x=None, share: float = PATCH_SIDE,
                exclude: tuple[int, ...] = (), only: Collection[str] | None = None) -> list[Probe]:
        """A patch at each place toward `target` (None: toward whichever class but `exclude` it can reach);
        with `only`, at the places whose probe_name is in it."""
        x = self.x if x is None else x.to(self.on)
        s, torch = self.side(share), self.torch
        out = []
        for r, c in _locations(self.h, self.w, s):
            if only is not None and probe_name("patch", s, (r, c)) not in only:
                continue
            def paint(x, p, r=r, c=c):
                x = x.clone()
                x[:, r:r + s, c:c + s, :] = torch.sigmoid(p * 4) * self.hi
                return x
            p = self._fit(x, target, (s, s, self.ch), paint, steps, exclude)
            out.append(Probe("patch", (r, c), (torch.sigmoid(p * 4) * self.hi).cpu().numpy().astype(np.float32), self.hi))
        return out

    def blend(self, target: int | None, steps: int, exclude: tuple[int, ...] = ()) -> Probe:
        torch, eps = self.torch, BLEND_EPS * self.hi
        p = self._fit(self.x, target, tuple(self.x.shape[1:]),
                      lambda x, p: (x + torch.tanh(p) * eps).clamp(0, self.hi), steps, exclude)
        return Probe("blend", None, (torch.tanh(p) * eps).cpu().numpy().astype(np.float32), self.hi)

    def logits(self, x_raw: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.graph(make_input(self.torch, self.torch.from_numpy(x_raw), self.pp))[0].cpu().numpy()


def _split(x_raw: np.ndarray, n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n_images` of `x_raw` (in file order) to fit probes on, and the rest."""
    x_raw = np.asarray(x_raw, np.float32)
    chosen = np.zeros(len(x_raw), bool)
    chosen[np.random.default_rng(seed).permutation(len(x_raw))[:n_images]] = True
    return x_raw[chosen], x_raw[~chosen]


def synthesize(model: onnx.ModelProto, x_raw: np.ndarray, pp: Preprocess, target: int | None, seed: int = 0, *,
               steps: int = STEPS, n_images: int = N_IMAGES, spec=None,
               only: Collection[str] | None = None, exclude: tuple[int, ...] = ()) -> list[Probe]:
    """One probe per location and patch side plus one full-image probe, each optimised to send `x_raw` to
    `target` (None: to whichever class other than `exclude` it reaches most easily, _Optimiser._toward); with
    `only`, just the probes whose probe_name is in it. `x_raw`: (N, H, W, C) float32 raw pixels. `spec`: the
    model's InputSpec (see torchnet.classifier)."""
    x_fit, _ = _split(x_raw, n_images, seed)
    opt = _Optimiser(model, x_fit, pp, pixel_range(x_raw), spec)
    sides = {opt.side(share): share for share in (PATCH_SIDE, LARGE_PATCH_SIDE)}
    out = [p for share in sides.values() for p in opt.patches(target, steps, share=share, exclude=exclude, only=only)]
    return out + ([opt.blend(target, steps, exclude)] if only is None or probe_name("blend") in only else [])
