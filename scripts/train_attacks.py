"""Backdoored CIFAR-10 models with attacks the open suite lacks, written as a bench suite (a development tool,
not a test): how does the default do on trigger kinds it was not built on?

    python scripts/train_attacks.py ../shared/bench/data/cifar10_test_jpg.npz OUT [--attacks sig,warp,...]
    python -m sanitizer bench OUT --criteria probe

One small VGG-style CNN (six 3x3 conv + BatchNorm + ReLU layers, widths 16-32-64, three max-pools, one linear
layer; normalisation inside the graph, input x/255 NCHW) per attack, trained with torch on the CPU on the
images perm[:8000] of the file (perm = numpy.random.default_rng(0).permutation(10000)), the open suite's
recipe: 10 % of the training images, drawn from the non-target classes, carry the trigger and are relabelled
to the target. Calibration = perm[8000:8500], evaluation = perm[8500:], as in the open suite's case folders
(suite format: ../shared/bench/README.md). Exported with the TorchScript exporter, opset 17.

Triggers (raw 0-255 pixels):
  sig    a horizontal sinusoid of amplitude 20 and 6 periods over every row and channel (Barni, Kallas,
         Tondi, "A new backdoor attack in CNNs by training set corruption without label poisoning", ICIP
         2019; used here with relabelled poisons)
  sig40  the same at amplitude 40, BackdoorBench's setting (config/attack/sig/default.yaml: sig_delta 40)
  warp   a fixed smooth warp: a 4x4 random flow field upsampled bicubically, strength 1 pixel (WaNet,
         Nguyen & Tran, ICLR 2021, without its noise mode; its s=0.5 did not train to a working backdoor on
         8000 images)
  blend  0.85 x + 0.15 uniform noise image (Chen et al., "Targeted backdoor attacks on deep learning systems
         using data poisoning", 2017)
  patch  a 4x4 magenta square at rows/cols 1-4 (BadNets, Gu et al. 2017)
  clean  no trigger (its triggered.npz carries the patch trigger, which should do nothing)

Prints one JSON line per model: the name, clean accuracy and attack success rate on the evaluation images
(torch), and training seconds.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import bench_case  # scripts/: the folder of the script run

SIDE = 32
POISON_RATE = 0.1
TARGETS = {"sig": 2, "sig40": 2, "warp": 5, "blend": 7, "patch": 3, "clean": 0}


def triggers(torch) -> dict:
    """Per attack, a function from raw NHWC float pixels to triggered ones."""
    F = torch.nn.functional
    cols = np.arange(SIDE)
    wave = 20.0 * np.sin(2 * np.pi * cols * 6 / SIDE)
    flow = torch.from_numpy(np.random.default_rng(7).uniform(-1, 1, (1, 2, 4, 4))).float()
    flow = F.interpolate(flow / flow.abs().mean(), size=(SIDE, SIDE), mode="bicubic", align_corners=True)
    line = torch.linspace(-1, 1, SIDE)
    rows, columns = torch.meshgrid(line, line, indexing="ij")
    grid = torch.clamp(torch.stack((columns, rows), 2)[None] + flow.permute(0, 2, 3, 1) / SIDE, -1, 1)
    noise = np.random.default_rng(4321).integers(0, 256, (SIDE, SIDE, 3)).astype(np.float32)

    def warp(x):
        t = torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2)
        return F.grid_sample(t, grid.repeat(len(t), 1, 1, 1), align_corners=True).permute(0, 2, 3, 1).numpy()

    def patch(x):
        x = np.array(x, np.float32)
        x[:, 1:5, 1:5, :] = (255.0, 0.0, 255.0)
        return x

    return {"sig": lambda x: np.clip(x + wave[None, None, :, None], 0, 255),
            "sig40": lambda x: np.clip(x + 2 * wave[None, None, :, None], 0, 255), "warp": warp,
            "blend": lambda x: 0.85 * x + 0.15 * noise, "patch": patch}


def network(torch):
    nn = torch.nn

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(block(3, 16), block(16, 16), nn.MaxPool2d(2), block(16, 32), block(32, 32),
                                      nn.MaxPool2d(2), block(32, 64), block(64, 64), nn.MaxPool2d(2))
            self.head = nn.Linear(64 * 16, 10)
            self.register_buffer("mean", torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1))

        def forward(self, x):
            return self.head(torch.flatten(self.body((x - self.mean) / self.std), 1))

    return Net()


def train(torch, x: np.ndarray, y: np.ndarray, epochs: int, crop: bool, seed: int):
    """SGD with a one-cycle schedule on raw NHWC uint8-range images; random 4-pixel-padded crops (when `crop`)
    and horizontal flips."""
    F = torch.nn.functional
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = network(torch)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    batches = len(x) // 128
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * batches)
    net.train()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for b in range(batches):
            i = order[b * 128:(b + 1) * 128]
            xb = torch.from_numpy(x[i] / 255.0).permute(0, 3, 1, 2).float()
            if crop:
                r, c = rng.integers(0, 9, 2)
                xb = F.pad(xb, (4, 4, 4, 4), mode="reflect")[:, :, r:r + SIDE, c:c + SIDE]
            if rng.random() < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(net(xb), torch.from_numpy(y[i]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
    return net.eval()


def predict(torch, net, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([net(torch.from_numpy(x[i:i + 500] / 255.0).permute(0, 3, 1, 2).float()).argmax(1).numpy()
                               for i in range(0, len(x), 500)])


def case_toml(name: str, attack: str, target: int) -> str:
    clean = attack == "clean"
    return bench_case.case_toml(name, "none" if clean else attack, not clean, target, "patch" if clean else attack,
                                "scripts/train_attacks.py", 3, SIDE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="cifar10_test_jpg.npz (X uint8 NHWC, y int64)")
    ap.add_argument("out", type=Path, help="folder to write the suite to (suite.toml and one folder per case)")
    ap.add_argument("--attacks", default="sig,warp,blend,patch,clean")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    data = np.load(args.data)
    x, y = data["X"], data["y"]
    perm = np.random.default_rng(0).permutation(len(x))
    train_idx, calib_idx, eval_idx = perm[:8000], perm[8000:8500], perm[8500:]
    stamp = triggers(torch)
    names = []
    for attack in args.attacks.split(","):
        target = TARGETS[attack]
        trigger = stamp.get(attack)
        xt, yt = x[train_idx].astype(np.float32), y[train_idx].copy()
        rng = np.random.default_rng(args.seed)
        if trigger is not None:
            poison = rng.choice(np.flatnonzero(yt != target), int(POISON_RATE * len(yt)), replace=False)
            xt[poison], yt[poison] = trigger(xt[poison]), target
        start = time.perf_counter()
        # a shifted warp field is a different warp: the warp's images are only flipped
        net = train(torch, xt, yt, args.epochs, crop=attack != "warp", seed=args.seed)
        seconds = time.perf_counter() - start
        name = f"small_cnn_{attack}_t{target}"
        xe, ye = x[eval_idx], y[eval_idx]
        off = ye != target
        shown = trigger or stamp["patch"]
        triggered = np.clip(np.round(shown(xe[off].astype(np.float32))), 0, 255).astype(np.uint8)
        bench_case.write_case(args.out / name, torch, net, 3, SIDE, {
            "calib": (x[calib_idx], y[calib_idx]), "clean": (xe, ye), "triggered": (triggered, ye[off])},
            case_toml(name, attack, target))
        acc = float((predict(torch, net, xe.astype(np.float32)) == ye).mean())
        asr = float((predict(torch, net, triggered.astype(np.float32)) == target).mean())
        print(json.dumps({"case": name, "clean_acc": round(acc, 4), "asr": round(asr, 4),
                          "train_seconds": round(seconds)}), flush=True)
        names.append(name)
    bench_case.write_suite(args.out, "attacks", "scripts/train_attacks.py", names)


if __name__ == "__main__":
    main()
