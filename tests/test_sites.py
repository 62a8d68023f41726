"""Units wherever a linear layer has them, per-unit operands by broadcasting, quantized (QDQ) weights, the refusal
when nothing can be pruned, and the report and `layers` listing that let anyone rebuild the masked reference.

Exactness here is bit for bit: the rewritten model equals the original with a 0/1 mask multiplied into the site
tensor along its unit axis (tests/masked.py), max abs diff 0, both run with onnxruntime's graph optimizations
off — the inserted Mul stops fusions such as BiasGelu, whose rounding differs by an ulp."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models as M
from calib.stats import UnitAxis, collect
from masked import masked_reference
from sanitizer import rewrite
from test_rewrite import analyse, masks_for

RNG = np.random.default_rng


def run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    """First output, onnxruntime CPU without graph optimizations (no fusion that rounds differently)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def exact(model, sites, shapes, pruned, seed=0) -> float:
    """Max abs diff between the rewrite and the masked reference (must be 0); asserts the pruning mattered."""
    feed = M.random_input(model, batch=3, seed=seed)
    got = run(rewrite.apply(model, sites, pruned), feed)
    want = run(masked_reference(model, masks_for(sites, shapes, pruned)), feed)
    assert np.abs(got - run(model, feed)).max() > 1e-4, "pruning changed nothing: the comparison proves nothing"
    return float(np.abs(got - want).max())


def finish(nodes, inits, x_shape, name="m", opset=17, out_dim=M.CLASSES) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out_dim])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def w(rng, *shape):
    return (rng.normal(size=shape) * np.sqrt(2 / shape[0])).astype(np.float32)


# ----------------------------------------------------------------------------------------- token dense layers

def tokens_block(seed: int = 0) -> onnx.ModelProto:
    """A ViT-like block on a 3x4x4 image: patches → tokens [N, 16, 3] → fc1 (+bias) → LayerNorm → self-attention
    (two activation MatMuls, Softmax) → residual Add → fc2 (+bias) → GELU as Erf chain → fc3 → residual Add →
    mean over tokens → class Gemm."""
    r = RNG(seed)
    inits = {"shape": np.array([0, 3, 16], np.int64), "W1": w(r, 3, 8), "b1": (r.normal(size=8) * .1).astype(np.float32),
             "g": r.uniform(.5, 1.5, 8).astype(np.float32), "be": (r.normal(size=8) * .1).astype(np.float32),
             "W2": w(r, 8, 12), "b2": (r.normal(size=12) * .1).astype(np.float32), "sqrt2": np.float32(np.sqrt(2)),
             "one": np.float32(1), "half": np.float32(.5), "W3": w(r, 12, 8), "Wh": w(r, 8, M.CLASSES)}
    n = helper.make_node
    nodes = [
        n("Reshape", ["x", "shape"], ["r"], name="patches"), n("Transpose", ["r"], ["t"], perm=[0, 2, 1], name="to_ntd"),
        n("MatMul", ["t", "W1"], ["m1"], name="fc1"), n("Add", ["m1", "b1"], ["h1"], name="fc1_bias"),
        n("LayerNormalization", ["h1", "g", "be"], ["ln"], axis=-1, name="ln"),
        n("Transpose", ["ln"], ["lnT"], perm=[0, 2, 1], name="kT"), n("MatMul", ["ln", "lnT"], ["qk"], name="qk"),
        n("Softmax", ["qk"], ["att"], axis=-1, name="softmax"), n("MatMul", ["att", "ln"], ["av"], name="av"),
        n("Add", ["av", "ln"], ["res1"], name="res1"),
        n("MatMul", ["res1", "W2"], ["m2"], name="fc2"), n("Add", ["m2", "b2"], ["h2"], name="fc2_bias"),
        n("Div", ["h2", "sqrt2"], ["d"], name="gelu_div"), n("Erf", ["d"], ["e"], name="gelu_erf"),
        n("Add", ["e", "one"], ["e1"], name="gelu_add"), n("Mul", ["h2", "e1"], ["ge"], name="gelu_mul"),
        n("Mul", ["ge", "half"], ["gelu"], name="gelu_half"),
        n("MatMul", ["gelu", "W3"], ["m3"], name="fc3"), n("Relu", ["m3"], ["a3"], name="fc3_relu"),
        n("Add", ["a3", "res1"], ["res2"], name="res2"),
        n("ReduceMean", ["res2"], ["pooled"], axes=[1], keepdims=0, name="mean_tokens"),
        n("MatMul", ["pooled", "Wh"], ["logits"], name="head")]
    return finish(nodes, inits, [3, 4, 4], "tokens", opset=17)


