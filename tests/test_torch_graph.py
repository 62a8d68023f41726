"""TorchGraph must reproduce onnxruntime on every operator the suite uses, and stay differentiable."""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from sanitizer.errors import ExitCode, SanitizeError  # noqa: E402
from sanitizer.torch_graph import to_torch  # noqa: E402

SUITE = Path(__file__).resolve().parents[1] / ".." / "shared" / "bench" / "suite"
RNG = np.random.default_rng(0)


def _model(nodes, x_shape, inits=(), opset=17, x_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", x_type, x_shape)],
        [helper.make_empty_tensor_value_info("y")],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _check(model, x, atol=1e-5):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x})[0]
    out, _ = to_torch(model)(torch.from_numpy(x))
    np.testing.assert_allclose(out.detach().numpy(), ref, atol=atol, rtol=1e-5)
    return out


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


X4 = _w(2, 4, 9, 9)


@pytest.mark.parametrize("attrs", [
    {},
    {"pads": [1, 1, 1, 1], "strides": [2, 2]},
    {"pads": [0, 1, 2, 1], "dilations": [2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
    {"auto_pad": "VALID"},
    {"group": 2, "pads": [1, 1, 1, 1]},
])
def test_conv(attrs):
    groups = attrs.get("group", 1)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], **attrs)]
    _check(_model(nodes, X4.shape, [("w", _w(6, 4 // groups, 3, 3)), ("b", _w(6))]), X4)


def test_depthwise_conv():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], group=4, pads=[1, 1, 1, 1])]
    _check(_model(nodes, X4.shape, [("w", _w(4, 1, 3, 3))]), X4)


@pytest.mark.parametrize("attrs", [{}, {"transA": 1}, {"transB": 1, "alpha": 0.5, "beta": 2.0}])
def test_gemm(attrs):
    a = _w(5, 3) if attrs.get("transA") else _w(3, 5)
    b = _w(4, 5) if attrs.get("transB") else _w(5, 4)
    nodes = [helper.make_node("Gemm", ["x", "b", "c"], ["y"], **attrs)]
    _check(_model(nodes, a.shape, [("b", b), ("c", _w(4))]), a)


def test_matmul_and_arithmetic():
    x = _w(3, 5)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "a"], ["s1"]),
        helper.make_node("Sub", ["s1", "a"], ["s2"]),
        helper.make_node("Mul", ["s2", "a"], ["s3"]),
        helper.make_node("Div", ["s3", "d"], ["y"]),
    ]
    _check(_model(nodes, x.shape, [("w", _w(5, 4)), ("a", _w(4)), ("d", np.float32(1.5) + np.abs(_w(4)))]), x)


@pytest.mark.parametrize("node, opset", [
    (helper.make_node("Relu", ["x"], ["y"]), 17),
    (helper.make_node("Sigmoid", ["x"], ["y"]), 17),
    (helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.2), 17),
    (helper.make_node("Clip", ["x", "lo", "hi"], ["y"]), 17),
    (helper.make_node("Clip", ["x", "", "hi"], ["y"]), 17),
    (helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.5), 6),
    (helper.make_node("Softmax", ["x"], ["y"], axis=1), 17),
    (helper.make_node("Softmax", ["x"], ["y"], axis=1), 11),
    (helper.make_node("Identity", ["x"], ["y"]), 17),
    (helper.make_node("Dropout", ["x"], ["y"]), 17),
    (helper.make_node("GlobalAveragePool", ["x"], ["y"]), 17),
])
def test_elementwise(node, opset):
    inits = [("lo", np.float32(-0.3)), ("hi", np.float32(0.7))] if len(node.input) > 1 else []
    _check(_model([node], X4.shape, [(k, v) for k, v in inits if k in node.input], opset=opset), X4)


def test_batchnorm():
    nodes = [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)]
    inits = [("s", _w(4)), ("b", _w(4)), ("m", _w(4)), ("v", np.abs(_w(4)) + 0.1)]
    _check(_model(nodes, X4.shape, inits), X4)


