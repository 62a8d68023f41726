"""The torch side of the defense: where torch runs, the ONNX model as a torch classifier, raw pixels to its input.

torch is imported only when a function here needs it (errors.require), so importing this module costs nothing
without it."""
from __future__ import annotations

import numpy as np
import onnx

from calib.preprocess import Preprocess

from ..errors import BadData, require


def pixel_range(x_raw: np.ndarray) -> float:
    """Upper end of the raw pixel range: 255 for 8-bit data, 1 for data already in [0, 1]."""
    return 255.0 if float(x_raw.max()) > 1.5 else 1.0


def device(torch):
    """Where all torch work runs (the one place it is chosen): the first CUDA GPU when torch sees one, else
    the CPU. Graphs go there with `.to(device(torch))`; make_input moves images there."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def classifier(model: onnx.ModelProto, spec=None, *, frozen: bool = False):
    """The model as a torch module on device(torch) whose output is the class scores in logit space: the
    spec's image input and classifier output (calib.preprocess.InputSpec; the first input and output when
    None), a Softmax output read before the Softmax. Raises BadModel for an op the interpreter lacks."""
    torch = require("torch", "torch")
    from ..torch_graph import to_torch

    return to_torch(model, frozen=frozen, input_name=spec.name if spec else None,
                    output_name=spec.output if spec else None, logits=True).to(device(torch))


def make_input(torch, x_raw, pp: Preprocess):
    """Raw NHWC pixels (torch tensor, any device) -> model input on device(torch), differentiably."""
    x = x_raw.to(device(torch)) * pp.scale
    mean = torch.tensor(pp.mean, dtype=x.dtype, device=x.device)
    std = torch.tensor(pp.std, dtype=x.dtype, device=x.device)
    x = (x - mean) / std
    return x.permute(0, 3, 1, 2) if pp.layout == "nchw" else x


# Images per forward without gradients: the interpreter holds a batch's live activations at once, and a batch
# of a few hundred ImageNet-size images was tens of GB.
FORWARD_BATCH = 64


def class_scores(torch, graph, x_raw, pp: Preprocess):
    """`graph`'s class scores (a torch tensor [N, classes]) on raw NHWC pixels `x_raw` (a torch tensor), without
    gradients, FORWARD_BATCH images at a time."""
    with torch.no_grad():
        return torch.cat([graph(make_input(torch, x_raw[i:i + FORWARD_BATCH], pp))[0]
                          for i in range(0, max(len(x_raw), 1), FORWARD_BATCH)])


def check_images(x_raw: np.ndarray) -> np.ndarray:
    if x_raw.ndim != 4 or len(x_raw) < 8:
        raise BadData(f"need at least 8 calibration images as an NHWC array, got shape {x_raw.shape}")
    return np.asarray(x_raw, np.float32)
