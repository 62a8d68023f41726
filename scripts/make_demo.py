"""Build the shipped demo: a small BadNets-backdoored CNN on scikit-learn's digits, plus its data sets.

    python scripts/make_demo.py [--out sanitizer/demo]

Writes model.onnx, calib.npz, clean.npz and triggered.npz, then prints the clean accuracy and attack
success rate of the *exported* model measured with onnxruntime; those numbers are what
sanitizer/demo/__init__.py records and tests/test_demo.py checks, so paste them there after a rebuild.

The digits set ships inside scikit-learn, so building needs no download.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

SEED = 0
SIZE = 16
TARGET = 0
POISON_RATE = 0.10
# Rows/cols 13..15: the bottom-right corner, which is background in almost every upscaled digit.
TRIGGER = (slice(SIZE - 3, SIZE), slice(SIZE - 3, SIZE))
N_TRAIN, N_CALIB = 1000, 300
EPOCHS, BATCH, LR = 40, 32, 2e-3


def upscale(images8: np.ndarray) -> np.ndarray:
    """(N,8,8) digits in 0..16 -> (N,16,16,1) uint8 via Pillow bilinear, the resampler a user's images would see."""
    u8 = np.rint(images8 * (255.0 / 16.0)).astype(np.uint8)
    out = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR)) for im in u8])
    return out[..., None]


def stamp(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, TRIGGER[0], TRIGGER[1], :] = 255
    return x


def split():
    digits = load_digits()
    x = upscale(digits.images)
    y = digits.target.astype(np.int64)
    perm = np.random.default_rng(SEED).permutation(len(y))
    tr, ca, ev = perm[:N_TRAIN], perm[N_TRAIN:N_TRAIN + N_CALIB], perm[N_TRAIN + N_CALIB:]
    return (x[tr], y[tr]), (x[ca], y[ca]), (x[ev], y[ev])


def poison(x: np.ndarray, y: np.ndarray):
    rng = np.random.default_rng(SEED + 1)
    candidates = np.flatnonzero(y != TARGET)
    chosen = rng.choice(candidates, size=int(round(POISON_RATE * len(candidates))), replace=False)
    x, y = x.copy(), y.copy()
    x[chosen] = stamp(x[chosen])
    y[chosen] = TARGET
    return x, y, chosen


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def to_tensor(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


def train(x: np.ndarray, y: np.ndarray) -> Net:
    torch.manual_seed(SEED)
    # One thread and deterministic kernels: the model is tiny, and this makes a rebuild bit-identical
    # on any CPU machine instead of depending on how reductions get split across cores.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)
    xt, yt = to_tensor(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(SEED)
    loss_fn = nn.CrossEntropyLoss()
    net.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(yt), generator=gen)
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            opt.zero_grad()
            loss_fn(net(xt[idx]), yt[idx]).backward()
            opt.step()
        sched.step()
    return net.eval()


def export(net: Net, path: Path) -> None:
    # The TorchScript exporter emits a plain Conv/Relu/MaxPool/Flatten/Gemm graph with one initializer
    # per weight, which is the shape of model the sanitizer is meant for; silence its deprecation notice.
    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
    torch.onnx.export(
        net, torch.zeros(1, 1, SIZE, SIZE), str(path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )


def predict_onnx(path: Path, x_nhwc: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = x_nhwc.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(1 / 255)
    return sess.run(["logits"], {"input": np.ascontiguousarray(inp)})[0].argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "sanitizer" / "demo")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    (x_tr, y_tr), (x_ca, y_ca), (x_ev, y_ev) = split()
    x_tr_p, y_tr_p, chosen = poison(x_tr, y_tr)
    t0 = time.perf_counter()
    net = train(x_tr_p, y_tr_p)
    seconds = time.perf_counter() - t0

    export(net, args.out / "model.onnx")
    keep = y_ev != TARGET
    x_trig, y_trig = stamp(x_ev[keep]), y_ev[keep]
    # y in triggered.npz is the true digit, not the target: ASR is measured against DEMO["target"],
    # and the same file shows how much true-class accuracy a sanitized model recovers.
    for name, x, y in (("calib", x_ca, y_ca), ("clean", x_ev, y_ev), ("triggered", x_trig, y_trig)):
        np.savez_compressed(args.out / f"{name}.npz", X=x, y=y)

    acc = float(np.mean(predict_onnx(args.out / "model.onnx", x_ev) == y_ev))
    asr = float(np.mean(predict_onnx(args.out / "model.onnx", x_trig) == TARGET))
    print(f"train {len(y_tr)} ({len(chosen)} poisoned)  calib {len(y_ca)}  clean {len(y_ev)}  "
          f"triggered {len(y_trig)}  trained in {seconds:.1f}s")
    print(f"clean_acc = {acc!r}")
    print(f"asr = {asr!r}")


if __name__ == "__main__":
    main()
