"""Experiment driver for the label-free defense (issue 3): probe -> (unlearn) on every suite case.

Decisions use only model.onnx and the unlabeled calib.npz images; clean.npz / triggered.npz are read
only to measure clean accuracy and ASR before and after. Prints one table row per case.

    python scripts/research_defense.py [--suite ../shared/bench/suite] [--cases a,b] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sanitizer.probe import Preprocess, probe  # noqa: E402
from sanitizer.repair import unlearn  # noqa: E402


def measure(model: onnx.ModelProto, folder: Path, pp: Preprocess, target: int) -> tuple[float, float]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def predict(X):
        x = (X.astype(np.float32) * np.float32(pp.scale) - np.asarray(pp.mean, np.float32)) \
            / np.asarray(pp.std, np.float32)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2) if pp.layout == "nchw" else x)
        return np.concatenate([sess.run(None, {name: x[i:i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])

    clean, trig = np.load(folder / "clean.npz"), np.load(folder / "triggered.npz")
    return float((predict(clean["X"]) == clean["y"]).mean()), float((predict(trig["X"]) == target).mean())


def run_case(folder: Path, seed: int, repair: bool) -> dict:
    cfg = tomllib.loads((folder / "case.toml").read_text())
    p = cfg["preprocess"]
    pp = Preprocess(p["scale"], tuple(p["mean"]), tuple(p["std"]), p["layout"])
    model = onnx.load(folder / "model.onnx")
    x_raw = np.load(folder / "calib.npz")["X"].astype(np.float32)
    acc0, asr0 = measure(model, folder, pp, cfg["target"])
    t0 = time.perf_counter()
    found = probe(model, x_raw, pp, seed)
    t_probe = time.perf_counter() - t0
    row = dict(case=folder.name, backdoored=cfg["backdoored"], target=cfg["target"], acc0=acc0, asr0=asr0,
               suspected=found.suspected_target, anomaly=float(found.anomaly.max()),
               refined=found.refined_norms, probe_flip=found.flip_rate, t_probe=t_probe)
    model_out = model
    if repair and found.suspected_target is not None:
        fixed = unlearn(model, x_raw, pp, found.trigger, seed)
        model_out = fixed.model
        row.update(agreement=fixed.agreement, synth_flip_after=fixed.flip_rate, history=fixed.history)
    row["t_total"] = time.perf_counter() - t0
    row["acc1"], row["asr1"] = measure(model_out, folder, pp, cfg["target"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared/bench/suite")
    ap.add_argument("--cases", default="")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-repair", action="store_true", help="detection only")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    cases = args.cases.split(",") if args.cases else tomllib.loads((args.suite / "suite.toml").read_text())["cases"]
    rows = []
    print(f"{'case':32} {'bd':>3} {'tgt':>4} {'susp':>5} {'anom':>6} {'acc0':>6} {'asr0':>6} "
          f"{'acc1':>6} {'asr1':>6} {'agree':>6} {'time':>6}")
    for case in cases:
        r = run_case(args.suite / case, args.seed, not args.no_repair)
        rows.append(r)
        print(f"{case:32} {'y' if r['backdoored'] else 'n':>3} {r['target']:>4} {str(r['suspected']):>5} "
              f"{r['anomaly']:6.2f} {r['acc0']:6.3f} {r['asr0']:6.3f} {r['acc1']:6.3f} {r['asr1']:6.3f} "
              f"{r.get('agreement', float('nan')):6.3f} {r['t_total']:6.0f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
