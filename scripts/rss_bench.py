"""Peak memory of a real `sanitize` run against the number of calibration images (issue 5: bounded memory).

    nice -n 10 python scripts/rss_bench.py [--sizes 1000,20000] [--formats npz,png] [--keep DIR]

Builds synthetic calibration sets (scikit-learn digits upscaled to 16x16 like the shipped demo, with
pixel noise so no two images are equal), sanitizes the demo model with each one in a fresh subprocess
and prints that process's peak RSS. Runs `--criterion linf`, the clean-data path whose memory issue 5
bounds: the default probe criterion needs torch and holds its (small) calibration set in memory.

The peak is the child's own VmHWM, read from /proc/self/status at interpreter exit. Not ru_maxrss:
Linux carries a process's peak RSS across fork+exec into the child's ru_maxrss, so every run would
report at least this script's own peak (building 20k images), and RUSAGE_CHILDREN is a maximum over all runs.
Exits 1 when a run fails or a peak exceeds the smallest set's by more than 10 % (issue 5's bound).
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sanitizer" / "demo" / "model.onnx"
SIZE = 16


def make_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n,16,16,1) uint8 digits and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    base = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    base = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BILINEAR)) for im in base])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(base), n)
    noise = rng.normal(0, 8, (n, SIZE, SIZE))
    x = np.clip(base[pick].astype(np.float64) + noise, 0, 255).astype(np.uint8)
    return x[..., None], digits.target[pick].astype(np.int64)


def write_set(x: np.ndarray, y: np.ndarray, fmt: str, folder: Path) -> Path:
    if fmt == "npz":
        path = folder / f"calib_{len(x)}.npz"
        np.savez(path, X=x, y=y)
        return path
    path = folder / f"calib_{len(x)}_png"
    path.mkdir()
    width = len(str(len(x)))
    for i, im in enumerate(x):
        Image.fromarray(im[..., 0]).save(path / f"{i:0{width}d}.png")
    return path


# The child runs `python -m sanitizer ARGS` itself and writes its own VmHWM at exit (also after sys.exit).
_RUN_AND_REPORT = """
import atexit, runpy, sys
report = sys.argv.pop(1)
def _hwm():
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(report, "w") as f:
        f.write(str(kib * 1024))
atexit.register(_hwm)
sys.argv[0] = "sanitize"
runpy.run_module("sanitizer", run_name="__main__", alter_sys=True)
"""


def peak_rss(args: list[str], report: Path) -> tuple[int, float, int, str]:
    """(peak RSS in bytes, wall seconds, exit code, stderr tail) of `sanitize ARGS` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUN_AND_REPORT, str(report), *args], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return int(report.read_text()), time.perf_counter() - start, proc.returncode, proc.stderr.strip()[-300:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,20000")
    ap.add_argument("--formats", default="npz,png")
    ap.add_argument("--keep", type=Path, help="build the data sets here and leave them (default: a temp dir)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    formats = [f.strip() for f in args.formats.split(",")]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, {platform.platform()}, "
          f"Python {platform.python_version()}, onnxruntime {metadata.version('onnxruntime')}")
    with tempfile.TemporaryDirectory(prefix="rss_bench.") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for fmt in formats:
            for n in sizes:
                x, y = make_images(n)
                data = write_set(x, y, fmt, work)
                del x, y
                out = work / f"out_{fmt}_{n}.onnx"
                cmd = [str(MODEL), "--calib", str(data), "--criterion", "linf", "--out", str(out), "--force"]
                rss, secs, code, err = peak_rss(cmd, work / "hwm.txt")
                shown = shlex.join(["sanitize", "sanitizer/demo/model.onnx", "--calib", data.name, "--criterion", "linf",
                                    "--out", out.name, "--force"])
                print(f"  ran: {shown}  (exit {code}, {secs:.1f} s)", flush=True)
                if code != 0:
                    print(f"  stderr: {err}", file=sys.stderr)
                rows.append((fmt, n, rss, secs, code))

    print()
    print("| format | images | peak RSS (MiB) | vs smallest | wall (s) | exit |")
    print("|---|---|---|---|---|---|")
    ok = True
    for fmt in formats:
        mine = [r for r in rows if r[0] == fmt]
        first = mine[0][2]
        for _, n, rss, secs, code in mine:
            growth = rss / first - 1
            ok &= code == 0 and growth <= 0.10
            print(f"| {fmt} | {n} | {rss / 2**20:.1f} | {growth:+.1%} | {secs:.1f} | {code} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
