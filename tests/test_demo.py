"""The shipped demo artifacts are present, well formed, and still backdoored as documented.

Deliberately torch-free: tests use the committed files and never retrain (scripts/make_demo.py is a
build step, not a fixture), so they run where only the runtime dependencies are installed."""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from sanitizer.demo import DEMO, DEMO_DIR


def _load(name):
    with np.load(DEMO[name]) as z:
        return z["X"], z["y"]


def _predict(x_nhwc: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(DEMO["model"]), opts, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2).astype(np.float32) * np.float32(DEMO["scale"]))
    return sess.run([DEMO["output_name"]], {DEMO["input_name"]: x})[0].argmax(1)


@pytest.mark.parametrize("name, n", [("calib", 300), ("clean", 497), ("triggered", 442)])
def test_npz_shapes_and_dtypes(name, n):
    x, y = _load(name)
    assert x.dtype == np.uint8 and x.shape == (n, 16, 16, 1)
    assert y.dtype == np.int64 and y.shape == (n,)
    assert set(np.unique(y)) <= set(range(10))


def test_triggered_set_is_stamped_non_target_images():
    x, y = _load("triggered")
    assert (y != DEMO["target"]).all()
    assert (x[:, 13:16, 13:16, :] == 255).all()


def test_model_io():
    sess = ort.InferenceSession(str(DEMO["model"]), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == DEMO["input_name"] and inp.shape[1:] == [1, 16, 16] and not isinstance(inp.shape[0], int)
    assert out.name == DEMO["output_name"] and out.shape[1:] == [10]
    assert inp.type == "tensor(float)"


def test_measured_numbers_match_shipped_model():
    x, y = _load("clean")
    acc = float(np.mean(_predict(x) == y))
    x, _ = _load("triggered")
    asr = float(np.mean(_predict(x) == DEMO["target"]))
    assert acc == pytest.approx(DEMO["clean_acc"], abs=1e-6)
    assert asr == pytest.approx(DEMO["asr"], abs=1e-6)
    assert acc >= 0.9 and asr >= 0.9


def test_demo_folder_is_small():
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir() if p.is_file()) < 1_000_000


def test_no_torch_or_training_needed():
    # Static: this module never imports torch or the training script.
    tree = ast.parse(Path(__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"torch", "scripts", "make_demo"}
    # Dynamic, in a fresh interpreter (other tests in this session may have loaded torch): using the
    # demo package and running the model does not pull torch in.
    code = ("import sys, numpy as np, onnxruntime as ort; from sanitizer.demo import DEMO; "
            "ort.InferenceSession(str(DEMO['model']), providers=['CPUExecutionProvider']); "
            "np.load(DEMO['calib'])['X']; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