def test_dense_layers_over_tokens_have_one_unit_per_feature():
    model = tokens_block()
    shapes, sites = analyse(model)
    assert {k: (s.kind, s.strategy, s.tensor, s.axis, s.rank, s.channels) for k, s in sites.items()} == {
        "fc1": ("dense", "producer", "h1", 2, 3, 8),
        "fc2": ("dense", "producer", "h2", 2, 3, 12),
        "fc3": ("dense", "producer", "a3", 2, 3, 8),
        "res1": ("join", "blocked", "res1", 2, 3, 8),
        "res2": ("join", "consumers", "res2", 2, 3, 8)}
    # res1 feeds fc2 and res2: the residual stream is read by an Add no weight slice can zero
    assert "Add res2" in sites["res1"].why_blocked
    for name in ("fc1", "fc2", "fc3", "res2"):
        assert exact(model, sites, shapes, {name: [0, 3, 5]}) == 0, name
    assert exact(model, sites, shapes, {"fc1": [1], "fc2": list(range(6)), "fc3": [7], "res2": [2]}) == 0


def test_token_statistics_reduce_over_the_tokens():
    model = tokens_block()
    x = RNG(1).normal(size=(5, 3, 4, 4)).astype(np.float32)
    got = collect(model, {"h2": UnitAxis(3, 2)}, iter([x[:2], x[2:]]), "x", keep_per_image=True).stats["h2"]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.ValueInfoProto(name="h2"))
    a = M.run(probe, {"x": x}, ["h2"])[0].astype(np.float64)          # [N, T, D]
    want = {"linf": np.abs(a).max(1), "l1": np.abs(a).sum(1), "l2": np.sqrt((a ** 2).sum(1)), "mean": a.mean(1)}
    for red, value in want.items():
        np.testing.assert_allclose(got.per_image[red], value, rtol=1e-5, atol=1e-6, err_msg=red)


# ------------------------------------------------------------------------- per-unit operands by broadcasting

def conv_then(const_shape, op="Add", seed=0, hw=(8, 8)) -> onnx.ModelProto:
    """Conv (no bias) → `op` with a constant of `const_shape` → Relu → GAP → Flatten → Gemm."""
    r = RNG(seed)
    inits = {"Wc": w(r, 4, 1, 3, 3), "k": r.normal(size=const_shape).astype(np.float32) + 0.5,
             "W1": w(r, 4, M.CLASSES)}
    n = helper.make_node
    nodes = [n("Conv", ["x", "Wc"], ["c"], pads=[1] * 4, name="conv"), n(op, ["c", "k"], ["cb"], name="const_op"),
             n("Relu", ["cb"], ["r"], name="relu"), n("GlobalAveragePool", ["r"], ["p"], name="gap"),
             n("Flatten", ["p"], ["f"], name="flat"), n("Gemm", ["f", "W1"], ["logits"], name="fc")]
    return finish(nodes, inits, [1, *hw], "conv_then", opset=13)


@pytest.mark.parametrize("const_shape,strategy", [((4, 1, 1), "producer"), ((1, 4, 1, 1), "producer"),
                                                  ((), "consumers"), ((1, 1, 1), "consumers")])
def test_a_bias_that_varies_only_along_channels_is_per_channel(const_shape, strategy):
    """[C,1,1] (the model-zoo MNIST export), [1,C,1,1]: the bias is zeroed with the weights, so a pruned channel
    outputs exactly what the masked one does (before: relu(b)). One shift shared by all channels cannot be zeroed
    for one: the next layer's slice is."""
    model = conv_then(const_shape)
    shapes, sites = analyse(model)
    site = sites["conv"]
    assert (site.strategy, site.tensor) == (strategy, "r")
    assert exact(model, sites, shapes, {"conv": [1, 2]}) == 0


def test_a_1d_constant_along_the_width_is_not_per_channel():
    """[N, 4, 8, 4] + a [4] constant broadcasts along the width: the units are the conv's own outputs, before it."""
    model = conv_then((4,), hw=(8, 4))
    shapes, sites = analyse(model)
    assert (sites["conv"].strategy, sites["conv"].tensor) == ("producer", "c")
    assert sites["conv"].zero == [("Wc", 0)]
    assert exact(model, sites, shapes, {"conv": [0, 3]}) == 0


