"""Every operator the torch interpreter covers, one- or two-node graphs built in code, against onnxruntime;
differentiable ops also run a backward pass to the input."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from sanitizer.errors import ExitCode, SanitizeError  # noqa: E402
from sanitizer.torch_graph import to_torch  # noqa: E402

RNG = np.random.default_rng(1)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


X = _w(2, 4, 6, 6)
I64 = np.int64


def _model(nodes, x, inits, opset, outputs=("y",), x_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", x_type, list(x.shape))],
        [helper.make_empty_tensor_value_info(o) for o in outputs],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def check(nodes, x=X, inits=None, opset=17, outputs=("y",), grad=True, rtol=1e-5, atol=1e-5):
    """Each output of the interpreter equals onnxruntime's; with `grad`, a backward pass reaches x."""
    nodes = nodes if isinstance(nodes, list) else [nodes]
    model = _model(nodes, x, inits or {}, opset, outputs)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    refs = sess.run(None, {"x": x})
    for name, ref in zip(outputs, refs):
        graph = to_torch(model, output_name=name)
        xt = torch.from_numpy(x.copy()).requires_grad_(grad)
        out, _ = graph(xt)
        assert out.shape == ref.shape, name
        np.testing.assert_allclose(out.detach().numpy(), ref, rtol=rtol, atol=atol, err_msg=name)
        if grad and out.is_floating_point():
            out.sum().backward()
            assert xt.grad is not None and bool(torch.isfinite(xt.grad).all())


def node(op, ins=("x",), outs=("y",), **attrs):
    return helper.make_node(op, list(ins), list(outs), **attrs)


ACTIVATIONS = [
    node("Elu"), node("Elu", alpha=0.3), node("Selu"), node("Selu", alpha=1.5, gamma=2.0), node("Celu", alpha=0.7),
    node("Erf"), node("HardSigmoid"), node("HardSigmoid", alpha=0.3, beta=0.4), node("HardSwish"),
    node("Softplus"), node("Softsign"), node("Mish"), node("ThresholdedRelu", alpha=0.4), node("LeakyRelu"),
    node("Sigmoid"), node("Tanh"), node("Relu"), node("Exp"), node("Neg"), node("Abs"), node("Sin"), node("Cos"),
    node("Floor"), node("Ceil"), node("Round"), node("Sign"), node("Identity"),
]


@pytest.mark.parametrize("n", ACTIVATIONS, ids=lambda n: f"{n.op_type}{len(n.attribute) or ''}")
def test_activation(n):
    check(n, opset=18 if n.op_type == "Mish" else 17)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_opset20(approximate):
    check(node("Gelu", approximate=approximate), opset=20)


@pytest.mark.parametrize("op", ["Sqrt", "Log", "Reciprocal"])
def test_positive_domain(op):
    check(node(op), x=np.abs(X) + 0.5)


@pytest.mark.parametrize("slope", [_w(4, 1, 1), _w(1), _w(6)])
def test_prelu(slope):
    check(node("PRelu", ["x", "s"]), inits={"s": slope})


@pytest.mark.parametrize("n, inits, opset", [
    (node("Clip", ["x", "lo", "hi"]), {"lo": np.float32(-0.3), "hi": np.float32(0.7)}, 17),
    (node("Clip", ["x", "", "hi"]), {"hi": np.float32(0.7)}, 13),
    (node("Clip", ["x", "lo"]), {"lo": np.float32(0.0)}, 11),
    (node("Clip", ["x"]), {}, 17),
    (node("Clip", ["x"], min=-0.5, max=0.5), {}, 6),
    (node("Clip", ["x"], max=0.5), {}, 6),
])
def test_clip_attribute_and_input_forms(n, inits, opset):
    check(n, inits=inits, opset=opset)


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean"])
def test_binary_broadcast(op):
    x = np.abs(X) + 0.5 if op == "Pow" else X
    check(node(op, ["x", "c"]), x=x, inits={"c": _w(4, 1, 6)})


@pytest.mark.parametrize("op", ["Max", "Min", "Sum", "Mean"])
def test_variadic(op):
    check(node(op, ["x", "a", "b"]), inits={"a": _w(6), "b": _w(1, 4, 1, 1)})


