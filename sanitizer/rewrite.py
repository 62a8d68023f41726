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
weight edits (pruning, repair) never touch them. Min and Max broadcast only from opset 8: a model importing an older
default opset is moved to 8 (`_allow_broadcasting_min_max`), which changes no node of an opset-7 model.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import BadModel
from .graph import Site, zero_values

DEFAULT_DOMAINS = ("", "ai.onnx")
# Min and Max take multidirectional broadcasting (the bound [C,1,1] against t [N,C,H,W]) from version 8 (Max-8 and
# Min-8 in onnx's Changelog.md); Min-6/Max-6 need inputs of one shape.
BROADCASTING_MIN_MAX = 8
# The operators of the default domain with a version 8 are Expand and Scan, new at 8 (no opset-7 node is one), and
# these, whose version 8 only widens what the version in force at opset 7 accepts: Min, Max, Sum and Mean gain
# broadcasting (inputs of one shape, all their version 6 takes, give what they gave); MaxPool gains an optional
# Indices output and a storage_order attribute that only Indices reads. So an opset-7 node means at opset 8 what it
# meant at 7.
WIDENED_AT_8 = frozenset({"Min", "Max", "Sum", "Mean", "MaxPool"})


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


def _nodes(nodes):
    """Every node, those of subgraphs (If, Loop, Scan bodies) included: they read the model's opset imports too."""
    for node in nodes:
        yield node
        for a in node.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _nodes(sub.node)


def _since(op: str, opset: int) -> int | None:
    """The version of default-domain `op` in force at `opset` (None: not defined there)."""
    try:
        return onnx.defs.get_schema(op, opset, "").since_version
    except onnx.defs.SchemaError:
        return None


def _allow_broadcasting_min_max(model: onnx.ModelProto) -> None:
    """Raise, in place, the default-domain opset import of `model` to BROADCASTING_MIN_MAX where it is lower, and the
    IR version to one that opset needs. Raises BadModel when a node would mean something else at the new opset (the
    opset-7 step never does, see WIDENED_AT_8; an older opset can: Gemm and Add lost their broadcast attribute at 7)."""
    imports = [o for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    old = imports[0].version if imports else BROADCASTING_MIN_MAX
    if old >= BROADCASTING_MIN_MAX:
        return
    changed = sorted({n.op_type for n in _nodes(model.graph.node) if n.domain in DEFAULT_DOMAINS
                      and _since(n.op_type, old) != _since(n.op_type, BROADCASTING_MIN_MAX)
                      and not (n.op_type in WIDENED_AT_8 and _since(n.op_type, old) == _since(n.op_type, 7))})
    if changed:
        raise BadModel(f"activation bounds need opset {BROADCASTING_MIN_MAX} (Min/Max broadcasting) and the model "
                       f"imports opset {old}, whose {', '.join(changed)} nodes would compute something else at "
                       f"{BROADCASTING_MIN_MAX}; convert the model to opset {BROADCASTING_MIN_MAX} or later")
    imports[0].version = BROADCASTING_MIN_MAX
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for([imports[0]], ignore_unknown=True))


def apply_bounds(model: onnx.ModelProto, sites: dict[str, Site], bounds: dict[str, np.ndarray]
                 ) -> onnx.ModelProto:
    """A copy of `model` where each site's tensor t is replaced, for all its readers, by clip(t, -b, b).

    bounds: site name -> float array [channels], the bound on each unit's |activation| (finite, ≥ 0).
    Graph outputs are never rebound (a site tensor that is also an output keeps its value there). A model below
    opset 8 comes back at opset 8 (`_allow_broadcasting_min_max`).
    Raises ValueError on a bound of the wrong length or a negative / non-finite bound; BadModel when the opset
    cannot be raised without changing a node's meaning."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if bounds:
        _allow_broadcasting_min_max(out)
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