@pytest.mark.parametrize("builder", [M.dense, M.plain])
def test_a_layer_whose_units_are_a_graph_output_is_blocked(builder):
    # a model exposing its features beside the logits: zeroing the layer would change that output, which the
    # masked reference (a Mul after the site tensor) leaves as it is
    model = builder()
    _, before = analyse(model)
    name, site = next((n, s) for n, s in before.items() if s.prunable)
    model.graph.output.append(helper.make_tensor_value_info(site.tensor, TensorProto.FLOAT, None))
    _, after = analyse(model)
    assert (after[name].strategy, after[name].why_blocked) == ("blocked", f"{site.tensor} is a graph output")


def test_a_constant_varying_along_height_ends_the_chain_and_scales_are_followed():
    model = conv_then((1, 1, 8, 1))
    shapes, sites = analyse(model)
    assert sites["conv"].tensor == "c"
    # a per-channel scale keeps a zero channel zero: the site moves past it
    model = conv_then((4, 1, 1), op="Mul")
    shapes, sites = analyse(model)
    assert (sites["conv"].strategy, sites["conv"].tensor, sites["conv"].zero) == ("producer", "r", [("Wc", 0)])
    assert exact(model, sites, shapes, {"conv": [2]}) == 0


# ----------------------------------------------------------------------------------------- quantized models