def test_float_mod():
    check(node("Mod", ["x", "c"], fmod=1), inits={"c": np.float32(0.7)}, grad=False)


def test_integer_mod_follows_the_divisor_sign():
    nodes = [node("Cast", ["x"], ["i"], to=TensorProto.INT64), node("Mul", ["i", "k"], ["j"]),
             node("Mod", ["j", "m"], ["r"]), node("Cast", ["r"], ["y"], to=TensorProto.FLOAT)]
    check(nodes, x=X * 5, inits={"k": np.int64(3), "m": np.array([-4, 5, 7, -3, 2, 9], I64)}, grad=False)


@pytest.mark.parametrize("op", ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"])
def test_comparison_and_where(op):
    x = np.round(X * 2) / 2
    nodes = [node(op, ["x", "c"], ["m"]), node("Where", ["m", "x", "z"], ["y"])]
    check(nodes, x=x, inits={"c": np.float32(0.5), "z": _w(6)}, opset=16)


@pytest.mark.parametrize("op", ["And", "Or", "Xor"])
def test_logical(op):
    nodes = [node("Greater", ["x", "z"], ["a"]), node("Less", ["x", "h"], ["b"]), node(op, ["a", "b"], ["c"]),
             node("Not", ["c"], ["d"]), node("Where", ["d", "x", "z"], ["y"])]
    check(nodes, inits={"z": np.float32(0.0), "h": np.float32(0.5)})


@pytest.mark.parametrize("to", [TensorProto.INT64, TensorProto.INT32, TensorProto.DOUBLE, TensorProto.FLOAT16,
                                TensorProto.BOOL, TensorProto.UINT8])
def test_cast_round_trip(to):
    nodes = [node("Cast", ["x"], ["c"], to=to), node("Cast", ["c"], ["y"], to=TensorProto.FLOAT)]
    # float16 is computed in float32 (module docstring): not bit-exact to onnxruntime's rounding
    check(nodes, x=np.abs(X) * 3, grad=False, rtol=1e-3 if to == TensorProto.FLOAT16 else 1e-5)


def test_castlike():
    check(node("CastLike", ["x", "t"]), inits={"t": np.array([1.0], np.float64)}, grad=False)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2",
                                "ReduceSumSquare", "ReduceLogSumExp", "ReduceProd"])
@pytest.mark.parametrize("form", ["attr", "input", "all", "noop"])
def test_reductions(op, form):
    attr_opset = 11 if op != "ReduceSum" else 12
    if form == "attr":
        check(node(op, axes=[1, -1], keepdims=0), opset=attr_opset)
    elif form == "input":
        check(node(op, ["x", "ax"], keepdims=1), inits={"ax": np.array([2, 1], I64)}, opset=18)
    elif form == "all":
        check(node(op, keepdims=0), opset=attr_opset)
    else:
        check(node(op, ["x", "ax"], noop_with_empty_axes=1), inits={"ax": np.array([], I64)}, opset=18)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset, axis", [(11, 1), (11, 2), (13, 1), (13, -1), (17, 2)])
def test_softmax_axis_semantics(op, opset, axis):
    check(node(op, axis=axis), opset=opset)


@pytest.mark.parametrize("shape_a, shape_b", [((2, 4, 6, 6), (6, 3)), ((2, 4, 6, 6), (4, 6, 5)),
                                              ((2, 4, 6, 6), (2, 1, 6, 2))])
def test_batched_matmul(shape_a, shape_b):
    check(node("MatMul", ["x", "w"]), x=_w(*shape_a), inits={"w": _w(*shape_b)})


@pytest.mark.parametrize("attrs, c", [({}, _w(4)), ({"transA": 1, "transB": 1}, _w(1, 4)),
                                      ({"alpha": 0.5, "beta": 2.0}, _w(3, 4)), ({"beta": 0.0}, None),
                                      ({"alpha": 1.5}, np.float32(0.3))])
def test_gemm_attributes(attrs, c):
    a = _w(5, 3) if attrs.get("transA") else _w(3, 5)
    b = _w(4, 5) if attrs.get("transB") else _w(5, 4)
    ins = ["x", "b"] + (["c"] if c is not None else [])
    check(node("Gemm", ins, **attrs), x=a, inits={"b": b, **({"c": c} if c is not None else {})})