@pytest.mark.parametrize("op, attrs", [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 0, 1]}),
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 1, 1, 0], "count_include_pad": 1}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}),
])
def test_pools(op, attrs):
    _check(_model([helper.make_node(op, ["x"], ["y"], **attrs)], X4.shape), X4)


def test_layout_ops():
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t", "shape"], ["r"]),
        helper.make_node("Unsqueeze", ["r", "ax"], ["u"]),
        helper.make_node("Squeeze", ["u", "ax"], ["s"]),
        helper.make_node("Flatten", ["s"], ["f"], axis=1),
        helper.make_node("ReduceMean", ["f"], ["y"], axes=[1], keepdims=0),
    ]
    inits = [("shape", np.array([0, -1, 4], np.int64)), ("ax", np.array([1], np.int64))]
    _check(_model(nodes, X4.shape, inits), X4)


def test_old_opset_squeeze_attrs_and_reducemean_axes_input():
    nodes = [
        helper.make_node("Unsqueeze", ["x"], ["u"], axes=[0]),
        helper.make_node("Squeeze", ["u"], ["s"], axes=[0]),
        helper.make_node("ReduceMean", ["s"], ["y"], axes=[2, 3]),
    ]
    _check(_model(nodes, X4.shape, opset=11), X4)
    nodes = [helper.make_node("ReduceMean", ["x", "ax"], ["y"], keepdims=0)]
    _check(_model(nodes, X4.shape, [("ax", np.array([-1, -2], np.int64))], opset=18), X4)


def test_shape_subgraph():
    # The tf2onnx / dynamo pattern: a target shape computed from the input's own shape.
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["nf"], ["ni"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["ni", "ax0"], ["n1"]),
        helper.make_node("Slice", ["shp", "one", "big", "ax0", "step"], ["rest"]),
        helper.make_node("Constant", [], ["minus"], value=numpy_helper.from_array(np.array([-1], np.int64))),
        helper.make_node("Concat", ["n1", "minus"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Range", ["r0", "r1", "r2"], ["idx"]),
        helper.make_node("Gather", ["flat", "idx"], ["picked"], axis=1),
        helper.make_node("Slice", ["picked", "neg_start", "neg_end", "ax1", "neg_step"], ["rev"]),
        helper.make_node("Mul", ["rev", "rest_f"], ["y"]),
    ]
    inits = [
        ("zero", np.array(0, np.int64)), ("ax0", np.array([0], np.int64)), ("one", np.array([1], np.int64)),
        ("big", np.array([2**62], np.int64)), ("step", np.array([1], np.int64)),
        ("r0", np.array(3, np.int64)), ("r1", np.array(40, np.int64)), ("r2", np.array(2, np.int64)),
        ("neg_start", np.array([-1], np.int64)), ("neg_end", np.array([-(2**62)], np.int64)),
        ("ax1", np.array([1], np.int64)), ("neg_step", np.array([-3], np.int64)),
        ("rest_f", np.float32(2.0)),
    ]
    _check(_model(nodes, X4.shape, inits), X4)


def test_gradients_flow_and_params_are_named_after_initializers():
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc/w:0", "fc.b"], ["y"], transB=1),
    ]
    inits = [("conv.weight", _w(6, 4, 3, 3)), ("fc/w:0", _w(3, 6)), ("fc.b", _w(3))]
    model = _model(nodes, X4.shape, inits)
    graph = to_torch(model)
    assert set(graph.initializer_params) == {"conv.weight", "fc/w:0", "fc.b"}
    x = torch.from_numpy(X4.copy()).requires_grad_(True)
    out, cap = graph(x, capture=["r"])
    out.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert graph.initializer_params["conv.weight"].grad is not None
    assert cap["r"].shape == (2, 6, 9, 9)


