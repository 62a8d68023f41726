"""A shipped backdoored model and its data, so `sanitize demo` and the tests run without downloads.

Built by scripts/make_demo.py (see README.md here). The numbers below were printed by that script for
the shipped model.onnx, measured with onnxruntime; tests/test_demo.py re-measures them on every run,
so a rebuild that changes the artifacts must update them too.
"""
from pathlib import Path

DEMO_DIR = Path(__file__).parent

DEMO = {
    "model": DEMO_DIR / "model.onnx",
    # X: uint8 NHWC (N,16,16,1) raw pixels; y: int64 true digit labels.
    "calib": DEMO_DIR / "calib.npz",
    "clean": DEMO_DIR / "clean.npz",
    # Clean-eval images whose true label is not the target, with the trigger stamped; y keeps the true label.
    "triggered": DEMO_DIR / "triggered.npz",
    "input_name": "input",
    "output_name": "logits",
    "layout": "nchw",
    "size": (16, 16),
    "channels": 1,
    "target": 0,
    # The model takes raw pixels * scale, with no mean/std normalisation.
    "scale": 1 / 255,
    "mean": (0.0,),
    "std": (1.0,),
    "trigger": "BadNets: 3x3 patch of value 255 at rows 13-15, cols 13-15 (bottom-right corner); "
               "10% of non-target training images poisoned and relabelled to class 0",
    "clean_acc": 0.9839034205231388,  # 489 / 497
    "asr": 0.9638009049773756,  # 426 / 442 triggered images classified as the target
}