@pytest.mark.parametrize("attrs", [
    {}, {"strides": [2, 2]}, {"strides": [2, 2], "pads": [1, 0, 1, 1]}, {"strides": [2, 2], "output_padding": [1, 1]},
    {"strides": [2, 2], "output_shape": [12, 13]}, {"dilations": [2, 1], "pads": [1, 1, 0, 0]}, {"group": 2},
    {"strides": [2, 2], "auto_pad": "SAME_UPPER"}, {"auto_pad": "VALID", "strides": [3, 2]},
])
def test_conv_transpose(attrs):
    w = _w(4, 3 if attrs.get("group", 1) == 1 else 2, 3, 3)
    check(node("ConvTranspose", ["x", "w", "b"], **attrs), inits={"w": w, "b": _w(w.shape[1] * attrs.get("group", 1))})


@pytest.mark.parametrize("axis, with_bias, opset", [(-1, True, 17), (2, False, 17), (1, True, 17)])
def test_layer_normalization(axis, with_bias, opset):
    shape = X.shape[axis % 4:]
    ins = ["x", "s"] + (["b"] if with_bias else [])
    inits = {"s": _w(*shape), **({"b": _w(*shape)} if with_bias else {})}
    check(node("LayerNormalization", ins, ["y", "mean", "inv"], axis=axis, epsilon=1e-3), inits=inits,
          outputs=("y", "mean", "inv"), opset=opset, rtol=1e-4)


def test_layer_normalization_over_tokens():
    x = _w(2, 5, 8)
    check(node("LayerNormalization", ["x", "s", "b"]), x=x, inits={"s": _w(8), "b": _w(8)}, rtol=1e-4)


def test_instance_and_group_normalization():
    check(node("InstanceNormalization", ["x", "s", "b"], epsilon=1e-3), inits={"s": _w(4), "b": _w(4)}, rtol=1e-4)
    check(node("GroupNormalization", ["x", "s", "b"], num_groups=2), inits={"s": _w(4), "b": _w(4)}, opset=21,
          rtol=1e-4)
    # opset 18 scales per group
    check(node("GroupNormalization", ["x", "s", "b"], num_groups=2), inits={"s": _w(2), "b": _w(2)}, opset=18,
          rtol=1e-4)


@pytest.mark.parametrize("size", [3, 5])  # onnxruntime refuses even sizes
def test_lrn(size):
    check(node("LRN", size=size, alpha=1e-2, beta=0.6, bias=1.5), x=_w(2, 7, 4, 4))


def test_shape_ops_feed_constant_of_shape_expand_tile():
    nodes = [
        node("Shape", ["x"], ["s"]), node("ConstantOfShape", ["s"], ["z"],
                                          value=numpy_helper.from_array(np.array([0.5], np.float32))),
        node("Add", ["x", "z"], ["a"]), node("Size", ["x"], ["n"]), node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        node("Div", ["a", "nf"], ["d"]), node("Expand", ["d", "big"], ["e"]), node("Tile", ["e", "reps"], ["y"]),
    ]
    check(nodes, inits={"big": np.array([3, 1, 1, 1, 1], I64), "reps": np.array([1, 1, 2, 1, 3], I64)})


def test_constant_of_shape_default_and_range():
    nodes = [node("ConstantOfShape", ["shp"], ["z"]), node("Range", ["r0", "r1", "r2"], ["r"]),
             node("Cast", ["r"], ["rf"], to=TensorProto.FLOAT), node("Add", ["z", "rf"], ["zr"]),
             node("Add", ["x", "zr"], ["y"])]
    inits = {"shp": np.array([6], I64), "r0": np.array(-2, I64), "r1": np.array(10, I64), "r2": np.array(2, I64)}
    check(nodes, inits=inits)


@pytest.mark.parametrize("eq, shapes", [("nchw,kc->nkhw", [(3, 4)]), ("bij,bjk->bik", [(2, 6, 3)]),
                                        ("...ij,jk", [(6, 5)])])
