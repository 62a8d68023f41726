"""Sites and the exact rewrite on every export pattern: the rewritten model must equal the original with a 0/1
mask multiplied into each site tensor (tests/masked.py), run through onnxruntime on random inputs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import models as M
from calib.stats import probe_shapes
from masked import masked_reference, topo_sorted
from sanitizer import rewrite
from sanitizer.errors import BadModel
from sanitizer.graph import find_sites
from sanitizer.model_io import constants_to_initializers, load_model

P, C, B = "producer", "consumers", "blocked"

# builder, expected {site: strategy}. Exactly these sites: the class layer writing the logits is never one.
CASES = {
    "plain13": (lambda: M.plain(opset=13), {"conv1": P, "conv2": P}),
    "plain17": (lambda: M.plain(opset=17), {"conv1": P, "conv2": P}),
    "plain_fixed1": (lambda: M.plain(batch=1), {"conv1": P, "conv2": P}),
    "bn13": (lambda: M.with_bn(opset=13), {"conv1": C, "conv2": C}),
    "bn17": (lambda: M.with_bn(opset=17), {"conv1": C, "conv2": C}),
    "bn_fixed1": (lambda: M.with_bn(batch=1), {"conv1": C, "conv2": C}),
    "bn_fixed2": (lambda: M.with_bn(batch=2), {"conv1": C, "conv2": C}),
    "mobilenet": (M.mobilenet, {"stem": P, "expand": C, "dw": P, "project": P, "add1": C, "head": P}),
    "mobilenet17": (lambda: M.mobilenet(opset=17), {"stem": P, "expand": C, "dw": P, "project": P, "add1": C,
                                                    "head": P}),
    "resnet": (M.resnet, {"stem": P, "b0_conv1": P, "b0_conv2": P, "b0_add": C, "down_conv1": P, "down_conv2": P,
                          "down_short": P, "down_add": C}),
    # b0_add also feeds b1_add: no weight slice can zero it there, so that join is blocked
    "resnet2": (lambda: M.resnet(identity_blocks=2),
                {"stem": P, "b0_conv1": P, "b0_conv2": P, "b0_add": B, "b1_conv1": P, "b1_conv2": P, "b1_add": C,
                 "down_conv1": P, "down_conv2": P, "down_short": P, "down_add": C}),
    "tf2onnx": (M.tf2onnx, {"conv2d": P, "dense/MatMul": P}),
    "tf2onnx_fixed1": (lambda: M.tf2onnx(batch=1), {"conv2d": P, "dense/MatMul": P}),
    # the run-time flatten reads the feature map's Shape: no values, so the site is still traced to the MatMul
    "tf2onnx_bn": (lambda: M.tf2onnx(bn=True), {"conv2d": C, "dense/MatMul": P}),
    "tf2onnx_bn_fixed2": (lambda: M.tf2onnx(batch=2, bn=True), {"conv2d": C, "dense/MatMul": P}),
    "flat_head": (M.flat_head, {"conv1": P, "conv2": P}),
    "flat_head_bn": (lambda: M.flat_head(bn=True), {"conv1": P, "conv2": C}),
    "dense": (M.dense, {"conv1": P, "fc1": P, "fc2": P}),
    "dense_bn": (lambda: M.dense(bn=True), {"conv1": P, "fc1": C, "fc2": C}),
    "dynamo": (M.dynamo, {"conv1": P, "conv2": C}),
    "dynamo_fixed1": (lambda: M.dynamo(batch=1), {"conv1": P, "conv2": C}),
    "blocked": (M.blocked, {"conv_a": B, "conv_b": B, "conv_c": P}),
    "shared_weight": (M.shared_weight, {"conv0": P, "conv1": B, "conv3": P}),
    # each conv weight read through an Identity, as some exporters alias it
    "identity_weights": (lambda: _through_identity(M.plain()), {"conv1": P, "conv2": P}),
    # conv1's weight computed at run time (weight_norm without constant folding): named, blocked
    "computed_weight": (lambda: _computed_weight(M.plain(), "conv1"), {"conv1": B, "conv2": P}),
    # weights and biases held in Constant nodes, as some exporters write them: what load_model makes of them
    "constant_nodes": (lambda: _loaded(_as_constant_nodes(M.resnet())),
                       {"stem": P, "b0_conv1": P, "b0_conv2": P, "b0_add": C, "down_conv1": P, "down_conv2": P,
                        "down_short": P, "down_add": C}),
}


def _through_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every Conv's weight read through an Identity node."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in list(out.graph.node):
        if node.op_type == "Conv":
            out.graph.node.append(helper.make_node("Identity", [node.input[1]], [node.input[1] + "_alias"]))
            node.input[1] += "_alias"
    return topo_sorted(out)


def _computed_weight(model: onnx.ModelProto, conv: str) -> onnx.ModelProto:
    """The model with `conv`'s weight computed as weight × 1 at run time."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.name == conv)
    out.graph.initializer.append(numpy_helper.from_array(np.ones((), np.float32), "one"))
    out.graph.node.append(helper.make_node("Mul", [node.input[1], "one"], [node.input[1] + "_computed"]))
    node.input[1] += "_computed"
    return topo_sorted(out)


