"""Every graph rewrite: the two ways the defense changes a model, each an exact edit of the ONNX graph.

Pruning (`apply`): set weights to zero so each pruned unit outputs exactly zero; the graph is untouched.
Quantized (QDQ) weights are set to their zero point instead, which dequantizes to exactly 0.

Activation bounding (`apply_bounds`): cap every unit's activation at what clean images drive it to.
A trigger drives some units' ℓ∞ (the max over the unit's map) far beyond anything clean images do (Cheng et
al., "Defending against Backdoor Attack on Deep Neural Networks"); bounding each unit at its clean ℓ∞ takes
that headroom away whatever the trigger's shape, the idea of activation clipping (Wang, Xiang, Miller,
Kesidis, "Improved Activation Clipping for Universal Backdoor Mitigation and Test-Time Detection", MLSP 2024,
where the bounds are learned from a small clean set).

The bound rewrite inserts `Max(Min(t, b), -b)` with a per-unit constant `b` shaped to broadcast along the site's
unit axis (`Site.mask_shape`), and rewires every reader of the site tensor to the bounded one: two
element-wise nodes per site, which TensorRT fuses into the producer's epilogue. The bounds are `Constant` nodes, not initializers, so that
weight edits (pruning, repair) never touch them.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import Site, zero_values


def zero_plan(sites: dict[str, Site], pruned: dict[str, list[int]]) -> dict[str, list[tuple]]:
    """Initializer name -> list of (axis, index, rows) to zero, from {site name: channels}."""
    edits: dict[str, list[tuple]] = {}
    for name, channels in pruned.items():
        site = sites[name]
        if not channels:
            continue
        ch = np.asarray(sorted(channels), dtype=np.int64)
        if site.strategy == "producer":
            for init, axis in site.zero:
                edits.setdefault(init, []).append((axis, ch, None))
        elif site.strategy == "consumers":
            for sl in site.slices:
                for c in ch:
                    rows = sl.rows[int(c)] if sl.rows is not None else None
                    edits.setdefault(sl.initializer, []).append((sl.axis, sl.index[int(c)], rows))
        else:
            raise ValueError(f"site {name} is blocked: {site.why_blocked}")
    return edits


def apply(model: onnx.ModelProto, sites: dict[str, Site], pruned: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of `model` with the pruned units zeroed (quantized weights: set to their zero point). Untouched
    initializers keep their bytes."""
    edits = zero_plan(sites, pruned)
    zeros = zero_values(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        if init.name not in edits:
            continue
        w = numpy_helper.to_array(init).copy()
        zero = np.broadcast_to(zeros.get(init.name, np.zeros((), w.dtype)).astype(w.dtype), w.shape)
        for axis, index, rows in edits[init.name]:
            if rows is not None:  # grouped conv: only the output block that reads this input channel
                w[np.ix_(rows, index)] = zero[np.ix_(rows, index)]
            else:
                sl = [slice(None)] * w.ndim
                sl[axis] = index
                w[tuple(sl)] = zero[tuple(sl)]
        out.graph.initializer[i].CopyFrom(numpy_helper.from_array(w, init.name))
    return out


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type (TensorProto enum) of every tensor shape inference can type. A bound must match its
    tensor's type (Min/Max take one type): float16 models have float16 sites."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except ValueError:  # over protobuf's 2 GiB: the image input's type stands for the graph's
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.value_info, *g.input, *g.output)}
    fallback = g.input[0].type.tensor_type.elem_type if g.input else onnx.TensorProto.FLOAT
    return {k: v or fallback for k, v in types.items()} | {"": fallback}


def apply_bounds(model: onnx.ModelProto, sites: dict[str, Site], bounds: dict[str, np.ndarray]
                 ) -> onnx.ModelProto:
    """A copy of `model` where each site's tensor t is replaced, for all its readers, by clip(t, -b, b).

    bounds: site name -> float array [channels], the bound on each unit's |activation| (finite, ≥ 0).
    Graph outputs are never rebound (a site tensor that is also an output keeps its value there).
    Raises ValueError on a bound of the wrong length or a negative / non-finite bound."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    elem = tensor_types(model)
    inserted: dict[str, list[onnx.NodeProto]] = {}     # site tensor -> the nodes that bound it
    renamed: dict[str, str] = {}
    for k, (name, b) in enumerate(sorted(bounds.items())):
        site = sites[name]
        b = np.asarray(b, np.float64)
        if b.shape != (site.channels,) or not np.isfinite(b).all() or (b < 0).any():
            raise ValueError(f"bound for {name}: need {site.channels} finite values ≥ 0")
        dtype = helper.tensor_dtype_to_np_dtype(elem.get(site.tensor, elem[""]))
        hi = b.astype(dtype).reshape(site.mask_shape)
        stem = f"{site.tensor}__bound{k}"
        inserted[site.tensor] = [
            helper.make_node("Constant", [], [f"{stem}_hi"], value=numpy_helper.from_array(hi, f"{stem}_hi")),
            helper.make_node("Constant", [], [f"{stem}_lo"], value=numpy_helper.from_array(-hi, f"{stem}_lo")),
            helper.make_node("Min", [site.tensor, f"{stem}_hi"], [f"{stem}_min"], name=f"{stem}_min"),
            helper.make_node("Max", [f"{stem}_min", f"{stem}_lo"], [stem], name=stem),
        ]
        renamed[site.tensor] = stem
    for node in g.node:
        node.input[:] = [renamed.get(i, i) for i in node.input]
    # each bound goes right after its site's producer so the node list stays topologically sorted
    free = {i.name for i in g.input} | {t.name for t in g.initializer}
    order = [n for t in inserted if t in free for n in inserted[t]]
    for node in g.node:
        order.append(node)
        for o in node.output:
            order.extend(inserted.get(o, []))
    del g.node[:]
    g.node.extend(order)
    return out