def test_einsum(eq, shapes):
    x = X if eq.startswith("n") or eq.startswith("...") else _w(2, 4, 6)
    ins = ["x"] + [f"w{i}" for i in range(len(shapes))]
    check(node("Einsum", ins, equation=eq), x=x, inits={f"w{i}": _w(*s) for i, s in enumerate(shapes)}, rtol=1e-4)


RESIZE_COORDS = ["half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric"]


@pytest.mark.parametrize("coord", RESIZE_COORDS)
@pytest.mark.parametrize("mode, nearest", [("linear", None), ("nearest", "round_prefer_floor"),
                                           ("nearest", "round_prefer_ceil"), ("nearest", "floor"),
                                           ("nearest", "ceil")])
@pytest.mark.parametrize("scales", [[1, 1, 2, 2], [1, 1, 0.5, 1.5], [1, 1, 1.7, 0.6]])
def test_resize_scales(coord, mode, nearest, scales):
    attrs = {"mode": mode, "coordinate_transformation_mode": coord, **({"nearest_mode": nearest} if nearest else {})}
    check(node("Resize", ["x", "", "sc"], **attrs), inits={"sc": np.array(scales, np.float32)}, opset=19,
          grad=mode == "linear")


@pytest.mark.parametrize("sizes, extra", [([2, 4, 11, 5], {}), ([3, 4], {"axes": [2, 3]}),
                                          ([9, 9], {"axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"}),
                                          ([9, 4], {"axes": [2, 3], "keep_aspect_ratio_policy": "not_smaller"})])
@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_sizes(sizes, extra, mode):
    check(node("Resize", ["x", "", "", "sz"], mode=mode, **extra), inits={"sz": np.array(sizes, I64)}, opset=19)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("scales", [[1, 1, 2, 3], [1, 1, 1.5, 2.5], [1, 1, 0.5, 0.7], [1, 1, 0.6, 1.5]])
def test_resize_opset10_and_upsample(mode, scales):
    sc = {"sc": np.array(scales, np.float32)}
    check(node("Resize", ["x", "sc"], mode=mode), inits=sc, opset=10)
    if min(scales) >= 1:  # onnxruntime's Upsample refuses scales below 1
        check(node("Upsample", ["x", "sc"], mode=mode), inits=sc, opset=9)
        check(node("Upsample", mode=mode, scales=[float(v) for v in scales]), opset=7)


def test_resize_opset11_roi_input():
    check(node("Resize", ["x", "roi", "sc"], mode="linear"),
          inits={"roi": np.array([], np.float32), "sc": np.array([1, 1, 2, 2], np.float32)}, opset=11)


@pytest.mark.parametrize("attrs, why", [({"mode": "cubic"}, "cubic"),
                                        ({"coordinate_transformation_mode": "tf_crop_and_resize"},
                                         "tf_crop_and_resize")])
def test_resize_refuses_other_modes_by_name(attrs, why):
    model = _model([node("Resize", ["x", "", "sc"], **attrs)], X, {"sc": np.array([1, 1, 2, 2], np.float32)}, 19)
    with pytest.raises(SanitizeError, match=why) as err:
        to_torch(model)
    assert err.value.code == ExitCode.BAD_MODEL and "--criterion linf" in str(err.value)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads", [[0, 0, 1, 2, 0, 0, 2, 1], [0, 1, -1, 2, 0, 0, 1, -2]])
def test_pad(mode, pads):
    inits = {"p": np.array(pads, I64), "v": np.float32(0.25)}
    ins = ["x", "p", "v"] if mode == "constant" else ["x", "p"]
    check(node("Pad", ins, mode=mode), inits=inits, opset=19)


def test_pad_attribute_form_and_axes_input():
    check(node("Pad", mode="reflect", pads=[0, 0, 2, 1, 0, 0, 1, 2]), opset=10)
    check(node("Pad", value=1.5, pads=[0, 1, 0, 0, 0, 0, 1, 0]), opset=10)
    check(node("Pad", ["x", "p", "", "ax"], mode="edge"),
          inits={"p": np.array([1, 2, 3, 0], I64), "ax": np.array([-1, 2], I64)}, opset=18)


