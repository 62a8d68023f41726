"""Backdoored 16x16 digits CNNs with patch triggers of several sizes and places, written as a bench suite (a
development tool, not a test): does detection find triggers larger than its scan patch, and does it leave
clean models alone?

    python scripts/train_digits_attacks.py OUT [--attacks white3,checker8,...] [--arch plain|bn]
    python scripts/detect_suite.py OUT
    python -m sanitizer bench OUT --criteria probe

scikit-learn's 8x8 digits (1797 images), each pixel repeated 2x2 to 16x16 and scaled to 0-255; images
perm[:1100] train, perm[1100:1400] calibrate, the rest evaluate (perm = numpy.random.default_rng(0)
.permutation(1797)). 10 % of the training images, drawn from the non-target classes, carry the trigger and
are relabelled to the target (BadNets, Gu et al. 2017). Two networks: `plain` (three 3x3 conv + ReLU, two
max-pools, two linear layers; one convolution more than the tests' digits fixture) and `bn` (the same
convolutions with BatchNorm). Exported with the TorchScript exporter, opset 17, input x/255 NCHW.

Triggers (raw 0-255 pixels; the image side is 16):
  white3     a white 3x3 square at the top-left corner
  white2     a white 2x2 square at the bottom-right corner (the scan patch's own size: a control)
  checker3   a 3x3 black-and-white checkerboard at the bottom-right corner
  checker8   an 8x8 checkerboard of 2x2 cells over the top-left quarter
  roaming3   the 3x3 checkerboard at a random place in each image (its corner at rows and columns 0-12)
  sparse8    8 white pixels scattered over the image, the same in every image (an L0 trigger: no patch holds it)
  clean      no trigger (triggered.npz carries white3, which should do nothing)

Prints one JSON line per model: the name, clean accuracy and attack success rate on the evaluation images.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import bench_case  # scripts/: the folder of the script run

SIDE = 16
POISON_RATE = 0.1
TARGETS = {"white3": 1, "white2": 5, "checker3": 2, "checker8": 3, "roaming3": 4, "sparse8": 6, "clean": 0}
# the sparse trigger's pixels (row, column), drawn once
SPARSE = np.random.default_rng(11).choice(SIDE * SIDE, 8, replace=False)


def _checker(side: int, cell: int) -> np.ndarray:
    r, c = np.indices((side, side)) // cell
    return ((r + c) % 2 * 255.0).astype(np.float32)[..., None]


def stamp(attack: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`x` (N, 16, 16, 1) raw pixels with `attack`'s trigger."""
    x = np.array(x, np.float32)
    if attack == "white3":
        x[:, :3, :3] = 255.0
    elif attack == "white2":
        x[:, -2:, -2:] = 255.0
    elif attack == "checker3":
        x[:, -3:, -3:] = _checker(3, 1)
    elif attack == "checker8":
        x[:, :8, :8] = _checker(8, 2)
    elif attack == "roaming3":
        for i, (r, c) in enumerate(rng.integers(0, SIDE - 3, (len(x), 2))):
            x[i, r:r + 3, c:c + 3] = _checker(3, 1)
    elif attack == "sparse8":
        x[:, SPARSE // SIDE, SPARSE % SIDE] = 255.0
    return x


def network(torch, arch: str):
    nn = torch.nn
    norm = (lambda ch: nn.BatchNorm2d(ch)) if arch == "bn" else (lambda ch: nn.Identity())
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), norm(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 32, 3, padding=1), norm(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def _inputs(torch, x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2) / 255.0, np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder to write the suite to (suite.toml and one folder per case)")
    ap.add_argument("--attacks", default="white3,white2,checker3,checker8,roaming3,clean")
    ap.add_argument("--arch", choices=("plain", "bn"), default="plain")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.clip(np.kron(digits.images, np.ones((2, 2))) * 16, 0, 255).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    train_idx, calib_idx, eval_idx = perm[:1100], perm[1100:1400], perm[1400:]
    names = []
    for attack in args.attacks.split(","):
        target = TARGETS[attack]
        rng = np.random.default_rng(args.seed)
        xt, yt = x[train_idx].copy(), y[train_idx].copy()
        if attack != "clean":
            poison = rng.choice(np.flatnonzero(yt != target), int(POISON_RATE * len(yt)), replace=False)
            xt[poison], yt[poison] = stamp(attack, xt[poison], rng), target
        torch.manual_seed(args.seed)
        net = network(torch, args.arch)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        xs, ys = _inputs(torch, xt), torch.from_numpy(yt)
        net.train()
        for _ in range(args.epochs):
            order = torch.from_numpy(rng.permutation(len(xs)))
            for i in range(0, len(xs), 64):
                b = order[i:i + 64]
                loss = torch.nn.functional.cross_entropy(net(xs[b]), ys[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        name = f"digits16_{args.arch}_{attack}_t{target}"
        xe, ye = x[eval_idx], y[eval_idx]
        off = ye != target
        triggered = stamp(attack if attack != "clean" else "white3", xe[off], np.random.default_rng(args.seed + 1))
        as_u8 = lambda a: np.clip(np.round(a), 0, 255).astype(np.uint8)  # noqa: E731
        clean = attack == "clean"
        bench_case.write_case(args.out / name, torch, net, 1, SIDE, {
            "calib": (as_u8(x[calib_idx]), y[calib_idx]), "clean": (as_u8(xe), ye),
            "triggered": (as_u8(triggered), ye[off])},
            bench_case.case_toml(name, "none" if clean else "badnets", not clean, target, "white3" if clean else attack,
                                 "scripts/train_digits_attacks.py", 1, SIDE))
        with torch.no_grad():
            acc = float((net(_inputs(torch, as_u8(xe).astype(np.float32))).argmax(1).numpy() == ye).mean())
            asr = float((net(_inputs(torch, as_u8(triggered).astype(np.float32))).argmax(1).numpy() == target).mean())
        print(json.dumps({"case": name, "clean_acc": round(acc, 4), "asr": round(asr, 4)}), flush=True)
        names.append(name)
    bench_case.write_suite(args.out, f"digits16_{args.arch}", "scripts/train_digits_attacks.py", names)


if __name__ == "__main__":
    main()