def test_masks_zero_channels():
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    graph = to_torch(_model(nodes, X4.shape, [("w", _w(6, 4, 3, 3))]))
    mask = torch.ones(6)
    mask[2] = 0
    with torch.no_grad():
        out, _ = graph(torch.from_numpy(X4), masks={"y": mask})
    assert float(out[:, 2].abs().max()) == 0 and float(out[:, 1].abs().max()) > 0


def test_write_back_changes_only_float_initializers():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])]
    model = _model(nodes, [2, 3, 2], [("shape", np.array([2, 6], np.int64)), ("w", _w(6, 2))])
    graph = to_torch(model)
    with torch.no_grad():
        graph.initializer_params["w"].mul_(2)
    new = graph.write_back(model)
    assert [n.op_type for n in new.graph.node] == ["Reshape", "MatMul"]
    arrays = {i.name: numpy_helper.to_array(i) for i in new.graph.initializer}
    np.testing.assert_array_equal(arrays["w"], 2 * numpy_helper.to_array(model.graph.initializer[1]))
    np.testing.assert_array_equal(arrays["shape"], [2, 6])
    _check(new, _w(2, 3, 2))


def test_unknown_op_is_a_bad_model_error():
    model = _model([helper.make_node("Hardmax", ["x"], ["y"])], [2, 2])
    with pytest.raises(SanitizeError, match="Hardmax") as err:
        to_torch(model)
    assert err.value.code == ExitCode.BAD_MODEL


def _suite_cases():
    if not SUITE.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"benchmark suite not found at {SUITE}"))]
    return tomllib.loads((SUITE / "suite.toml").read_text())["cases"]