@pytest.mark.parametrize("n, inits, opset, outs", [
    (node("Split", outs=["a", "b"], axis=1), {}, 11, ("a", "b")),
    (node("Split", outs=["a", "b", "c"], axis=3, split=[1, 2, 3]), {}, 11, ("a", "b", "c")),
    (node("Split", ["x", "s"], ["a", "b"], axis=2), {"s": np.array([4, 2], I64)}, 13, ("a", "b")),
    (node("Split", outs=["a", "b", "c"], axis=2, num_outputs=3), {}, 18, ("a", "b", "c")),
    (node("Split", outs=["a", "b", "c"], axis=1, num_outputs=3), {}, 18, ("a", "b", "c")),
])
def test_split(n, inits, opset, outs):
    check(n, inits=inits, opset=opset, outputs=outs)


def test_slice_concat_gather_elements_transpose():
    nodes = [node("Slice", ["x", "st", "en", "ax", "sp"], ["s"]), node("Concat", ["s", "x"], ["c"], axis=2),
             node("GatherElements", ["c", "idx"], ["g"], axis=3), node("Transpose", ["g"], ["y"], perm=[0, 3, 1, 2])]
    idx = RNG.integers(-6, 6, size=(2, 4, 9, 4)).astype(I64)
    inits = {"st": np.array([-1, 0], I64), "en": np.array([-10, 6], I64), "ax": np.array([2, 3], I64),
             "sp": np.array([-2, 1], I64), "idx": idx}
    check(nodes, inits=inits)


def test_gather_scalar_and_matrix_indices():
    check(node("Gather", ["x", "i"], axis=2), inits={"i": np.array([[0, -1], [2, 3]], I64)})
    check(node("Gather", ["x", "i"], axis=1), inits={"i": np.array(-2, I64)})


@pytest.mark.parametrize("n, opset", [
    (node("Squeeze", ["x", "ax"]), 13), (node("Unsqueeze", ["x", "ax"]), 13),
    (node("Squeeze", axes=[2]), 11), (node("Unsqueeze", axes=[0, -1]), 11), (node("Flatten", axis=2), 13),
    (node("Flatten", axis=0), 13), (node("Transpose"), 13), (node("Dropout"), 13),
])
def test_layout(n, opset):
    x = _w(2, 4, 1, 6)
    check(n, x=x, inits={"ax": np.array([2], I64)} if len(n.input) > 1 else {}, opset=opset)


@pytest.mark.parametrize("shape, allowzero", [([0, -1], 0), ([2, 0, 36], 0), ([-1, 6, 6], 0), ([2, 4, 36], 1)])
def test_reshape(shape, allowzero):
    check(node("Reshape", ["x", "s"], allowzero=allowzero), inits={"s": np.array(shape, I64)}, opset=14)


def test_dropout_mask_output():
    check(node("Dropout", outs=["y", "m"]), outputs=("y", "m"), grad=False)


