"""Universal probes toward a suspected target class: what a trigger would do, found without one.

A backdoor is a shortcut: a small, input-independent change that sends any image to the target. So we
search for such changes directly — a square patch at each corner and at the centre (patch triggers sit
somewhere, we do not know where), and a faint full-image perturbation (blended triggers) — each
optimised on clean images to reach the target. Where the model has a backdoor, the probe that finds it
drives the backdoor's units far above anything clean images do, which is the ℓ∞ signature Cheng et al.
rank by; probes that only find ordinary adversarial weakness spread over many units instead.

Two more families follow triggers no patch expresses, each with few degrees of freedom so that a model
without such a backdoor admits them far less than a free full-image perturbation: a signal, one value per
column (or per row) repeated along the other axis and over the channels, a sum of a few sine periods —
the sinusoid of SIG (Barni, Kallas, Tondi, ICIP 2019) is one — and a smooth warp of at most WARP_PIXELS, a
4×4 grid of displacements upsampled to the image — WaNet's trigger (Nguyen, Tran, ICLR 2021) is one. They
are synthesized when the detection scan found the target with them (FAMILIES).

The re-attack adds a sparse probe: as many pixels as the larger patch holds, anywhere, each of free value — a
trigger spread over the image (an L0 trigger) whose part under one patch place pruning silenced still works
through the rest, which no fixed place sees. Its mask is Neural Cleanse's (Wang et al. 2019), kept under the
pixel count by a penalty and cut to the count's largest entries when applied.
"""
from __future__ import annotations

import itertools
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx

from calib.preprocess import Preprocess

from ..errors import require
from .torchnet import class_scores, classifier, device, make_input, pixel_range

# Patch sides as a share of the image side: patch triggers in the literature cover ~1-4 % of the image,
# i.e. a side of 10-20 %. A probe smaller than the trigger can be silenced while the trigger still works,
# so the defense probes at both ends; the detection scan, run for every class, at the smaller side only.
PATCH_SIDE = 0.15
LARGE_PATCH_SIDE = 0.2
# ℓ∞ bound of the full-image probe, as a share of the pixel range (a blended trigger at α 0.1-0.2).
BLEND_EPS = 0.1
# ℓ∞ bound of the signal probe, as a share of the pixel range: SIG's sinusoid has amplitude 20/255 in the
# paper and 40/255 in BackdoorBench. A free value per column and channel at 0.12 is a universal perturbation
# on weak CIFAR-10 models (0.97 of images to a non-target class); one signal shared by the channels and made
# of at most SIGNAL_PERIODS sine and cosine periods over the image reaches at most 0.69 toward any class on
# twelve models without such a backdoor, 0.98-0.99 on a SIG-40 one (README, "The family scan").
SIGNAL_EPS = 0.12
SIGNAL_PERIODS = 8
# Largest displacement of the warp probe, in pixels: WaNet warps CIFAR-size images by 0.5-1 pixel, up to
# 1/32 of their side; smaller images get that share (a pixel is an eighth of an 8x8 image, a warp any model
# follows somewhere).
WARP_PIXELS = 1.0
WARP_SHARE = 1 / 32
# Side of the grid of displacements the warp probe upsamples (WaNet's k).
WARP_GRID = 4
# Weight of the sparse probe's penalty on mask mass over its pixel count (relative to the count): at 1 a
# 16x16 digits model's 8-pixel trigger is found whole (README, "The re-attack's sparse probe").
SPARSE_PENALTY = 1.0
# Share of the sparse probe's steps spent on its pattern alone under the cut mask, after the soft mask's.
SPARSE_HARD_SHARE = 0.25
STEPS = 100
N_IMAGES = 64
# The solid colours a colour patch may start at: the RGB cube's corners, a little inside so that the sigmoid's
# gradient there is not nil (_Optimiser.patches' colour_start)
COLOUR_STARTS = tuple(itertools.product((0.05, 0.95), repeat=3))