def preprocess(X: np.ndarray, pp: dict) -> np.ndarray:
    x = (X.astype(np.float32) * np.float32(pp["scale"]) - np.asarray(pp["mean"], np.float32)) \
        / np.asarray(pp["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if pp["layout"] == "nchw" else x)


@pytest.mark.parametrize("case", _suite_cases())
def test_suite_model_matches_onnxruntime(case):
    folder = SUITE / case
    pp = tomllib.loads((folder / "case.toml").read_text())["preprocess"]
    x = preprocess(np.load(folder / "calib.npz")["X"][:16], pp)
    model = onnx.load(folder / "model.onnx")
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        out, _ = to_torch(model)(torch.from_numpy(x))
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-3 * max(1.0, float(np.abs(ref).max())), rtol=0)


def _fixed_batch_model(batch: int):
    """The shape of a fixed-batch export: a constant Reshape to [batch, features] after the conv."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["y"], transB=1),
    ]
    inits = [("w", _w(4, 1, 3, 3)), ("shape", np.array([batch, 64], np.int64)), ("fc", _w(3, 64))]
    return _model(nodes, [batch, 1, 4, 4], inits)


@pytest.mark.parametrize("batch, n", [(1, 5), (2, 5), (2, 2), (3, 1)])
def test_fixed_batch_runs_any_batch_in_chunks_with_gradients(batch, n):
    model = _fixed_batch_model(batch)
    x = _w(n, 1, 4, 4)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    padded = np.concatenate([x, np.repeat(x[-1:], -n % batch, 0)])
    ref = np.concatenate([sess.run(None, {"x": padded[i:i + batch]})[0] for i in range(0, len(padded), batch)])[:n]
    graph = to_torch(model)
    assert graph.fixed_batch == batch
    xt = torch.from_numpy(x).requires_grad_(True)
    mask = torch.ones(4, requires_grad=True)   # attribution's unit masks
    out, cap = graph(xt, capture=["r", "w"], masks={"c": mask})
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert cap["r"].shape == (n, 4, 4, 4) and cap["w"].shape == (4, 1, 3, 3)
    out.sum().backward()
    assert xt.grad.shape == x.shape and bool((xt.grad.abs().sum((1, 2, 3)) > 0).all())
    # the mask's gradient counts each real image once, padding copies not at all
    xr = torch.from_numpy(x).requires_grad_(False)
    looped = torch.ones(4, requires_grad=True)
    sum(graph(xr[i:i + 1].expand((batch,) + x.shape[1:]), masks={"c": looped})[0][0].sum() for i in range(n)).backward()
    np.testing.assert_allclose(mask.grad.numpy(), looped.grad.numpy(), rtol=1e-4, atol=1e-5)


def _typed_model(x_type, w_type):
    """Two dense layers (onnxruntime's CPU Conv has no float64 kernel) whose input is x_type and whose weights
    are stored as w_type (cast to x_type where they differ)."""
    np_w = helper.tensor_dtype_to_np_dtype(w_type)
    nodes, w, fc = [], "w", "fc"
    if w_type != x_type:
        nodes += [helper.make_node("Cast", ["w"], ["wc"], to=x_type),
                  helper.make_node("Cast", ["fc"], ["fcc"], to=x_type)]
        w, fc = "wc", "fcc"
    nodes += [
        helper.make_node("Flatten", ["x"], ["f"]),
        helper.make_node("Gemm", ["f", w], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", fc], ["y"], transB=1),
    ]
    inits = [("w", (_w(6, 4 * 9 * 9) / 9).astype(np_w)), ("fc", _w(3, 6).astype(np_w))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, [None, 4, 9, 9])],
                              [helper.make_empty_tensor_value_info("y")],
                              initializer=[numpy_helper.from_array(v, k) for k, v in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("x_type, w_type, rtol", [
    (TensorProto.FLOAT16, TensorProto.FLOAT16, 2e-2),   # onnxruntime computes in half, the interpreter in float32
    (TensorProto.DOUBLE, TensorProto.DOUBLE, 1e-6),
    (TensorProto.FLOAT, TensorProto.FLOAT16, 1e-5),     # half weights cast up inside a float32 graph
    (TensorProto.FLOAT, TensorProto.BFLOAT16, 1e-5),
])
def test_input_and_weight_dtypes(x_type, w_type, rtol):
    model = _typed_model(x_type, w_type)
    np_x = helper.tensor_dtype_to_np_dtype(x_type)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": X4.astype(np_x)})[0].astype(np.float32)
    graph = to_torch(model)
    xt = torch.from_numpy(X4.copy()).requires_grad_(True)   # callers always feed float32
    out, _ = graph(xt)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=rtol, atol=rtol * float(np.abs(ref).max()))
    out.sum().backward()
    assert xt.grad is not None and graph.initializer_params["w"].grad is not None
    # untouched weights go back bit for bit in their stored type; a changed one is rounded to it
    with torch.no_grad():
        graph.initializer_params["fc"].mul_(2)
    new = graph.write_back(model)
    before = {i.name: i for i in model.graph.initializer}
    after = {i.name: i for i in new.graph.initializer}
    assert after["w"].data_type == w_type and after["w"].SerializeToString() == before["w"].SerializeToString()
    np.testing.assert_array_equal(numpy_helper.to_array(after["fc"]).astype(np.float32),
                                  2 * numpy_helper.to_array(before["fc"]).astype(np.float32))


def test_mask_along_the_token_feature_axis():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = to_torch(_model(nodes, [2, 5, 8], [("w", _w(8, 6))]))
    mask = torch.ones(6)
    mask[4] = 0
    with torch.no_grad():
        out, _ = graph(torch.from_numpy(_w(2, 5, 8)), masks={"y": (mask, -1)})
    assert float(out[..., 4].abs().max()) == 0 and float(out[..., 3].abs().min()) > 0


def test_output_and_input_names_choose_the_tensors():
    nodes = [helper.make_node("ArgMax", ["x"], ["label"], axis=1), helper.make_node("Relu", ["x"], ["y"])]
    model = _model(nodes, [2, 3], [])
    model.graph.output.insert(0, helper.make_empty_tensor_value_info("label"))
    graph = to_torch(model, output_name="y", input_name="x")
    out, _ = graph(torch.tensor([[-1.0, 2.0, 0.5]]))
    assert out.tolist() == [[0.0, 2.0, 0.5]]
    with pytest.raises(SanitizeError, match="no output named 'z'"):
        to_torch(model, output_name="z")
