"""Apply a pruning mask: set weights to zero so each pruned unit outputs exactly zero; the graph is untouched.

Quantized (QDQ) weights are set to their zero point instead, which dequantizes to exactly 0."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

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