@dataclass
class Probe:
    kind: str                      # "patch" | "blend" | "signal" | "warp" | "sparse"
    at: tuple[int, int] | None     # patch: top-left corner (row, col)
    # patch: pixels (s, s, C); blend: additive (H, W, C); signal: additive (1, W, C) along columns or (H, 1, C)
    # along rows; raw pixel units. warp: displacement (H, W, 2) in pixels, (column, row) order. sparse: pixels
    # (H, W, C), of which those under `mask` are painted
    delta: np.ndarray
    hi: float                      # top of the raw pixel range
    mask: np.ndarray | None = None  # sparse: (H, W) bool, the pixels painted

    def apply(self, x_raw: np.ndarray) -> np.ndarray:
        x = np.array(x_raw, np.float32, copy=True)
        if self.kind == "patch":
            r, c = self.at
            s = self.delta.shape[0]
            x[:, r:r + s, c:c + s, :] = self.delta
            return x
        if self.kind == "sparse":
            x[:, self.mask] = self.delta[self.mask]
            return x
        if self.kind == "warp":
            return warp(x, self.delta)
        return np.clip(x + self.delta, 0.0, self.hi).astype(np.float32)

    def describe(self) -> str:
        if self.kind == "signal":
            return probe_name("signal along columns" if self.delta.shape[0] == 1 else "signal along rows")
        if self.kind == "sparse":
            return probe_name("sparse", int(self.mask.sum()))
        return probe_name(self.kind, self.delta.shape[0], self.at)


def probe_name(kind: str, side: int | None = None, at: tuple[int, int] | None = None) -> str:
    """How a probe is named in reports and matched across syntheses: its kind, side and place. `kind`: "patch",
    "blend", "warp", "sparse" (`side`: its pixel count) or a signal family ("signal along columns" | "signal
    along rows")."""
    if kind == "patch":
        return f"patch {side}x{side} at {at}"
    if kind == "sparse":
        return f"sparse probe of {side} pixels"
    if kind == "blend":
        return f"blend ±{BLEND_EPS:g} of range"
    if kind == "warp":
        return "warp"
    return f"{kind} ±{SIGNAL_EPS:g} of range"


# the probe families the detection scan tries after the patches, and synthesize adds when asked
FAMILIES = ("signal along columns", "signal along rows", "warp")