@pytest.mark.parametrize("op", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("attrs", [{}, {"axis": 1, "keepdims": 0}, {"axis": -1, "select_last_index": 1}])
def test_arg_extremes(op, attrs):
    check(node(op, **attrs), x=np.round(X), grad=False)


@pytest.mark.parametrize("attrs", [{}, {"axis": 1, "largest": 0}])
def test_topk(attrs):
    check(node("TopK", ["x", "k"], ["v", "i"], **attrs), inits={"k": np.array([3], I64)}, outputs=("v", "i"))


def test_depth_and_space():
    for mode in ("DCR", "CRD"):
        check(node("DepthToSpace", blocksize=2, mode=mode), x=_w(2, 8, 3, 3))
    check(node("SpaceToDepth", blocksize=2), x=_w(2, 3, 4, 6))


def test_global_max_pool():
    check(node("GlobalMaxPool"))


def test_qdq_conv_matches_and_passes_gradients():
    w = RNG.integers(-100, 100, size=(5, 4, 3, 3)).astype(np.int8)
    nodes = [node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             node("DequantizeLinear", ["b", "bs"], ["bd"]), node("Conv", ["xd", "wd", "bd"], ["y"])]
    inits = {"xs": np.float32(0.02), "xz": np.uint8(128), "w": w, "ws": np.abs(_w(5)) * 0.01 + 1e-3,
             "wz": np.zeros(5, np.int8), "b": RNG.integers(-50, 50, size=5).astype(np.int32), "bs": np.float32(1e-4)}
    check(nodes, inits=inits, rtol=1e-4, atol=1e-4)


def test_model_local_functions_are_inlined():
    fn = helper.make_function("local", "Act", ["a"], ["b"], [node("Elu", ["a"], ["b"])],
                              [helper.make_opsetid("", 17)])
    model = _model([helper.make_node("Act", ["x"], ["y"], domain="local")], X, {}, 17)
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.functions.append(fn)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    out, _ = to_torch(model)(torch.from_numpy(X))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, what", [
    (helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft"), "com.microsoft.Gelu"),
    (node("NonMaxSuppression", ["x", "x"]), "NonMaxSuppression"),
    (node("MaxPool", outs=["y", "idx"], kernel_shape=[2, 2]), "output 2"),
])
def test_missing_op_names_itself_and_the_flag_that_avoids_it(n, what):
    with pytest.raises(SanitizeError, match=what) as err:
        to_torch(_model([n], X, {}, 17))
    assert err.value.code == ExitCode.BAD_MODEL
    assert "pass --criterion linf without --detect" in str(err.value)


def test_vit_block_as_exported():
    """Patch embedding, a class token broadcast to the batch (Shape/ConstantOfShape/Expand), LayerNorm,
    one attention head (MatMul, Softmax), GELU MLP, residual Adds, the class token read by Gather."""
    d, t = 8, 4
    nodes = [
        node("Conv", ["x", "pw"], ["pe"], kernel_shape=[3, 3], strides=[3, 3]),
        node("Reshape", ["pe", "tok_shape"], ["pr"]), node("Transpose", ["pr"], ["tok"], perm=[0, 2, 1]),
        node("Shape", ["x"], ["xs"]), node("Slice", ["xs", "z1", "o1"], ["n"]),
        node("Concat", ["n", "one_d"], ["cls_shape"], axis=0),
        node("ConstantOfShape", ["cls_shape"], ["zeros"], value=numpy_helper.from_array(np.zeros(1, np.float32))),
        node("Add", ["zeros", "cls"], ["cls_b"]),
        node("Concat", ["cls_b", "tok"], ["seq"], axis=1),
        node("LayerNormalization", ["seq", "g1", "b1"], ["h"], axis=-1),
        node("MatMul", ["h", "wq"], ["q"]), node("MatMul", ["h", "wk"], ["k"]), node("MatMul", ["h", "wv"], ["v"]),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), node("MatMul", ["q", "kt"], ["att"]),
        node("Mul", ["att", "scale"], ["atts"]), node("Softmax", ["atts"], ["p"], axis=-1),
        node("MatMul", ["p", "v"], ["o"]), node("Add", ["seq", "o"], ["r1"]),
        node("LayerNormalization", ["r1", "g2", "b2"], ["h2"], axis=-1),
        node("MatMul", ["h2", "w1"], ["m1"]), node("Gelu", ["m1"], ["g"]), node("MatMul", ["g", "w2"], ["m2"]),
        node("Add", ["r1", "m2"], ["r2"]), node("Gather", ["r2", "zero"], ["c"], axis=1),
        node("Gemm", ["c", "head"], ["y"], transB=1),
    ]
    inits = {"pw": _w(d, 4, 3, 3), "tok_shape": np.array([0, d, -1], I64), "z1": np.array([0], I64),
             "o1": np.array([1], I64), "one_d": np.array([1, d], I64), "cls": _w(1, 1, d),
             "g1": _w(d), "b1": _w(d), "g2": _w(d), "b2": _w(d), "wq": _w(d, d), "wk": _w(d, d), "wv": _w(d, d),
             "scale": np.float32(d ** -0.5), "w1": _w(d, 2 * d), "w2": _w(2 * d, d), "zero": np.array(0, I64),
             "head": _w(3, d)}
    assert X.shape[2] * X.shape[3] // 9 == t
    check(nodes, inits=inits, opset=20, rtol=1e-4, atol=1e-4)