def _as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every initializer moved into a Constant node of the same name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.node.extend(helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer)
    del out.graph.initializer[:]
    return topo_sorted(out)


def _loaded(model: onnx.ModelProto) -> onnx.ModelProto:
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    constants_to_initializers(converted)
    return converted


def analyse(model: onnx.ModelProto):
    """What the pipeline does: probe shapes on one image (or one fixed batch), then find the sites."""
    shapes, ints = probe_shapes(model, M.random_input(model, batch=1, seed=99))
    return shapes, {s.name: s for s in find_sites(model, shapes, ints)}


def masks_for(sites, shapes, pruned):
    masks: dict[str, tuple[np.ndarray, int, int]] = {}
    for name, channels in pruned.items():
        site = sites[name]
        mask = masks.get(site.tensor, (np.ones(site.channels),))[0].copy()
        mask[channels] = 0
        masks[site.tensor] = (mask, len(shapes[site.tensor]), site.axis)
    return masks


def assert_exact(model, sites, shapes, pruned, *, seed=0, must_change=True) -> bool:
    """Rewrite == masked reference on random inputs (batch 3, or the fixed batch), and the pruning mattered."""
    feed = M.random_input(model, batch=3, seed=seed)
    got = M.run(rewrite.apply(model, sites, pruned), feed)[0]
    want = M.run(masked_reference(model, masks_for(sites, shapes, pruned)), feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    changed = bool(np.abs(got - M.run(model, feed)[0]).max() > 1e-4)
    assert changed or not must_change, "pruning changed nothing: the comparison proves nothing"
    return changed


def random_subset(rng, n: int) -> list[int]:
    """A non-empty random subset of n channels, sometimes all of them."""
    k = int(rng.integers(1, n + 1))
    return sorted(int(c) for c in rng.choice(n, size=k, replace=False))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    build, expected = CASES[request.param]
    model = build()
    shapes, sites = analyse(model)
    return request.param, model, shapes, sites, expected


def test_sites_and_strategies(case):
    name, model, shapes, sites, expected = case
    assert {n: s.strategy for n, s in sites.items()} == expected
    for site in sites.values():
        assert shapes[site.tensor][site.axis] == site.channels
        assert site.rank == len(shapes[site.tensor])
        # these are all NCHW conv nets with [N, D] heads: units on axis 1 (token sites: tests/test_sites.py)
        assert site.axis == 1
        assert bool(site.why_blocked) == (site.strategy == B)


def test_all_sites_at_once_equal_the_masked_reference(case):
    name, model, shapes, sites, _ = case
    rng = np.random.default_rng(1)
    prunable = [s for s in sites.values() if s.prunable]
    for trial in range(3):
        pruned = {s.name: random_subset(rng, s.channels) for s in prunable}
        assert_exact(model, sites, shapes, pruned, seed=trial)


def test_each_site_alone_equals_the_masked_reference(case):
    name, model, shapes, sites, _ = case
    rng = np.random.default_rng(2)
    for site in sites.values():
        if site.prunable:
            assert_exact(model, sites, shapes, {site.name: random_subset(rng, site.channels)})


def test_single_channels_equal_the_masked_reference():
    # one channel at a time catches an index slice that is off by a position (Flatten / Transpose heads)
    outcomes = []
    for build in (lambda: M.flat_head(bn=True), M.tf2onnx, lambda: M.dense(bn=True), M.mobilenet):
        model = build()
        shapes, sites = analyse(model)
        for site in sites.values():
            if site.prunable:
                for c in (0, site.channels - 1):
                    # a single unit may be dead (ReLU) on these inputs; most must not be
                    outcomes.append(assert_exact(model, sites, shapes, {site.name: [c]}, must_change=False))
    assert sum(outcomes) >= 0.75 * len(outcomes)


def test_rewrite_keeps_the_graph_and_leaves_the_original_alone(case):
    name, model, shapes, sites, _ = case
    before = model.SerializeToString()
    rng = np.random.default_rng(3)
    pruned = {s.name: random_subset(rng, s.channels) for s in sites.values() if s.prunable}
    out = rewrite.apply(model, sites, pruned)

    assert model.SerializeToString() == before
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in model.graph.node]
    assert [(t.name, list(t.dims), t.data_type) for t in out.graph.initializer] == \
           [(t.name, list(t.dims), t.data_type) for t in model.graph.initializer]
    assert out.graph.input == model.graph.input and out.graph.output == model.graph.output
    assert out.opset_import == model.opset_import
    # only zeros were written: every changed weight became exactly 0
    for a, b in zip(model.graph.initializer, out.graph.initializer):
        wa, wb = numpy_helper.to_array(a), numpy_helper.to_array(b)
        changed = wa != wb
        assert np.all(wb[changed] == 0)
    assert any(not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(model.graph.initializer, out.graph.initializer))
    onnx.checker.check_model(out, full_check=True)


