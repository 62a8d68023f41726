"""Does the default defense's cost grow with the number of classes? (issue 13; a benchmark, not a test)

    python scripts/bench_detect_scaling.py                 # detection: 10 vs 1000 classes, same body
    python scripts/bench_detect_scaling.py --resnet50      # also a whole default run, ResNet-50 at 224x224
    python scripts/bench_detect_scaling.py --resnet50 --no-scaling --time-budget 15   # only that run, 15 min

Models have random weights, made here with torch and exported to ONNX (TorchScript exporter, opset 17);
the calibration set is uniform noise images (seeded). Detection is defense.detect.detect on the fit half, as a
default run does it (at full effort: the 10- and 1000-class models cost the same per image, so a time budget
would cut both alike); the ResNet-50 run is pipeline.sanitize with the default criterion and the default
--time-budget (or --time-budget MIN), its report's "effort" printed with it. Prints one JSON line
per measurement with wall and CPU (user+sys) seconds and the machine; exits 1 when the 1000-class
detection takes more than 3x the 10-class one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sanitizer.defense.effort import DEFAULT_BUDGET  # noqa: E402

RATIO_GOAL = 3.0


def _bn_conv(torch, cin, cout, k=3, stride=1):
    return torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), torch.nn.BatchNorm2d(cout))


def resnet(torch, classes: int, *, bottleneck: bool, width: int, blocks: list[int]):
    """ResNet-18 (basic blocks) or ResNet-50 (bottlenecks) as in He et al. 2016; a 3x3 stem without
    max-pool for 32x32 images (the suite's CIFAR-10 models), the 7x7/2 stem and max-pool for 224x224."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, cin, mid, stride):
            super().__init__()
            cout = mid * 4 if bottleneck else mid
            if bottleneck:
                self.body = nn.Sequential(_bn_conv(torch, cin, mid, 1), nn.ReLU(), _bn_conv(torch, mid, mid, 3, stride),
                                          nn.ReLU(), _bn_conv(torch, mid, cout, 1))
            else:
                self.body = nn.Sequential(_bn_conv(torch, cin, mid, 3, stride), nn.ReLU(), _bn_conv(torch, mid, cout))
            self.short = _bn_conv(torch, cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()
            self.out = cout

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    stem = (nn.Sequential(_bn_conv(torch, 3, width, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)) if bottleneck else
            nn.Sequential(_bn_conv(torch, 3, width), nn.ReLU()))
    layers, cin = [stem], width
    for stage, n in enumerate(blocks):
        for i in range(n):
            block = Block(cin, width * 2 ** stage, 2 if i == 0 and stage > 0 else 1)
            layers.append(block)
            cin = block.out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers).eval()


def export(torch, net, size: int, path: Path) -> None:
    x = torch.rand(2, 3, size, size)
    torch.onnx.export(net, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17)


def noise_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def time_detection(folder: Path, classes: int, size: int, images: int, width: int) -> dict:
    import torch

    from sanitizer.defense.detect import detect
    from sanitizer.pipeline import Options, prepare, split

    torch.manual_seed(0)
    model, calib = folder / f"r18_{classes}.onnx", folder / f"calib_{size}.npz"
    export(torch, resnet(torch, classes, bottleneck=False, width=width, blocks=[2, 2, 2, 2]), size, model)
    if not calib.exists():
        np.savez(calib, X=noise_images(images, size))
    prep = prepare(Options(model=model, calib=calib))
    fit, _ = split(prep.calib.n, 0.5, 0)
    wall, cpu = time.perf_counter(), cpu_seconds()
    found = detect(prep, fit, 0, lambda *a: None)
    return {"measure": "detection", "body": f"ResNet-18, width {width}", "classes": classes, "image": size,
            "fit_images": len(fit),
            "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1),
            "verdict": found["verdict"], "candidates": found["patch_scan"]["candidates"],
            "mask_search": "neural_cleanse" in found}


def time_resnet50(folder: Path, images: int, budget: float | None) -> dict:
    import torch

    from sanitizer.pipeline import Options, sanitize

    torch.manual_seed(0)
    model, calib = folder / "r50.onnx", folder / "calib_224.npz"
    export(torch, resnet(torch, 1000, bottleneck=True, width=64, blocks=[3, 4, 6, 3]), 224, model)
    np.savez(calib, X=noise_images(images, 224))
    wall, cpu = time.perf_counter(), cpu_seconds()
    # random weights give every noise image one class, which the sanity gate rightly refuses
    report = sanitize(Options(model=model, calib=calib, allow_degraded=True, time_budget=budget, sanity_check=False))
    return {"measure": "default run", "model": "ResNet-50, 1000 classes, random weights", "image": 224,
            "images": images, "wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1),
            "timings_seconds": report["timings_seconds"], "verdict": report["detection"]["verdict"],
            "effort": report.get("effort")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=500, help="calibration images (half are the fit images)")
    ap.add_argument("--size", type=int, default=32, help="image side of the detection models")
    ap.add_argument("--width", type=int, default=32, help="base width of the detection models (the suite's: 32)")
    ap.add_argument("--resnet50", action="store_true", help="also a whole default run on ResNet-50 at 224x224")
    ap.add_argument("--no-scaling", action="store_true", help="skip the 10- vs 1000-class detection")
    ap.add_argument("--time-budget", type=float, default=DEFAULT_BUDGET / 60,
                    help="minutes the ResNet-50 run is sized to (0: full effort)")
    args = ap.parse_args()
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start, "
               f"Python {platform.python_version()}")
    print(json.dumps({"machine": machine}), flush=True)
    ratio = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_scaling:
            rows = [time_detection(Path(tmp), c, args.size, args.images, args.width) for c in (10, 1000)]
            for row in rows:
                print(json.dumps(row), flush=True)
            ratio = rows[1]["wall_s"] / rows[0]["wall_s"]
            print(json.dumps({"measure": "detection 1000 / 10 classes", "wall_ratio": round(ratio, 2),
                              "cpu_ratio": round(rows[1]["cpu_s"] / rows[0]["cpu_s"], 2), "goal": RATIO_GOAL}),
                  flush=True)
        if args.resnet50:
            budget = args.time_budget * 60 or None
            print(json.dumps(time_resnet50(Path(tmp), args.images, budget)), flush=True)
    return 0 if ratio <= RATIO_GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
