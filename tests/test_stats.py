"""In-graph statistics against a brute-force numpy computation on the same intermediate tensor."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import models as M
from calib.stats import REDUCTIONS, UnitAxis, augment, collect, plain_pass, probe_shapes


def intermediate(model: onnx.ModelProto, tensor: str, x: np.ndarray) -> np.ndarray:
    """The tensor's values, read by adding it as a graph output."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name=tensor))
    return M.run(probe, {model.graph.input[0].name: x}, [tensor])[0].astype(np.float64)


def brute_force(a: np.ndarray) -> dict[str, np.ndarray]:
    """Per image and channel over the spatial map; a dense [N, C] tensor is its own map of one value."""
    flat = a.reshape(a.shape[0], a.shape[1], -1)
    return {"linf": np.abs(flat).max(-1), "l1": np.abs(flat).sum(-1), "l2": np.sqrt((flat ** 2).sum(-1)),
            "mean": flat.mean(-1)}


def batches(model, sizes=(5, 1, 4), seed=0):
    rng = np.random.default_rng(seed)
    shape = M.input_shape(model, 1)[1:]
    return [rng.normal(size=(n,) + shape).astype(np.float32) for n in sizes]


# (builder, tensor, rank): a conv site after Relu, one before it (signed: mean and ℓ∞ differ), and a dense site
CASES = {
    "opset13_relu": (lambda: M.plain(opset=13), "relu2_out", 4),
    "opset13_signed": (lambda: M.plain(opset=13), "conv2_out", 4),
    "opset18_relu": (lambda: M.plain(opset=18), "relu2_out", 4),
    "opset18_signed": (lambda: M.plain(opset=18), "conv1_out", 4),
    "dynamo_bn": (M.dynamo, "bn2_out", 4),
    "dense13": (M.dense, "fc1_out", 2),
    "dense18": (lambda: M.dense(opset=18), "fc2_relu_out", 2),
    "tf2onnx_dense": (M.tf2onnx, "dense/MatMul/BiasAdd_out", 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_collect_matches_brute_force(case):
    build, tensor, rank = CASES[case]
    model = build()
    xs = batches(model)
    got = collect(model, {tensor: UnitAxis(rank, 1)}, iter(xs), model.graph.input[0].name, keep_per_image=True)

    a = np.concatenate([intermediate(model, tensor, x) for x in xs])
    assert a.ndim == rank
    want = brute_force(a)
    stats = got.stats[tensor]
    assert set(stats.per_image) == set(REDUCTIONS)
    for red in REDUCTIONS:
        assert stats.per_image[red].shape == (10, a.shape[1])
        np.testing.assert_allclose(stats.per_image[red], want[red], rtol=1e-5, atol=1e-6, err_msg=red)
    np.testing.assert_allclose(stats.agg("linf_max"), want["linf"].max(0), rtol=1e-5)
    np.testing.assert_allclose(stats.agg("mean"), want["mean"].mean(0), rtol=1e-5, atol=1e-6)
    # the logits come from the same pass, unchanged by the added outputs
    np.testing.assert_allclose(got.logits, np.concatenate([M.run(model, {model.graph.input[0].name: x})[0]
                                                           for x in xs]), rtol=1e-6, atol=1e-6)
    if rank == 4 and tensor.startswith("conv"):
        # on a signed map the reductions really differ: a swapped output would not pass unnoticed
        assert not np.allclose(stats.per_image["mean"], stats.per_image["linf"])


def test_streamed_aggregates_equal_the_per_image_ones_and_keep_nothing_per_image():
    model = M.resnet()
    tensors = {"stem_relu_out": UnitAxis(4, 1), "b0_conv2_out": UnitAxis(4, 1)}
    xs = batches(model, sizes=(3, 5, 2))
    streamed = collect(model, tensors, iter(xs), "input")
    kept = collect(model, tensors, iter(xs), "input", keep_per_image=True)
    assert streamed.logits is None
    for tensor in tensors:
        s, k = streamed.stats[tensor], kept.stats[tensor]
        assert s.per_image is None and s.count == 10
        np.testing.assert_array_equal(s.agg("linf_max"), k.per_image["linf"].max(0))
        for red in REDUCTIONS:
            np.testing.assert_allclose(s.agg(red), k.per_image[red].mean(0), rtol=1e-12, atol=1e-15)


def test_several_tensors_in_one_pass_keep_their_own_statistics():
    model = M.resnet()
    tensors = {t: UnitAxis(4, 1) for t in ("stem_relu_out", "b0_conv2_out", "down_relu2_out")}
    xs = batches(model, sizes=(3, 3))
    got = collect(model, tensors, iter(xs), "input", keep_per_image=True)
    for tensor in tensors:
        want = brute_force(np.concatenate([intermediate(model, tensor, x) for x in xs]))
        for red in REDUCTIONS:
            np.testing.assert_allclose(got.stats[tensor].per_image[red], want[red], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset", [13, 18])
def test_augment_puts_axes_where_the_opset_wants_them(opset):
    model = M.plain(opset=opset)
    aug, names = augment(model, {"relu2_out": UnitAxis(4, 1)})
    reduces = [n for n in aug.graph.node if n.op_type.startswith("Reduce")]
    assert len(reduces) == 4
    for node in reduces:
        as_attribute = any(a.name == "axes" for a in node.attribute)
        assert as_attribute == (opset < 18)
        assert len(node.input) == (2 if opset >= 18 else 1)
    # the original graph is not touched
    assert len(model.graph.output) == 1 and len(aug.graph.output) == 1 + len(set(names))


def test_collect_progress_counts_every_image():
    model = M.plain()
    seen = []
    collect(model, {"relu1_out": UnitAxis(4, 1)}, iter(batches(model)), "input", progress=seen.append)
    assert seen == [5, 1, 4]


def test_plain_pass_gives_the_same_logits():
    model = M.plain()
    xs = batches(model)
    logits, seconds = plain_pass(model, iter(xs), "input")
    got = collect(model, {"relu1_out": UnitAxis(4, 1)}, iter(xs), "input", keep_per_image=True)
    np.testing.assert_allclose(logits, got.logits, rtol=1e-6)
    assert seconds >= 0


def test_probe_shapes_reads_float_shapes_and_small_integers():
    model = M.tf2onnx()
    x = np.random.default_rng(0).normal(size=(1, 8, 8, 3)).astype(np.float32)
    shapes, ints = probe_shapes(model, {"input_1": x})
    assert shapes["conv2d/Relu_out"] == (1, 6, 8, 8)
    assert shapes["max_pooling2d__12_out"] == (1, 4, 4, 6)
    assert shapes["flatten/Reshape_out"] == (1, 96)
    # the run-time shape computation of tf2onnx's flatten is captured with its values
    np.testing.assert_array_equal(ints["flatten/Concat_out"], [1, 96])
    assert "flatten/Concat_out" not in shapes
    # probing does not leave extra outputs on the caller's model
    assert [o.name for o in model.graph.output] == ["logits"]