def warp(x_raw: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Images (N, H, W, C) float32 resampled bilinearly at each pixel's place plus `flow` (H, W, 2: column,
    row displacement in pixels), places clamped to the image: torch's grid_sample with align_corners=True
    and border padding, which the warp probe is optimised through."""
    n, h, w, c = x_raw.shape
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    px = np.clip(cols + flow[..., 0], 0, w - 1)
    py = np.clip(rows + flow[..., 1], 0, h - 1)
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (px - x0)[None, ..., None], (py - y0)[None, ..., None]
    top = x_raw[:, y0, x0] * (1 - fx) + x_raw[:, y0, x1] * fx
    bottom = x_raw[:, y1, x0] * (1 - fx) + x_raw[:, y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _locations(h: int, w: int, s: int, places: Collection[tuple[int, int, int]] = ()) -> list[tuple[int, int]]:
    """Top-left corners of a side-`s` patch on an h x w image: the corners, the centre, then those of `places`
    ((side, row, col), e.g. where the mask search's trigger sits: detect.trigger_places) of side `s`."""
    fixed = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), ((h - s) // 2, (w - s) // 2)]
    return list(dict.fromkeys(fixed + [(r, c) for side, r, c in places if side == s]))


def patch_side(share: float, h: int, w: int) -> int:
    """The side in pixels of a patch probe at `share` of an h x w image's shorter side (at least 2)."""
    return max(2, int(round(share * min(h, w))))


def sparse_pixels(h: int, w: int) -> int:
    """The sparse probe's pixel count on an h x w image: as many as the larger patch (LARGE_PATCH_SIDE) holds."""
    return patch_side(LARGE_PATCH_SIDE, h, w) ** 2


# The places a patch of each side is always tried at: the corners and the centre.
N_PLACES = len(_locations(5, 5, 1))


class _Optimiser:
    """Probes toward one class at a time on a fixed set of clean images, through one torch copy of the model."""

    def __init__(self, model: onnx.ModelProto, x_fit: np.ndarray, pp: Preprocess, hi: float, spec=None):
        self.torch = torch = require("torch", "torch")
        self.on = device(torch)
        self.graph = classifier(model, spec, frozen=True)
        self.pp, self.hi = pp, hi
        self.x = torch.from_numpy(x_fit).to(self.on)
        self.h, self.w, self.ch = self.x.shape[1:]

    def _fit(self, x, target: int | None, shape, paint, steps: int, exclude: tuple[int, ...] = (), init=None,
             penalty=None):
        """The parameter (of `shape`, zeros or `init`) that `paint`s `x` toward `target`, after `steps` Adam
        steps on the loss plus `penalty` of the parameter, if any."""
        torch = self.torch
        loss_of = self._toward(x, target, exclude)
        param = (torch.zeros(shape, device=self.on) if init is None else init.to(self.on)).requires_grad_(True)
        opt = torch.optim.Adam([param], lr=0.1)
        for _ in range(steps):
            logits, _ = self.graph(make_input(torch, paint(x, param), self.pp))
            loss = loss_of(logits) + (0.0 if penalty is None else penalty(param))
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
        logits = class_scores(torch, self.graph, x, self.pp)
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
        return patch_side(share, self.h, self.w)

    def patches(self, target: int | None, steps: int, x=None, share: float = PATCH_SIDE,
                exclude: tuple[int, ...] = (), only: Collection[str] | None = None,
                places: Collection[tuple[int, int, int]] = (), colour_start: bool = False) -> list[Probe]:
        """A patch at each place toward `target` (None: toward whichever class but `exclude` it can reach);
        with `only`, at the places whose probe_name is in it; `places`: more places (_locations).
        `colour_start` (3-channel images): each patch starts at the solid colour of COLOUR_STARTS whose loss is
        lowest (forward passes alone) instead of mid grey: from grey a few dozen Adam steps move the channels
        together, and a colour trigger needs some up and others down (a green 3x3 corner square on colour
        digits: 0.75 of the images after 20 steps from grey, 0.99 from green)."""
        x = self.x if x is None else x.to(self.on)
        s, torch = self.side(share), self.torch
        out = []
        for r, c in _locations(self.h, self.w, s, places):
            if only is not None and probe_name("patch", s, (r, c)) not in only:
                continue
            def paint(x, p, r=r, c=c):
                x = x.clone()
                x[:, r:r + s, c:c + s, :] = torch.sigmoid(p * 4) * self.hi
                return x
            init = self._solid_start(x, target, exclude, paint, s) if colour_start and self.ch == 3 else None
            p = self._fit(x, target, (s, s, self.ch), paint, steps, exclude, init)
            out.append(Probe("patch", (r, c), (torch.sigmoid(p * 4) * self.hi).cpu().numpy().astype(np.float32), self.hi))
        return out

    def _solid_start(self, x, target: int | None, exclude: tuple[int, ...], paint, s: int):
        """The patch parameter (s, s, 3) of the colour of COLOUR_STARTS whose loss toward `target` (as _fit's)
        is lowest when `paint`ed on `x`."""
        torch = self.torch
        loss_of = self._toward(x, target, exclude)
        colours = torch.tensor(COLOUR_STARTS, dtype=torch.float32, device=self.on)
        params = torch.log(colours / (1 - colours)) / 4   # sigmoid(4 p) is the colour
        with torch.no_grad():
            losses = [float(loss_of(self.graph(make_input(torch, paint(x, p.expand(s, s, 3)), self.pp))[0]))
                      for p in params]
        return params[int(np.argmin(losses))].expand(s, s, 3).clone()

    def blend(self, target: int | None, steps: int, exclude: tuple[int, ...] = (), x=None) -> Probe:
        return self._additive("blend", tuple(self.x.shape[1:]), BLEND_EPS, target, steps, exclude, x)

    def signal(self, family: str, target: int | None, steps: int, exclude: tuple[int, ...] = (), x=None) -> Probe:
        """`family`: "signal along columns" (one value per column, the same in every row and channel) or
        "signal along rows"; the values are tanh of a sum of sines and cosines of 1..SIGNAL_PERIODS periods
        over the image (fewer on images too narrow to hold them), times SIGNAL_EPS of the pixel range."""
        torch = self.torch
        along_columns = family == "signal along columns"
        n = self.w if along_columns else self.h
        j = torch.arange(n, dtype=torch.float32, device=self.on) * (2 * np.pi / n)
        # periods below the Nyquist limit only: k = n/2 would be a constant offset on even sides
        periods = range(1, max(1, min(SIGNAL_PERIODS, (n - 1) // 2)) + 1)
        basis = torch.stack([f(k * j) for f in (torch.cos, torch.sin) for k in periods])
        shape = (1, n, 1) if along_columns else (n, 1, 1)
        probe = self._additive("signal", (len(basis),), SIGNAL_EPS, target, steps, exclude, x,
                               lambda p: (p @ basis).reshape(shape))
        probe.delta = np.broadcast_to(probe.delta, shape[:2] + (self.ch,)).copy()
        return probe

    def _additive(self, kind: str, shape, share: float, target, steps, exclude, x, to_image=lambda p: p) -> Probe:
        """A perturbation of at most `share` of the pixel range: tanh of `to_image` of a parameter of `shape`."""
        torch, eps = self.torch, share * self.hi
        x = self.x if x is None else x.to(self.on)
        p = self._fit(x, target, shape, lambda x, p: (x + torch.tanh(to_image(p)) * eps).clamp(0, self.hi), steps,
                      exclude)
        with torch.no_grad():
            return Probe(kind, None, (torch.tanh(to_image(p)) * eps).cpu().numpy().astype(np.float32), self.hi)

    def warp(self, target: int | None, steps: int, exclude: tuple[int, ...] = (), x=None) -> Probe:
        """A smooth warp: a WARP_GRID² grid of (column, row) displacements, upsampled bicubically to the image
        and bounded by WARP_PIXELS, applied with grid_sample (the same resampling as probes.warp)."""
        torch, fn = self.torch, self.torch.nn.functional
        x = self.x if x is None else x.to(self.on)
        h, w = self.h, self.w
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, h, device=self.on), torch.linspace(-1, 1, w, device=self.on),
                                    indexing="ij")
        identity = torch.stack([cols, rows], -1)[None]
        to_grid = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], device=self.on)

        most = self.warp_pixels()

        def flow(p):
            up = fn.interpolate(torch.tanh(p).permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=True)
            return up[0].permute(1, 2, 0).clamp(-1, 1) * most

        def paint(x, p):
            grid = (identity + flow(p)[None] * to_grid).clamp(-1, 1).expand(len(x), h, w, 2)
            return fn.grid_sample(x.permute(0, 3, 1, 2), grid, align_corners=True,
                                  padding_mode="border").permute(0, 2, 3, 1)

        p = self._fit(x, target, (WARP_GRID, WARP_GRID, 2), paint, steps, exclude)
        with torch.no_grad():
            return Probe("warp", None, flow(p).cpu().numpy().astype(np.float32), self.hi)

    def sparse(self, target: int | None, steps: int, exclude: tuple[int, ...] = (), x=None) -> Probe:
        """sparse_pixels pixels anywhere, each of free value: a soft mask (sigmoid of a logit per pixel,
        started at the pixel count's share) and a pattern, optimised with a penalty of SPARSE_PENALTY times the
        mask's mass over the count (relative to it); then the mask is cut to the count's largest entries and,
        for the last SPARSE_HARD_SHARE of the `steps`, the pattern alone is tuned under that cut mask, so
        that the probe applied is the one optimised last (a soft mask may spread where the cut one cannot)."""
        torch = self.torch
        x = self.x if x is None else x.to(self.on)
        h, w = self.h, self.w
        k = sparse_pixels(h, w)
        init = torch.zeros((h, w, self.ch + 1))
        init[..., 0] = float(np.log(k / max(h * w - k, 1)))
        hard_steps = int(steps * SPARSE_HARD_SHARE)

        def paint(x, p):
            mask = torch.sigmoid(p[..., :1])
            return x * (1 - mask) + mask * torch.sigmoid(p[..., 1:] * 4) * self.hi

        p = self._fit(x, target, (h, w, self.ch + 1), paint, steps - hard_steps, exclude, init,
                      lambda p: SPARSE_PENALTY * torch.relu(torch.sigmoid(p[..., 0]).sum() - k) / k)
        mask = torch.zeros(h * w, device=self.on)
        mask[torch.topk(p[..., 0].reshape(-1), min(k, h * w)).indices] = 1.0
        mask = mask.reshape(h, w, 1)

        def paint_cut(x, q):
            return x * (1 - mask) + mask * torch.sigmoid(q * 4) * self.hi

        q = p[..., 1:].clone()
        if hard_steps:
            q = self._fit(x, target, (h, w, self.ch), paint_cut, hard_steps, exclude, q)
        with torch.no_grad():
            pattern = (torch.sigmoid(q * 4) * self.hi).cpu().numpy().astype(np.float32)
        return Probe("sparse", None, pattern, self.hi, mask[..., 0].cpu().numpy() > 0.5)

    def warp_pixels(self) -> float:
        return min(WARP_PIXELS, WARP_SHARE * min(self.h, self.w))

    def family(self, name: str, target: int | None, steps: int, exclude: tuple[int, ...] = (), x=None) -> Probe:
        """One probe of a family of FAMILIES."""
        if name == "warp":
            return self.warp(target, steps, exclude, x)
        return self.signal(name, target, steps, exclude, x)

    def logits(self, x_raw: np.ndarray) -> np.ndarray:
        return class_scores(self.torch, self.graph, self.torch.from_numpy(x_raw), self.pp).cpu().numpy()