def test_untouched_initializers_keep_their_bytes():
    model = M.resnet()
    shapes, sites = analyse(model)
    out = rewrite.apply(model, sites, {"down_conv1": [0, 3]})
    changed = {a.name for a, b in zip(model.graph.initializer, out.graph.initializer)
               if a.SerializeToString() != b.SerializeToString()}
    assert changed == {"down_conv1.weight", "down_conv1.bias"}


def test_consumers_rewrite_zeroes_only_the_read_slice():
    model = M.with_bn()
    shapes, sites = analyse(model)
    out = rewrite.apply(model, sites, {"conv1": [2]})
    w = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    w0 = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.all(w["conv2.weight"][:, 2] == 0)
    np.testing.assert_array_equal(np.delete(w["conv2.weight"], 2, axis=1), np.delete(w0["conv2.weight"], 2, axis=1))
    # the producer and its BN stay as they were: the BN shift is why the producer could not be zeroed
    for name in ("conv1.weight", "bn1.bias", "bn1.weight"):
        np.testing.assert_array_equal(w[name], w0[name])


def test_depthwise_consumer_zeroes_one_filter_per_channel():
    model = M.mobilenet()
    shapes, sites = analyse(model)
    out = rewrite.apply(model, sites, {"expand": [5]})
    dw = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "dw.weight"))
    dw0 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "dw.weight"))
    assert np.all(dw[5] == 0)
    np.testing.assert_array_equal(np.delete(dw, 5, axis=0), np.delete(dw0, 5, axis=0))


def test_blocked_sites_are_refused():
    model = M.blocked()
    shapes, sites = analyse(model)
    assert "Sigmoid" in sites["conv_a"].why_blocked
    assert "Concat" in sites["conv_b"].why_blocked
    for name in ("conv_a", "conv_b"):
        assert not sites[name].prunable
        with pytest.raises(ValueError, match="blocked"):
            rewrite.apply(model, sites, {name: [0]})
    assert_exact(model, sites, shapes, {"conv_c": [1, 4]})


def test_shared_weight_is_never_zeroed():
    model = M.shared_weight()
    shapes, sites = analyse(model)
    assert "conv_s1" not in sites and "conv_s2" not in sites
    assert "conv_s1" in sites["conv1"].why_blocked
    pruned = {s.name: list(range(s.channels - 1)) for s in sites.values() if s.prunable}
    out = rewrite.apply(model, sites, pruned)
    shared = [t for t in out.graph.initializer if t.name == "shared.weight"]
    original = [t for t in model.graph.initializer if t.name == "shared.weight"]
    assert shared[0].SerializeToString() == original[0].SerializeToString()
    assert_exact(model, sites, shapes, pruned)


