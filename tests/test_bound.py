"""Activation bounds: the rewritten model equals the original with the site tensor clipped, computed apart.

The reference runs the original up to the site tensor, clips it in numpy, and feeds the clipped tensor to a
copy of the graph in which the site tensor is a graph input: nothing of the rewrite's own node surgery."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import models as M
from calib.stats import probe_shapes
from test_sites import tokens_block
from sanitizer.rewrite import apply_bounds
from sanitizer.graph import find_sites


def _sites(model):
    feed = M.random_input(model, 2)
    shapes, ints = probe_shapes(model, feed)
    return {s.name: s for s in find_sites(model, shapes, ints)}


def _run(model, feed):
    """All outputs, onnxruntime CPU without graph optimizations: a fusion the inserted ops break (BiasGelu)
    rounds differently."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)


def _with_output(model, tensor):
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.append(onnx.ValueInfoProto(name=tensor))
    return out


def _cut_at(model, tensor):
    """The graph with `tensor` as an input of its own: its producer's output goes nowhere."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        node.output[:] = [f"{o}__cut" if o == tensor else o for o in node.output]
    out.graph.input.append(helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    return out


def clipped_reference(model, sites, bounds, feed):
    """Outputs of `model` with each bounded site's tensor clipped to [-b, b] per unit, site by site in graph
    order (a later site sees the earlier clip)."""
    order = {o: i for i, n in enumerate(model.graph.node) for o in n.output}
    current, inputs = model, dict(feed)
    for name in sorted(bounds, key=lambda n: order[sites[n].tensor]):
        site = sites[name]
        t = _run(_with_output(current, site.tensor), inputs)[-1]
        b = np.asarray(bounds[name], np.float32).reshape(site.mask_shape)
        inputs[site.tensor] = np.clip(t, -b, b)
        current = _cut_at(current, site.tensor)
    return _run(current, inputs)


@pytest.mark.parametrize("builder", [M.plain, M.with_bn, M.mobilenet, M.resnet, tokens_block])
def test_bounds_equal_the_clipped_reference(builder):
    model = builder()
    sites = _sites(model)
    feed = M.random_input(model, 4)
    rng = np.random.default_rng(0)
    # bounds that cut: around the median magnitude each unit reaches on these inputs
    bounds = {}
    for name, site in sites.items():
        t = _run(_with_output(model, site.tensor), feed)[-1]
        axes = tuple(a for a in range(t.ndim) if a != site.axis)
        bounds[name] = np.median(np.abs(t), axis=axes) * rng.uniform(0.5, 1.5, site.channels)
    got = _run(apply_bounds(model, sites, bounds), feed)
    want = clipped_reference(model, sites, bounds, feed)
    assert np.abs(got[0] - want[0]).max() == 0.0
    # the bounds cut for real: the output moved
    assert np.abs(got[0] - _run(model, feed)[0]).max() > 1e-3


def test_bounds_keep_the_model_valid_and_its_weights():
    model = M.resnet()
    sites = _sites(model)
    bounds = {n: np.ones(s.channels) for n, s in sites.items()}
    out = apply_bounds(model, sites, bounds)
    onnx.checker.check_model(out, full_check=True)
    assert [t.SerializeToString() for t in out.graph.initializer] == [t.SerializeToString() for t in model.graph.initializer]
    assert out.graph.output == model.graph.output
    assert sum(n.op_type in ("Min", "Max") for n in out.graph.node) == 2 * len(sites)
    assert len(out.graph.node) == len(model.graph.node) + 4 * len(sites)


@pytest.mark.parametrize("bad", [lambda c: np.ones(c + 1), lambda c: -np.ones(c), lambda c: np.full(c, np.nan)])
def test_bad_bounds_are_refused(bad):
    model = M.plain()
    sites = _sites(model)
    name = next(iter(sites))
    with pytest.raises(ValueError):
        apply_bounds(model, sites, {name: bad(sites[name].channels)})


def test_torch_path_runs_the_bounds_and_keeps_them_out_of_the_weights():
    # the repair tunes a bounded model in torch: the bounds must act there and must not be tuned
    torch = pytest.importorskip("torch")
    from sanitizer.torch_graph import to_torch

    model = M.resnet()
    sites = _sites(model)
    bounds = {n: np.full(s.channels, 0.5) for n, s in sites.items()}
    bounded = apply_bounds(model, sites, bounds)
    feed = M.random_input(model, 4)
    graph = to_torch(bounded)
    with torch.no_grad():
        got = graph(torch.from_numpy(next(iter(feed.values()))))[0].numpy()
    np.testing.assert_allclose(got, M.run(bounded, feed)[0], rtol=1e-5, atol=1e-5)
    assert len(list(graph.parameters())) == len(model.graph.initializer)
    # each site's Min/Max pair runs as one clamp (half the elementwise passes)
    from sanitizer.torch_graph import _clamp_bounds

    assert sum(fn is _clamp_bounds for fn, *_ in graph._nodes) == len(sites)


def test_a_min_max_pair_that_is_not_a_bound_keeps_its_own_meaning():
    # Max(Min(x, hi), lo) with lo > hi somewhere is lo there, not a clamp (torch.clamp would give hi)
    torch = pytest.importorskip("torch")
    from onnx import TensorProto, helper, numpy_helper

    from sanitizer.torch_graph import _clamp_bounds, to_torch

    hi = np.array([1.0, -1.0], np.float32).reshape(1, 2)
    lo = np.array([-1.0, 0.5], np.float32).reshape(1, 2)
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(hi)),
         helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(lo)),
         helper.make_node("Min", ["x", "hi"], ["m"]), helper.make_node("Max", ["m", "lo"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.array([[3.0, 3.0], [-3.0, -3.0], [0.2, 0.7]], np.float32)
    graph = to_torch(model)
    assert not any(fn is _clamp_bounds for fn, *_ in graph._nodes)
    with torch.no_grad():
        got = graph(torch.from_numpy(x))[0].numpy()
    np.testing.assert_array_equal(got, _run(model, {"x": x})[0])


def test_bounds_take_the_type_of_their_tensor():
    # Min/Max take one type: a float16 model's sites get float16 bounds
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(M.plain(), keep_io_types=False)
    feed = {k: v.astype(np.float16) for k, v in M.random_input(model, 2).items()}
    shapes, ints = probe_shapes(model, feed)
    sites = {s.name: s for s in find_sites(model, shapes, ints)}
    bounds = {n: np.full(s.channels, 0.1) for n, s in sites.items()}
    out = apply_bounds(model, sites, bounds)
    onnx.checker.check_model(out, full_check=True)
    got = _run(out, feed)[0]
    assert got.dtype == np.float16 and np.isfinite(got).all()


@pytest.mark.parametrize("builder", [M.plain, M.with_bn, M.resnet, M.mobilenet])
def test_a_bounded_model_is_read_again_with_its_units_and_pruned_exactly(builder):
    # a sanitized model carries its bounds: sanitizing it again (a second target, a second pass) must find the same
    # units, now on the bounded tensors, and zero them exactly
    from masked import masked_reference
    from sanitizer import rewrite

    def read(model):   # as the job reads a model: one image probes the shapes
        shapes, ints = probe_shapes(model, M.random_input(model, 1))
        return {s.name: s for s in find_sites(model, shapes, ints)}

    model = builder()
    sites = read(model)
    bounded = apply_bounds(model, sites, {n: np.full(s.channels, 0.5) for n, s in sites.items()})
    again = read(bounded)
    assert {n: s.channels for n, s in again.items() if s.prunable} == {n: s.channels for n, s in sites.items()
                                                                       if s.prunable}
    assert all("__bound" in s.tensor for s in again.values() if s.prunable)   # past each bound
    pruned = {n: list(range(0, s.channels, 2)) for n, s in again.items() if s.prunable}
    assert pruned
    feed = M.random_input(model, 4)
    masks = {}
    for n, units in pruned.items():
        mask = np.ones(again[n].channels, np.float32)
        mask[units] = 0
        masks[again[n].tensor] = (mask, again[n].rank, again[n].axis)
    got = _run(rewrite.apply(bounded, again, pruned), feed)[0]
    assert np.abs(got - _run(masked_reference(bounded, masks), feed)[0]).max() == 0.0
    assert np.abs(got - _run(bounded, feed)[0]).max() > 1e-3
