"""Unlearning repair: teach the model that the synthesized trigger means nothing.

Fine-tune on unlabeled calibration images, part of each batch stamped with the synthesized trigger,
towards the ORIGINAL model's own prediction on the clean version of each image (no labels needed).
Only float initializer values change, so the ONNX graph stays identical. A held-out share of the images
decides which epoch to keep: top-1 agreement with the original on clean images (label-free accuracy
proxy) and the share of stamped images that still flip to the target.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import require
from .probe import Preprocess, Trigger, _check, make_input

# Lowest held-out agreement with the original that an epoch may have to be kept; 2 points of
# disagreement bound the clean-accuracy loss at about 2 points whatever the dataset.
MIN_AGREEMENT = 0.98


@dataclass
class RepairResult:
    model: onnx.ModelProto
    agreement: float            # held-out top-1 agreement with the original model, kept epoch
    flip_rate: float            # held-out share of stamped images sent to the target, kept epoch
    flip_rate_before: float
    epochs_run: int
    history: list[tuple[float, float]] = field(default_factory=list)  # (agreement, flip_rate) per epoch


@dataclass
class PruneResult:
    model: onnx.ModelProto
    pruned: dict[str, list[int]]   # activation tensor -> channels zeroed (through their producing weights)
    agreement: float
    flip_rate: float
    flip_rate_before: float
    n_units: int                   # prunable units in the model


def _producers(model: onnx.ModelProto) -> dict[str, list[tuple[str, int]]]:
    """Activation tensors whose channel c can be zeroed by zeroing weights, with the (initializer, axis)
    slices to zero. ReLU, ReLU6/Clip(0, ..) and LeakyReLU map 0 to 0, so zeroing the producer's output
    channel zeroes the unit; activations fed by Add of two branches (residual sums) are left out because
    no single slice of weights controls them."""
    inits = {i.name: i for i in model.graph.initializer}
    by_output = {o: n for n in model.graph.node for o in n.output}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type == "Constant"}

    def slices(name: str):
        node = by_output.get(name)
        if node is None:
            return None
        ins = list(node.input)
        if node.op_type == "Conv" and ins[1] in inits:
            return [(ins[1], 0)] + ([(ins[2], 0)] if len(ins) > 2 and ins[2] else [])
        if node.op_type == "Gemm" and ins[1] in inits:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            bias = [(ins[2], 0)] if len(ins) > 2 and ins[2] in inits and len(inits[ins[2]].dims) == 1 else []
            return [(ins[1], 0 if trans_b else 1)] + bias
        if node.op_type == "BatchNormalization":
            # Zero scale and bias: the BN output is then exactly 0 whatever feeds it.
            return [(ins[1], 0), (ins[2], 0)]
        if node.op_type == "Add":
            bias = [n for n in ins if n in inits and len(inits[n].dims) == 1]
            other = [n for n in ins if n not in inits]
            mm = by_output.get(other[0]) if len(bias) == 1 and len(other) == 1 else None
            if mm is not None and mm.op_type == "MatMul" and mm.input[1] in inits \
                    and len(inits[mm.input[1]].dims) == 2:
                return [(mm.input[1], 1), (bias[0], 0)]
        return None

    out = {}
    for node in model.graph.node:
        if node.op_type in ("Relu", "LeakyRelu") or (node.op_type == "Clip" and _clip_min(node, inits, constants) <= 0):
            found = slices(node.input[0])
            if found:
                out[node.output[0]] = found
    return out


def _clip_min(node, inits, constants) -> float:
    from onnx import helper, numpy_helper

    if len(node.input) > 1 and node.input[1]:
        name = node.input[1]
        if name in inits:
            return float(numpy_helper.to_array(inits[name]))
        if name in constants:
            value = next(a for a in constants[name].attribute if a.name == "value")
            return float(numpy_helper.to_array(helper.get_attribute_value(value)))
        return float("inf")  # computed at run time: cannot promise that 0 stays 0
    return next((a.f for a in node.attribute if a.name == "min"), float("-inf"))


def _zero_units(model: onnx.ModelProto, pruned: dict[str, list[int]]) -> onnx.ModelProto:
    from onnx import numpy_helper
    import copy

    out = copy.deepcopy(model)
    producers = _producers(model)
    index = {i.name: k for k, i in enumerate(out.graph.initializer)}
    for tensor, channels in pruned.items():
        for name, axis in producers[tensor]:
            init = out.graph.initializer[index[name]]
            arr = numpy_helper.to_array(init).copy()
            np.moveaxis(arr, axis, 0)[channels] = 0
            init.CopyFrom(numpy_helper.from_array(arr, name))
    return out


def _statistics_inputs(model: onnx.ModelProto) -> set[str]:
    # BatchNormalization running mean/variance are statistics, not weights: training them would silently
    # rescale every channel.
    return {n.input[i] for n in model.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)}


class _Bench:
    """The fit / held-out split and the label-free measurements both repair steps share."""

    def __init__(self, torch, model, x_raw, pp, trigger, seed, holdout):
        from .torch_graph import to_torch

        self.torch, self.pp, self.trigger = torch, pp, trigger
        x_raw = _check(x_raw)
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        order = self.rng.permutation(len(x_raw))
        n_hold = int(round(holdout * len(x_raw)))
        self.hold, self.fit = x_raw[order[:n_hold]], x_raw[order[n_hold:]]
        self.teacher = to_torch(model)
        self.fit_logits = self.predict(self.teacher, self.fit)
        self.hold_ref = self.predict(self.teacher, self.hold).argmax(1)
        self.hold_stamped = trigger.stamp(self.hold[(self.hold_ref != trigger.target).numpy()])

    def predict(self, graph, x, masks=None):
        t = self.torch
        with t.no_grad():
            return t.cat([graph(make_input(t, t.from_numpy(x[i:i + 256]), self.pp), masks=masks)[0]
                          for i in range(0, len(x), 256)])

    def evaluate(self, graph, masks=None) -> tuple[float, float]:
        """(top-1 agreement with the original on held-out clean images, held-out trigger flip rate)."""
        agree = float((self.predict(graph, self.hold, masks).argmax(1) == self.hold_ref).float().mean())
        if not len(self.hold_stamped):
            return agree, 0.0
        flips = self.predict(graph, self.hold_stamped, masks).argmax(1) == self.trigger.target
        return agree, float(flips.float().mean())


def _masks(torch, graph_channels: dict[str, int], pruned: dict[str, list[int]]):
    masks = {}
    for name, channels in pruned.items():
        m = torch.ones(graph_channels[name])
        m[channels] = 0
        masks[name] = m
    return masks


def prune_trigger_units(model: onnx.ModelProto, x_raw: np.ndarray, pp: Preprocess, trigger: Trigger,
                        seed: int = 0, *, holdout: float = 0.4, max_share: float = 0.1,
                        target_flip: float = 0.05, n_score: int = 128) -> PruneResult:
    """Zero the units that the synthesized trigger excites most, fewest first, until it stops flipping.

    Units of every prunable layer (conv channels and dense neurons) are ranked together by the mean
    per-image ℓ∞ activation gap between stamped and clean images, divided by the layer's mean clean ℓ∞
    activation so layers of different scale compare."""
    torch = require("torch", "torch")
    bench = _Bench(torch, model, x_raw, pp, trigger, seed, holdout)
    producers = _producers(model)
    names = list(producers)
    clean = bench.fit[(bench.fit_logits.argmax(1) != trigger.target).numpy()][:n_score]
    graph = bench.teacher
    with torch.no_grad():
        _, cap_clean = graph(make_input(torch, torch.from_numpy(clean), pp), capture=names)
        _, cap_stamp = graph(make_input(torch, torch.from_numpy(trigger.stamp(clean)), pp), capture=names)
    channels, units = {}, []
    for name in names:
        a, b = cap_clean[name], cap_stamp[name]
        a = a.flatten(2).amax(2) if a.dim() > 2 else a
        b = b.flatten(2).amax(2) if b.dim() > 2 else b
        channels[name] = a.shape[1]
        gap = (b - a).mean(0) / (a.mean() + 1e-12)
        units += [(float(g), name, c) for c, g in enumerate(gap)]
    units.sort(key=lambda u: -u[0])
    agree0, flip0 = bench.evaluate(graph)
    chosen: dict[str, list[int]] = {}
    best = (chosen, agree0, flip0)
    # Geometric steps keep the number of evaluations logarithmic in the pruning budget.
    k = 1
    while k <= max_share * len(units):
        trial: dict[str, list[int]] = {}
        for _, name, c in units[:k]:
            trial.setdefault(name, []).append(c)
        agree, flip = bench.evaluate(graph, _masks(torch, channels, trial))
        if agree < MIN_AGREEMENT:
            break
        best = (trial, agree, flip)
        if flip <= target_flip:
            break
        k = max(k + 1, int(k * 1.5))
    chosen, agree, flip = best
    return PruneResult(_zero_units(model, chosen), chosen, agree, flip, flip0, len(units))


def unlearn(model: onnx.ModelProto, x_raw: np.ndarray, pp: Preprocess, trigger: Trigger, seed: int = 0, *,
            holdout: float = 0.4, epochs: int = 8, lr: float = 1e-4, batch: int = 32) -> RepairResult:
    torch = require("torch", "torch")
    from .torch_graph import to_torch

    bench = _Bench(torch, model, x_raw, pp, trigger, seed, holdout)
    student = to_torch(model)
    frozen = _statistics_inputs(model)
    params = [p for name, p in student.initializer_params.items() if name not in frozen]
    for name, p in student.initializer_params.items():
        p.requires_grad_(name not in frozen)
    # Units zeroed by an earlier pruning step stay zero: Adam must not regrow their weights.
    zero_masks = {name: (p == 0) for name, p in student.initializer_params.items() if bool((p == 0).any())}
    opt = torch.optim.Adam(params, lr=lr)
    soft_fit = torch.softmax(bench.fit_logits, 1)
    _, flip_before = bench.evaluate(student)
    best = (flip_before, student.write_back(model), 1.0)
    history = []
    mask = torch.from_numpy(trigger.mask)
    pattern = torch.from_numpy(trigger.pattern)
    fit_t = torch.from_numpy(bench.fit)
    rng = bench.rng
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(bench.fit)))
        for i in range(0, len(bench.fit), batch):
            idx = perm[i:i + batch]
            # Each image twice, clean and stamped, with the same target: the clean copy anchors the
            # target class itself, which otherwise collapses when the backdoor shares its features.
            x = fit_t[idx]
            x = torch.cat([x, (1 - mask) * x + mask * pattern])
            logits, _ = student(make_input(torch, x, bench.pp))
            loss = torch.nn.functional.cross_entropy(logits, soft_fit[idx].repeat(2, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for name, zero in zero_masks.items():
                    student.initializer_params[name][zero] = 0
        agree, flip = bench.evaluate(student)
        history.append((agree, flip))
        if agree >= MIN_AGREEMENT and flip < best[0]:
            best = (flip, student.write_back(model), agree)
    flip, repaired, agree = best
    return RepairResult(repaired, agree, flip, flip_before, len(history), history)