def test_clip_not_containing_zero_needs_the_consumer_rewrite():
    # Clip(0.5, 6) maps a zeroed channel to 0.5: zeroing the producer would not zero the site
    model = M.mobilenet()
    for node in model.graph.node:
        if node.name == "head_clip":
            node.input[1] = "head_clip_min"
    model.graph.initializer.append(numpy_helper.from_array(np.float32(0.5), "head_clip_min"))
    shapes, sites = analyse(model)
    assert sites["head"].strategy == C
    assert_exact(model, sites, shapes, {"head": [0, 7, 11]})


def _tied(readers: int) -> onnx.ModelProto:
    """`readers` Convs in a row, all reading one weight, then GAP→Flatten→Gemm: the convs are one tied layer."""
    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, 3, 3, 3)).astype(np.float32), "tied")
    head = numpy_helper.from_array(np.random.default_rng(1).normal(size=(3, 3)).astype(np.float32), "head")
    nodes, x = [], "input"
    for i in range(readers):
        nodes += [helper.make_node("Conv", [x, "tied"], [f"c{i}"], pads=[1] * 4, name=f"conv{i}"),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    nodes += [helper.make_node("GlobalAveragePool", [x], ["g"]), helper.make_node("Flatten", ["g"], ["f"]),
              helper.make_node("Gemm", ["f", "head"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 3])], [w, head])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_model_without_prunable_layer_has_no_site():
    one = _tied(1)
    shapes, ints = probe_shapes(one, M.random_input(one, 1))
    assert [s.name for s in find_sites(one, shapes, ints)] == ["conv0"]
    # a second reader of the weight: zeroing it for one layer would change the other, so nothing is prunable
    # (the job refuses it: tests/test_sites.py)
    two = _tied(2)
    shapes, ints = probe_shapes(two, M.random_input(two, 1))
    assert not any(s.prunable for s in find_sites(two, shapes, ints))


# ------------------------------------------------------------- regressions of bugs found by this suite

def test_class_layer_before_softmax_is_not_a_site():
    model = M.tf2onnx()
    model.graph.node[-1].output[0] = "pre_softmax"
    model.graph.node.append(helper.make_node("Softmax", ["pre_softmax"], ["logits"], name="softmax", axis=-1))
    shapes, sites = analyse(model)
    assert "dense_1/MatMul" not in sites


def test_fixed_batch_2_model_keeps_its_consumer_sites():
    model = M.with_bn(batch=2)
    shapes, sites = analyse(model)     # was BadModel: a probe batch of 2 blocked every consumer slice
    assert {n: s.strategy for n, s in sites.items()} == {"conv1": C, "conv2": C}
    assert_exact(model, sites, shapes, {"conv1": [0, 1], "conv2": [3]})


def test_shape_read_does_not_block_a_tf2onnx_site():
    model = M.tf2onnx(bn=True)
    shapes, sites = analyse(model)
    assert sites["conv2d"].strategy == C
    assert_exact(model, sites, shapes, {"conv2d": [0, 4]})


def test_bounds_move_an_opset_7_model_to_opset_8():
    # Min/Max broadcast the [C,1,1] bound only from opset 8: onnxruntime refused the opset-7 model's Min-6
    from test_bound import _run, clipped_reference   # here, not at the top: test_bound imports this module

    model = M.plain(opset=7)
    model.ir_version = 4                              # as the reported model: the IR stays valid at 8
    shapes, sites = analyse(model)
    feed = M.random_input(model, batch=3)
    rng = np.random.default_rng(0)
    bounds = {n: rng.uniform(0.1, 0.5, s.channels) for n, s in sites.items()}   # below these O(1) activations
    out = rewrite.apply_bounds(model, sites, bounds)

    assert [(o.domain, o.version) for o in out.opset_import] == [("", 8)] and out.ir_version == 4
    assert model.opset_import[0].version == 7
    onnx.checker.check_model(out, full_check=True)
    got = _run(out, feed)[0]
    assert np.abs(got - clipped_reference(model, sites, bounds, feed)[0]).max() == 0.0
    assert np.abs(got - _run(model, feed)[0]).max() > 1e-3


