"""Writing a model trained by a script as a bench suite (../shared/bench/README.md, "suite/ format"): shared by
scripts/train_attacks.py and scripts/train_digits_attacks.py (development tools, not the product)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def case_toml(name: str, attack: str, backdoored: bool, target: int, trigger: str, script: str, channels: int,
              side: int) -> str:
    """case.toml of a 10-class model with a [N, channels, side, side] input "input" read as x/255 and a "logits"
    output; `attack` "none" for a clean model."""
    zeros, ones = ", ".join(["0.0"] * channels), ", ".join(["1.0"] * channels)
    return (f'name = "{name}"\nattack = "{attack}"\nbackdoored = {"true" if backdoored else "false"}\n'
            f'target = {target}\ntrigger = "{trigger}"\ntrigger_desc = "see {script}"\nnum_classes = 10\n'
            f'input_name = "input"\ninput_shape = ["N", {channels}, {side}, {side}]\noutput_name = "logits"\n'
            f'output_kind = "logits"\npreprocess = {{ scale = 0.00392156862745098, mean = [{zeros}], '
            f'std = [{ones}], layout = "nchw" }}\n')


def write_case(folder: Path, torch, net, channels: int, side: int, splits: dict[str, tuple[np.ndarray, np.ndarray]],
               toml: str) -> None:
    """`net` exported to folder/model.onnx (TorchScript exporter, opset 17, dynamic batch), each of `splits`
    ("calib", "clean", "triggered": (X, y)) as folder/NAME.npz and `toml` as folder/case.toml."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, torch.zeros(1, channels, side, side), str(folder / "model.onnx"), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17, dynamo=False)
    for split, (x, y) in splits.items():
        np.savez(folder / f"{split}.npz", X=x, y=y)
    (folder / "case.toml").write_text(toml)


def write_suite(out: Path, name: str, script: str, cases: list[str]) -> None:
    """out/suite.toml listing `cases`."""
    listed = ", ".join(f'"{c}"' for c in cases)
    (out / "suite.toml").write_text(f'name = "{name}"\ndescription = "{script}"\ncases = [{listed}]\n')