def quantize(model: onnx.ModelProto, tmp_path, fmt: str) -> onnx.ModelProto:
    """onnxruntime's static quantizer on a float model, as users produce int8 models for TensorRT."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src, dst = tmp_path / "float.onnx", tmp_path / f"{fmt}.onnx"
    onnx.save(model, src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([M.random_input(model, 8, seed=s) for s in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=getattr(QuantFormat, fmt), per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return onnx.load(dst)


def test_qdq_conv_and_gemm_units_are_zeroed_at_their_zero_point(tmp_path):
    model = quantize(M.dense(), tmp_path, "QDQ")
    shapes, sites = analyse(model)
    assert {k: s.strategy for k, s in sites.items()} == {"conv1": "producer", "fc1": "producer", "fc2": "producer"}
    # the units are measured on the float tensor after the activation's Q/DQ pair
    assert all(s.tensor.endswith("DequantizeLinear_Output") for s in sites.values())
    pruned = {"conv1": [0, 5], "fc1": [3, 7, 10, 12], "fc2": [1, 2, 11]}
    for name, units in pruned.items():
        assert exact(model, sites, shapes, {name: units}) == 0, name
    assert exact(model, sites, shapes, pruned) == 0
    out = rewrite.apply(model, sites, pruned)
    q = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    q0 = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert q["conv1.weight_quantized"].dtype == np.int8 and q["conv1.bias_quantized"].dtype == np.int32
    zp = q0["conv1.weight_zero_point"]
    for c in (0, 5):
        assert np.all(q["conv1.weight_quantized"][c] == zp[c]) and q["conv1.bias_quantized"][c] == 0
    # fc2 (Gemm transB=0) keeps its units on axis 1 of the weight, quantized per column
    assert np.all(q["fc2.weight_quantized"][:, [1, 2, 11]] == q0["fc2.weight_zero_point"][[1, 2, 11]])
    np.testing.assert_array_equal(np.delete(q["fc2.weight_quantized"], [1, 2, 11], 1),
                                  np.delete(q0["fc2.weight_quantized"], [1, 2, 11], 1))


def test_qdq_consumer_rewrite_through_batchnorm(tmp_path):
    # BN kept after quantization: the producer cannot be zeroed, the next layer's quantized slice is
    model = quantize(M.dense(bn=True), tmp_path, "QDQ")
    shapes, sites = analyse(model)
    prunable = {k for k, s in sites.items() if s.prunable}
    assert prunable >= {"conv1"}
    for name in sorted(prunable):
        assert exact(model, sites, shapes, {name: [0, 2]}) == 0, name


def test_qoperator_models_are_refused_naming_the_op(tmp_path, write_npz, cli):
    model = quantize(M.plain(), tmp_path, "QOperator")
    shapes, sites = analyse(model)
    assert not any(s.prunable for s in sites.values())
    assert sorted(s.channels for s in sites.values() if s.kind == "conv") == [6, 8]
    assert all("QLinear" in s.why_blocked for s in sites.values())
    path = tmp_path / "qop.onnx"
    onnx.save(model, path)
    # random weights on random labelled images: the sanity gate would rightly stop it first
    r = cli(path, "--calib", write_npz(), "--criterion", "linf", "--out", tmp_path / "o.onnx", "--no-sanity-check")
    assert r.code == 4 and len(r.err_lines) == 1
    assert "no prunable layer in scope" in r.err and "QLinearConv" in r.err and "QDQ" in r.err
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------------------------ nothing to prune

def test_nothing_to_prune_is_refused_with_the_reasons(tmp_path, write_npz, cli):
    """Every site blocked: exit 4, one line naming why, nothing written (before: exit 0, 'sanitized ONNX written')."""
    model = M.blocked()
    # conv_c, the only prunable site, now goes through a Sigmoid (0 -> 0.5: the producer cannot zero it) into a
    # pooling the sites do not follow
    for node in model.graph.node:
        node.op_type = {"relu_c": "Sigmoid", "pool": "GlobalLpPool"}.get(node.name, node.op_type)
    path = M.save(model, tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    for layers in ([], ["--layers", "all"]):
        r = cli(path, "--calib", write_npz(), "--criterion", "linf", "--out", out, *layers, "--no-sanity-check")
        assert r.code == 4 and len(r.err_lines) == 1, r.err
        assert "no prunable layer in scope" in r.err and "conv_a: Sigmoid" in r.err
        assert not out.exists()
    r = cli("layers", path)
    assert r.code == 0 and "no prunable layer" in r.out and "conv_c" in r.out


# --------------------------------------------------------------------------------- report, `layers` listing

@pytest.mark.parametrize("build,hw", [(tokens_block, (4, 4)), (lambda: conv_then((4, 1, 1)), (8, 8))])
def test_masked_reference_rebuilt_from_the_report_alone(tmp_path, write_npz, build, hw, cli):
    path = M.save(build(), tmp_path / "m.onnx")
    calib = write_npz(n=80, hw=hw, labels=False)
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli(path, "--calib", calib, "--criterion", "linf", "--layers", "all", "--ratio", "0.4", "--allow-degraded",
            "--out", out, "--report", report, "--no-sanity-check")
    assert r.code == 0, r.err
    units = json.loads(report.read_text())["pruned_units"]
    assert units and all(u["units"] for u in units.values())
    masks = {}
    for site in units.values():
        mask = np.ones(site["of"])
        mask[site["units"]] = 0
        masks[site["tensor"]] = (mask, site["rank"], site["axis"])
    original = onnx.load(path)
    x = np.load(calib)["X"].astype(np.float32).transpose(0, 3, 1, 2)[:, :M.input_shape(original, 1)[1]] / 255
    want = run(masked_reference(original, masks), {"x": x})
    got = run(onnx.load(out), {"x": x})
    assert np.abs(got - run(original, {"x": x})).max() > 0
    assert np.abs(got - want).max() == 0


def test_layers_json_and_lines_keep_long_names(tmp_path, cli, monkeypatch):
    model = tokens_block()
    long = "encoder/layer_0/mlp/dense_with_a_really_long_exported_name/MatMul"
    for node in model.graph.node:
        if node.name == "fc2":
            node.name = long
    path = M.save(model, tmp_path / "m.onnx")
    monkeypatch.setenv("COLUMNS", "30")
    r = cli("layers", path, "--json")
    assert r.code == 0
    rows = {row["name"]: row for row in json.loads(r.out)}
    assert rows[long] == {"name": long, "kind": "dense", "tensor": "h2", "axis": 2, "rank": 3, "units": 12,
                          "strategy": "producer", "why_blocked": None}
    assert rows["res1"]["strategy"] == "blocked" and "res2" in rows["res1"]["why_blocked"]
    r = cli("layers", path)
    assert r.code == 0
    assert f"{long}\tdense\t12 units\ton h2 axis 2 of 3\tproducer" in r.out.splitlines()


def test_float16_weights_behind_a_cast_are_zeroed_in_place():
    """float16 weights inside a float32 graph (Cast to float before the layer): the float16 initializer is zeroed."""
    model = M.plain()
    for init in model.graph.initializer:
        if init.name in ("conv1.weight", "conv2.weight"):
            half = numpy_helper.to_array(init).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(half, init.name + "_fp16"))
            model.graph.node.insert(0, helper.make_node("Cast", [init.name], [init.name[:-5]], to=TensorProto.FLOAT))
    shapes, sites = analyse(model)
    assert {k: s.strategy for k, s in sites.items()} == {"conv1": "producer", "conv2": "producer"}
    assert sites["conv2"].zero[0] == ("conv2.weight_fp16", 0)
    assert exact(model, sites, shapes, {"conv1": [1, 4], "conv2": [0, 7]}) == 0
    out = rewrite.apply(model, sites, {"conv2": [0, 7]})
    w = numpy_helper.to_array(next(t for t in out.graph.initializer if t.name == "conv2.weight_fp16"))
    assert w.dtype == np.float16 and np.all(w[[0, 7]] == 0)


def dynamo_tokens(back: bool) -> onnx.ModelProto:
    """dynamo's linear over tokens: [N, T, D] → Reshape [N*T, D] → Gemm (addmm) → `back`: Reshape to [N, T, E] →
    Relu → mean over tokens → class layer; else Relu → Reshape to [N, T*E] → class layer."""
    r = RNG(3)
    inits = {"shape": np.array([0, 3, 16], np.int64), "rows": np.array([-1, 3], np.int64), "W": w(r, 3, 8),
             "b": (r.normal(size=8) * .1).astype(np.float32), "tok": np.array([-1, 16, 8], np.int64),
             "img": np.array([-1, 128], np.int64), "Wh": w(r, 8, M.CLASSES), "Wf": w(r, 128, M.CLASSES)}
    n = helper.make_node
    nodes = [n("Reshape", ["x", "shape"], ["r"], name="patches"), n("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             n("Reshape", ["t", "rows"], ["flat"], name="view"), n("Gemm", ["flat", "W", "b"], ["g"], name="addmm")]
    if back:
        nodes += [n("Reshape", ["g", "tok"], ["g3"], name="unview"), n("Relu", ["g3"], ["a"], name="relu"),
                  n("ReduceMean", ["a"], ["pooled"], axes=[1], keepdims=0), n("MatMul", ["pooled", "Wh"], ["logits"])]
    else:
        nodes += [n("Relu", ["g"], ["a"], name="relu"), n("Reshape", ["a", "img"], ["f"], name="per_image"),
                  n("MatMul", ["f", "Wf"], ["logits"])]
    return finish(nodes, inits, [3, 4, 4], "dynamo_tokens", opset=17)


def test_dense_rows_with_the_batch_folded_in_are_followed_back_to_tokens():
    model = dynamo_tokens(back=True)
    shapes, sites = analyse(model)
    assert shapes["g"] == (16, 8)
    site = sites["addmm"]
    assert (site.strategy, site.tensor, site.axis, site.rank) == ("producer", "a", 2, 3)
    assert exact(model, sites, shapes, {"addmm": [0, 2, 5]}) == 0
    # rows reshaped into one vector per image: the units stay on [N*T, E] rows, which statistics would read as
    # images, so the site is blocked (it was measured wrongly before)
    model = dynamo_tokens(back=False)
    shapes, sites = analyse(model)
    assert (sites["addmm"].strategy, sites["addmm"].tensor) == ("blocked", "a")
    assert "folds the batch" in sites["addmm"].why_blocked


def test_onnxruntime_fused_layers_are_named_when_nothing_is_prunable(tmp_path, write_npz, cli):
    import onnxruntime as ort

    # what an onnxruntime session saves after its extended optimizations: Conv + Relu as com.microsoft FusedConv
    onnx.save(M.plain(), tmp_path / "plain.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(tmp_path / "plain.onnx"), options, providers=["CPUExecutionProvider"])
    assert "FusedConv" in {n.op_type for n in onnx.load(tmp_path / "fused.onnx").graph.node}
    r = cli("layers", tmp_path / "fused.onnx")
    assert r.code == 0 and "no prunable layer" in r.out and r.out.count("FusedConv is onnxruntime's fused form") == 2
    r = cli(tmp_path / "fused.onnx", "--calib", write_npz(), "--criterion", "linf", "--out", tmp_path / "o.onnx",
            "--no-sanity-check")
    assert r.code == 4 and len(r.err_lines) == 1 and "FusedConv is onnxruntime's fused form" in r.err
    assert "graph optimizations" in r.err


def test_a_partly_fused_model_lists_its_fused_layers_as_blocked(tmp_path):
    import onnxruntime as ort

    onnx.save(M.resnet(), tmp_path / "resnet.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "fused.onnx")
    ort.InferenceSession(str(tmp_path / "resnet.onnx"), options, providers=["CPUExecutionProvider"])
    model = onnx.load(tmp_path / "fused.onnx")
    fused = {n.name for n in model.graph.node if n.op_type == "FusedConv"}
    _, sites = analyse(model)
    assert fused and fused <= set(sites) and all("fused form" in sites[n].why_blocked for n in fused)
    assert any(s.prunable for s in sites.values())