def test_bounds_refuse_an_opset_whose_nodes_change_meaning_at_8():
    # Gemm lost its broadcast attribute at opset 7: moving an opset-6 Gemm to 8 would change what it computes
    model = M.plain(opset=7)
    shapes, sites = analyse(model)
    model.opset_import[0].version = 6
    with pytest.raises(BadModel, match="opset 6, whose Gemm nodes"):
        rewrite.apply_bounds(model, sites, {n: np.ones(s.channels) for n, s in sites.items()})


def test_weights_in_constant_nodes_load_as_initializers_that_compute_the_same(tmp_path):
    model = _as_constant_nodes(M.resnet())
    loaded = load_model(M.save(model, tmp_path / "m.onnx")).model
    # every weight and bias is an initializer now, the same ones the exporter's form has
    read_by_layers = {i for m in loaded.graph.node if m.op_type in ("Conv", "Gemm", "Add") for i in m.input}
    assert not [n for n in loaded.graph.node if n.op_type == "Constant" and n.output[0] in read_by_layers]
    assert {t.name for t in loaded.graph.initializer} == {t.name for t in M.resnet().graph.initializer}
    feed = M.random_input(model, batch=3)
    np.testing.assert_array_equal(M.run(loaded, feed)[0], M.run(model, feed)[0])


def test_a_computed_weight_is_named_as_the_reason():
    _, sites = analyse(_computed_weight(M.plain(), "conv1"))
    assert "computed at run time" in sites["conv1"].why_blocked and sites["conv1"].channels == 6
    # a constant weight read through a Cast that two layers share is not called computed
    model = _through_identity(M.plain())
    for node in model.graph.node:
        if node.op_type == "Identity":
            node.op_type = "Cast"
            node.attribute.append(helper.make_attribute("to", onnx.TensorProto.FLOAT))
    conv1 = next(n for n in model.graph.node if n.name == "conv1")
    assert conv1.input[1].endswith("_alias")
    model.graph.node.append(helper.make_node("Conv", [conv1.input[0], conv1.input[1]], ["spare"], name="spare"))
    _, sites = analyse(model)
    assert "conv1" not in sites or "computed" not in sites["conv1"].why_blocked


def test_only_weights_in_constant_nodes_become_initializers():
    # the repair tunes initializers: preprocessing constants must stay out of its reach
    model = _as_constant_nodes(M.plain())
    first = model.graph.input[0].name
    mean = helper.make_node("Constant", [], ["mean"], value=numpy_helper.from_array(np.full((1, 3, 1, 1), 0.5, np.float32)))
    std = helper.make_node("Constant", [], ["std"], value=numpy_helper.from_array(np.full((1, 3, 1, 1), 0.25, np.float32)))
    pre = [mean, std, helper.make_node("Sub", [first, "mean"], ["centred"]), helper.make_node("Div", ["centred", "std"], ["normed"])]
    for node in model.graph.node:
        node.input[:] = ["normed" if i == first else i for i in node.input]
    model.graph.node.extend(pre)
    converted = _loaded(topo_sorted(model))
    assert {t.name for t in converted.graph.initializer} == {t.name for t in M.plain().graph.initializer}
    assert {n.output[0] for n in converted.graph.node if n.op_type == "Constant"} == {"mean", "std"}
    feed = M.random_input(model, batch=3)
    np.testing.assert_array_equal(M.run(converted, feed)[0], M.run(model, feed)[0])


def test_the_bounds_constant_nodes_stay_nodes():
    model = M.plain()
    shapes, sites = analyse(model)
    bounded = rewrite.apply_bounds(model, sites, {n: np.ones(s.channels, np.float32) for n, s in sites.items()
                                                  if s.prunable})
    before = [n for n in bounded.graph.node if n.op_type == "Constant"]
    assert before
    constants_to_initializers(bounded)
    assert [n for n in bounded.graph.node if n.op_type == "Constant"] == before