def _split(x_raw: np.ndarray, n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n_images` of `x_raw` (in file order) to fit probes on, and the rest."""
    x_raw = np.asarray(x_raw, np.float32)
    chosen = np.zeros(len(x_raw), bool)
    chosen[np.random.default_rng(seed).permutation(len(x_raw))[:n_images]] = True
    return x_raw[chosen], x_raw[~chosen]


def synthesize(model: onnx.ModelProto, x_raw: np.ndarray, pp: Preprocess, target: int | None, seed: int = 0, *,
               steps: int = STEPS, n_images: int = N_IMAGES, spec=None, families: Collection[str] = (),
               only: Collection[str] | None = None, exclude: tuple[int, ...] = (), sparse: bool = False,
               places: Collection[tuple[int, int, int]] = (), colour: bool = False) -> list[Probe]:
    """One probe per location and patch side, one full-image probe, one of each of `families` (of FAMILIES)
    and — `sparse` — the sparse probe, each optimised to send `x_raw` to `target` (None: to whichever class
    other than `exclude` it reaches most easily, _Optimiser._toward); with `only`, just the probes whose
    probe_name is in it. `places`: patch places beside the corners and the centre, (side in pixels, row,
    col) of the top-left corner. `colour`: the patches start at a solid colour (_Optimiser.patches'
    colour_start). `x_raw`: (N, H, W, C) float32 raw pixels. `spec`: the model's InputSpec (see
    torchnet.classifier)."""
    x_fit, _ = _split(x_raw, n_images, seed)
    opt = _Optimiser(model, x_fit, pp, pixel_range(x_raw), spec)
    sides = {opt.side(share): share for share in (PATCH_SIDE, LARGE_PATCH_SIDE)}
    out = [p for share in sides.values()
           for p in opt.patches(target, steps, share=share, exclude=exclude, only=only, places=places,
                                colour_start=colour)]
    out += [opt.blend(target, steps, exclude)] if only is None or probe_name("blend") in only else []
    out += [opt.family(f, target, steps, exclude) for f in FAMILIES
            if f in families and (only is None or probe_name(f) in only)]
    wanted = sparse and (only is None or sparse_name(x_raw) in only)
    return out + ([opt.sparse(target, steps, exclude)] if wanted else [])


def sparse_name(x_raw: np.ndarray) -> str:
    """The probe_name of the sparse probe on images shaped like `x_raw` (N, H, W, C)."""
    return probe_name("sparse", sparse_pixels(*x_raw.shape[1:3]))
