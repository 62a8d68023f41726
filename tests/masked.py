"""The reference a rewrite must equal: the original graph with a 0/1 mask multiplied into the site tensor."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def masked_reference(model: onnx.ModelProto, masks: dict[str, tuple]) -> onnx.ModelProto:
    """masks: tensor -> (0/1 vector over units, tensor rank[, unit axis: 1 unless given])."""
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    for k, (tensor, (mask, rank, *axis)) in enumerate(masks.items()):
        unit_axis = axis[0] if axis else 1
        shaped = mask.astype(np.float32).reshape((1,) * unit_axis + (-1,) + (1,) * (rank - unit_axis - 1))
        masked = f"{tensor}__masked{k}"
        for node in ref.graph.node:
            for i, name in enumerate(node.input):
                if name == tensor:
                    node.input[i] = masked
        for out in ref.graph.output:
            if out.name == tensor:
                raise ValueError("cannot mask a graph output")
        ref.graph.initializer.append(numpy_helper.from_array(shaped, f"{masked}_m"))
        ref.graph.node.append(helper.make_node("Mul", [tensor, f"{masked}_m"], [masked]))
    return topo_sorted(ref)


def topo_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    ready = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    nodes, order = list(model.graph.node), []
    while nodes:
        rest = []
        for n in nodes:
            if all(i in ready for i in n.input):
                order.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(nodes):
            raise ValueError("graph has a cycle")
        nodes = rest
    del model.graph.node[:]
    model.graph.node.extend(order)
    return model
