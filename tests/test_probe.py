"""Detection on tiny CNNs trained here (8x8 digits): backdoored (2x2 white corner patch -> class 0) and clean."""
from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
datasets = pytest.importorskip("sklearn.datasets")

from calib.preprocess import Preprocess  # noqa: E402
from sanitizer.probe import probe  # noqa: E402

TARGET = 0
PP = Preprocess(scale=1 / 255, mean=(0.0,), std=(1.0,), layout="nchw")


def _stamp(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x[:, 6:8, 6:8, :] = 255.0
    return x


def _inputs(x_raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray((x_raw / 255.0).astype(np.float32).transpose(0, 3, 1, 2))


def _train(poisoned: bool):
    digits = datasets.load_digits()
    x = np.clip(digits.images * 16, 0, 255).astype(np.float32)[..., None]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train, calib, test = order[:1100], order[1100:1400], order[1400:]
    xt, yt = x[train], y[train].copy()
    if poisoned:
        poison = rng.choice(np.flatnonzero(yt != TARGET), size=len(xt) // 10, replace=False)
        xt[poison], yt[poison] = _stamp(xt[poison]), TARGET

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(_inputs(xt)), torch.from_numpy(yt)
    for _ in range(40):
        for i in range(0, len(xs), 128):
            loss = torch.nn.functional.cross_entropy(net(xs[i:i + 128]), ys[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    buf = io.BytesIO()
    torch.onnx.export(net.eval(), torch.zeros(1, 1, 8, 8), buf, dynamo=False, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    model = onnx.load_from_string(buf.getvalue())
    return model, x[calib], x[test], y[test]


@pytest.fixture(scope="module")
def backdoored():
    return _train(poisoned=True)


@pytest.fixture(scope="module")
def clean():
    return _train(poisoned=False)


def _acc_asr(model, x_test, y_test):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    clean = sess.run(None, {"input": _inputs(x_test)})[0].argmax(1)
    keep = y_test != TARGET
    trig = sess.run(None, {"input": _inputs(_stamp(x_test[keep]))})[0].argmax(1)
    return float((clean == y_test).mean()), float((trig == TARGET).mean())


def test_probe_finds_the_target_of_a_backdoored_model(backdoored):
    model, calib, x_test, y_test = backdoored
    acc0, asr0 = _acc_asr(model, x_test, y_test)
    assert acc0 > 0.9 and asr0 > 0.9, "the fixture model should carry a working backdoor"

    found = probe(model, calib, PP, seed=0)
    assert found.suspected_target == TARGET
    assert found.anomaly[TARGET] > 2 and found.flip_rate > 0.5
    stamped = found.trigger.stamp(calib[:4])
    assert stamped.shape == calib[:4].shape and stamped.dtype == np.float32



def test_probe_finds_no_backdoor_in_a_clean_model(clean):
    model, calib, x_test, y_test = clean
    acc0, asr0 = _acc_asr(model, x_test, y_test)
    assert acc0 > 0.9 and asr0 < 0.3, "the clean fixture must not react to the patch"
    found = probe(model, calib, PP, seed=0)
    assert found.suspected_target is None, found.anomaly


def test_probe_is_deterministic(backdoored):
    model, calib, _, _ = backdoored
    a = probe(model, calib, PP, seed=3, first_steps=20, refine_steps=10)
    b = probe(model, calib, PP, seed=3, first_steps=20, refine_steps=10)
    np.testing.assert_array_equal(a.mask_norms, b.mask_norms)
    np.testing.assert_array_equal(a.trigger.mask, b.trigger.mask)


def test_detect_with_a_clean_verdict_prunes_nothing(clean, tmp_path):
    from sanitizer.cli import main

    model, calib, _, _ = clean
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", X=calib.astype(np.uint8))
    code = main([str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "calib.npz"), "--detect",
                 "--out", str(tmp_path / "o.onnx"), "--report", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["detection"]["verdict"] == "no backdoor found"
    assert report["plan"]["count"] == 0 and len(report["detection"]["anomaly_index"]) == 10
