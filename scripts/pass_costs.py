"""CPU milliseconds per image of each kind of pass the default defense makes, on one model (a benchmark).

    OMP_NUM_THREADS=1 python scripts/pass_costs.py MODEL.onnx [--size 32] [--batch 64]

torch forward + backward to the input (detection, probes, attribution), torch forward, torch forward +
backward to the weights (repair), onnxruntime forward (statistics, count, checks); one thread each, best
of 3 after a warm-up, CPU time of this process, so a shared machine inflates them less than wall time."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def per_image_ms(run, batch: int, reps: int = 3) -> float:
    run()
    best = float("inf")
    for _ in range(reps):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return round(best / batch * 1000, 2)


def main() -> None:
    import onnxruntime as ort
    import torch

    from sanitizer.torch_graph import to_torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = onnx.load(args.model)
    frozen, tuned = to_torch(model, frozen=True), to_torch(model)
    # NHWC pixels permuted to NCHW, as defense.torchnet.make_input feeds the graph
    x = torch.rand(args.batch, args.size, args.size, 3).permute(0, 3, 1, 2)

    def input_grad():
        xi = x.clone().requires_grad_(True)
        frozen(xi)[0][:, 0].sum().backward()

    def forward():
        with torch.no_grad():
            frozen(x)

    def weight_grad():
        tuned(x)[0][:, 0].sum().backward()

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(x.numpy())}
    print({"torch fwd+input bwd": per_image_ms(input_grad, args.batch), "torch fwd": per_image_ms(forward, args.batch),
           "torch fwd+weight bwd": per_image_ms(weight_grad, args.batch),
           "onnxruntime fwd": per_image_ms(lambda: session.run(None, feed), args.batch)})


if __name__ == "__main__":
    main()
