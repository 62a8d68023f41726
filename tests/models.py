"""Tiny ONNX image classifiers, one per export pattern the sanitizer has to handle.

Each builder makes a small but complete classifier with onnx.helper: float32 image input, weights drawn from a
seeded rng (He-scaled so logits stay O(1) and a 1e-5 tolerance is meaningful), named nodes so tests can refer
to sites by name. `batch` is "N" for a dynamic batch or an int for a fixed one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASSES = 5


class Builder:
    def __init__(self, seed: int, opset: int):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    def init(self, name: str, value) -> str:
        if name not in self._names:
            self._names.add(name)
            self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def normal(self, shape, fan_in: int) -> np.ndarray:
        return (self.rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def conv(self, x: str, cin: int, cout: int, name: str, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = True) -> str:
        w = self.init(f"{name}.weight", self.normal((cout, cin // group, k, k), cin // group * k * k))
        inputs = [x, w]
        if bias:
            inputs.append(self.init(f"{name}.bias", (self.rng.normal(size=cout) * 0.1).astype(np.float32)))
        return self.node("Conv", inputs, name, kernel_shape=[k, k], pads=[k // 2] * 4, strides=[stride] * 2,
                         group=group)

    def bn(self, x: str, c: int, name: str) -> str:
        # a non-zero shift makes BN map 0 to a non-zero value: the reason a kept BN rules out the producer rewrite
        scale = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        shift = (self.rng.normal(size=c) * 0.3).astype(np.float32)
        mean = (self.rng.normal(size=c) * 0.1).astype(np.float32)
        var = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
        params = [self.init(f"{name}.{p}", v) for p, v in
                  (("weight", scale), ("bias", shift), ("running_mean", mean), ("running_var", var))]
        return self.node("BatchNormalization", [x] + params, name, epsilon=1e-5)

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", [x], name)

    def clip(self, x: str, name: str, lo: float = 0.0, hi: float = 6.0) -> str:
        # exporters share one min/max constant across all the Clips of a network
        return self.node("Clip", [x, self.init(f"clip_{lo}", np.float32(lo)), self.init(f"clip_{hi}", np.float32(hi))],
                         name)

    def gemm(self, x: str, k: int, n: int, name: str, trans_b: int = 1) -> str:
        w = self.init(f"{name}.weight", self.normal((n, k) if trans_b else (k, n), k))
        b = self.init(f"{name}.bias", (self.rng.normal(size=n) * 0.1).astype(np.float32))
        return self.node("Gemm", [x, w, b], name, transB=trans_b)

    def matmul_add(self, x: str, k: int, n: int, name: str) -> str:
        w = self.init(f"{name}/kernel", self.normal((k, n), k))
        b = self.init(f"{name}/bias", (self.rng.normal(size=n) * 0.1).astype(np.float32))
        return self.node("Add", [self.node("MatMul", [x, w], name), b], f"{name}/BiasAdd")

    def gap_flatten(self, x: str, name: str = "pool") -> str:
        return self.node("Flatten", [self.node("GlobalAveragePool", [x], name)], f"{name}_flatten")

    def build(self, name: str, input_name: str, input_shape: list, logits: str, batch) -> onnx.ModelProto:
        # the last op writes the graph output directly, as exporters do
        for node in self.nodes:
            node.output[:] = ["logits" if o == logits else o for o in node.output]
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch] + list(input_shape))],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
            self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="tests.models")
        model.ir_version = 8 if self.opset < 18 else 9   # what the exporters of each opset wrote
        onnx.checker.check_model(model, full_check=True)
        return model


def plain(batch="N", opset: int = 13, seed: int = 0) -> onnx.ModelProto:
    """Conv→Relu→Conv→Relu→GlobalAveragePool→Flatten→Gemm."""
    b = Builder(seed, opset)
    x = b.relu(b.conv("input", 3, 6, "conv1"), "relu1")
    x = b.relu(b.conv(x, 6, 8, "conv2"), "relu2")
    return b.build("plain", "input", [3, 8, 8], b.gemm(b.gap_flatten(x), 8, CLASSES, "fc"), batch)


def with_bn(batch="N", opset: int = 13, seed: int = 1) -> onnx.ModelProto:
    """Conv→BatchNormalization (not folded)→Relu, twice, then GAP→Flatten→Gemm."""
    b = Builder(seed, opset)
    x = b.relu(b.bn(b.conv("input", 3, 6, "conv1", bias=False), 6, "bn1"), "relu1")
    x = b.relu(b.bn(b.conv(x, 6, 8, "conv2", bias=False), 8, "bn2"), "relu2")
    return b.build("with_bn", "input", [3, 8, 8], b.gemm(b.gap_flatten(x), 8, CLASSES, "fc"), batch)


def mobilenet(batch="N", opset: int = 13, seed: int = 2) -> onnx.ModelProto:
    """Stem Conv→Clip(0,6), one inverted residual block (1x1 expand→BN→Clip→depthwise→Clip→1x1 project, Add with
    the block input), 1x1 head Conv→Clip→GAP→Gemm. The expand BN is kept so its site needs the grouped
    (depthwise) consumer rewrite."""
    b = Builder(seed, opset)
    stem = b.clip(b.conv("input", 3, 8, "stem"), "stem_clip")
    x = b.clip(b.bn(b.conv(stem, 8, 16, "expand", k=1, bias=False), 16, "expand_bn"), "expand_clip")
    x = b.clip(b.conv(x, 16, 16, "dw", group=16), "dw_clip")
    x = b.conv(x, 16, 8, "project", k=1)
    x = b.node("Add", [x, stem], "add1")
    x = b.clip(b.conv(x, 8, 12, "head", k=1), "head_clip")
    return b.build("mobilenet", "input", [3, 8, 8], b.gemm(b.gap_flatten(x), 12, CLASSES, "fc"), batch)


def squeeze_excite(batch="N", opset: int = 13, seed: int = 10) -> onnx.ModelProto:
    """Conv→Relu→Conv→Relu, then a squeeze-excitation gate (GlobalAveragePool→1x1 Conv→Relu→1x1 Conv→Sigmoid,
    Mul with the maps), GAP→Flatten→Gemm: the gate's convs, on 1x1 maps, come last in graph order."""
    b = Builder(seed, opset)
    x = b.relu(b.conv("input", 3, 6, "conv1"), "relu1")
    x = b.relu(b.conv(x, 6, 8, "conv2"), "relu2")
    gate = b.relu(b.conv(b.node("GlobalAveragePool", [x], "se_pool"), 8, 4, "se_reduce", k=1), "se_relu")
    gate = b.node("Sigmoid", [b.conv(gate, 4, 8, "se_expand", k=1)], "se_sigmoid")
    x = b.node("Mul", [x, gate], "se_scale")
    return b.build("squeeze_excite", "input", [3, 8, 8], b.gemm(b.gap_flatten(x), 8, CLASSES, "fc"), batch)


def resnet(batch="N", opset: int = 13, seed: int = 3, identity_blocks: int = 1) -> onnx.ModelProto:
    """Stem, `identity_blocks` basic blocks with an identity shortcut, then a stride-2 block whose shortcut is a
    1x1 Conv; each residual Add is followed by Relu."""
    b = Builder(seed, opset)
    x = b.relu(b.conv("input", 3, 8, "stem"), "stem_relu")
    for i in range(identity_blocks):
        y = b.relu(b.conv(x, 8, 8, f"b{i}_conv1"), f"b{i}_relu1")
        y = b.conv(y, 8, 8, f"b{i}_conv2")
        x = b.relu(b.node("Add", [y, x], f"b{i}_add"), f"b{i}_relu2")
    y = b.relu(b.conv(x, 8, 16, "down_conv1", stride=2), "down_relu1")
    y = b.conv(y, 16, 16, "down_conv2")
    short = b.conv(x, 8, 16, "down_short", k=1, stride=2)
    x = b.relu(b.node("Add", [y, short], "down_add"), "down_relu2")
    return b.build("resnet", "input", [3, 8, 8], b.gemm(b.gap_flatten(x), 16, CLASSES, "fc"), batch)


def tf2onnx(batch="N", opset: int = 13, seed: int = 4, bn: bool = False) -> onnx.ModelProto:
    """Keras through tf2onnx: NHWC input, Transpose to NCHW around Conv/Relu/MaxPool, Transpose back, flatten with
    a shape computed at run time (Shape→Gather→Unsqueeze→Concat→Reshape), then MatMul+Add(+Relu) dense layers."""
    b = Builder(seed, opset)
    x = b.node("Transpose", ["input_1"], "conv2d__6", perm=[0, 3, 1, 2])
    x = b.conv(x, 3, 6, "conv2d")
    if bn:
        x = b.bn(x, 6, "batch_normalization")
    x = b.relu(x, "conv2d/Relu")
    x = b.node("MaxPool", [x], "max_pooling2d", kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Transpose", [x], "max_pooling2d__12", perm=[0, 2, 3, 1])
    n = b.node("Gather", [b.node("Shape", [x], "flatten/Shape"), b.init("const_zero", np.int64(0))],
               "flatten/strided_slice", axis=0)
    n = b.node("Unsqueeze", [n, b.init("const_axes0", np.array([0], np.int64))], "flatten/Unsqueeze")
    shape = b.node("Concat", [n, b.init("const_96", np.array([96], np.int64))], "flatten/Concat", axis=0)
    x = b.node("Reshape", [x, shape], "flatten/Reshape")
    x = b.relu(b.matmul_add(x, 96, 16, "dense/MatMul"), "dense/Relu")
    x = b.matmul_add(x, 16, CLASSES, "dense_1/MatMul")
    return b.build("tf2onnx", "input_1", [8, 8, 3], x, batch)


def flat_head(batch="N", opset: int = 13, seed: int = 5, bn: bool = False) -> onnx.ModelProto:
    """A head that flattens the whole feature map into the classifier: Conv→Relu→Conv(→BN)→Relu→Flatten→Gemm."""
    b = Builder(seed, opset)
    x = b.relu(b.conv("input", 3, 4, "conv1"), "relu1")
    x = b.conv(x, 4, 6, "conv2")
    if bn:
        x = b.bn(x, 6, "bn2")
    x = b.node("Flatten", [b.relu(x, "relu2")], "flatten")
    return b.build("flat_head", "input", [3, 8, 8], b.gemm(x, 6 * 8 * 8, CLASSES, "fc"), batch)


def dense(batch="N", opset: int = 13, seed: int = 6, bn: bool = False) -> onnx.ModelProto:
    """A conv trunk then dense layers with both Gemm weight layouts: fc1 transB=1, fc2 transB=0, fc3 transB=1.
    With bn, BatchNorm1d-style BatchNormalization on [N, C] follows fc1 and fc2."""
    b = Builder(seed, opset)
    x = b.gap_flatten(b.relu(b.conv("input", 3, 8, "conv1"), "relu1"))
    x = b.gemm(x, 8, 16, "fc1", trans_b=1)
    if bn:
        x = b.bn(x, 16, "bn1")
    x = b.gemm(b.relu(x, "fc1_relu"), 16, 12, "fc2", trans_b=0)
    if bn:
        x = b.bn(x, 12, "bn2")
    x = b.gemm(b.relu(x, "fc2_relu"), 12, CLASSES, "fc3", trans_b=1)
    return b.build("dense", "input", [3, 8, 8], x, batch)


def dynamo(batch="N", opset: int = 18, seed: int = 7) -> onnx.ModelProto:
    """torch.onnx dynamo style: ReduceMean with axes as an input (opset 18) and keepdims, then Reshape, in place
    of GlobalAveragePool+Flatten. conv2 keeps its BN so its site is traced through ReduceMean and Reshape."""
    b = Builder(seed, opset)
    x = b.relu(b.conv("input", 3, 6, "conv1"), "relu1")
    x = b.relu(b.bn(b.conv(x, 6, 8, "conv2", bias=False), 8, "bn2"), "relu2")
    x = b.node("ReduceMean", [x, b.init("mean_axes", np.array([-1, -2], np.int64))], "mean", keepdims=1)
    x = b.node("Reshape", [x, b.init("view_shape", np.array([-1, 8], np.int64))], "view")
    return b.build("dynamo", "input", [3, 8, 8], b.gemm(x, 8, CLASSES, "fc"), batch)


def blocked(batch="N", opset: int = 13, seed: int = 8) -> onnx.ModelProto:
    """Sites whose consumers cannot be rewritten: conv_a→BN→SiLU (Sigmoid gating a Mul) and conv_b→BN→Relu into a
    Concat. conv_c after the Concat is ordinary."""
    b = Builder(seed, opset)
    a = b.bn(b.conv("input", 3, 6, "conv_a", bias=False), 6, "bn_a")
    a = b.node("Mul", [a, b.node("Sigmoid", [a], "silu_sigmoid")], "silu_mul")
    c = b.relu(b.bn(b.conv(a, 6, 6, "conv_b", bias=False), 6, "bn_b"), "relu_b")
    x = b.node("Concat", [c, a], "concat", axis=1)
    x = b.relu(b.conv(x, 12, 8, "conv_c"), "relu_c")
    return b.build("blocked", "input", [3, 8, 8], b.gemm(b.gap_flatten(x), 8, CLASSES, "fc"), batch)


def shared_weight(batch="N", opset: int = 13, seed: int = 9) -> onnx.ModelProto:
    """conv_s1 and conv_s2 read one weight initializer (a tied / looped layer). conv1 keeps its BN, so pruning it
    would mean slicing the shared weight."""
    b = Builder(seed, opset)
    x = b.relu(b.conv("input", 3, 6, "conv0"), "relu0")
    x = b.relu(b.bn(b.conv(x, 6, 6, "conv1", bias=False), 6, "bn1"), "relu1")
    w = b.init("shared.weight", b.normal((6, 6, 3, 3), 54))
    x = b.relu(b.node("Conv", [x, w], "conv_s1", kernel_shape=[3, 3], pads=[1] * 4), "relu_s1")
    x = b.relu(b.node("Conv", [x, w], "conv_s2", kernel_shape=[3, 3], pads=[1] * 4), "relu_s2")
    x = b.relu(b.conv(x, 6, 8, "conv3"), "relu3")
    return b.build("shared_weight", "input", [3, 8, 8], b.gemm(b.gap_flatten(x), 8, CLASSES, "fc"), batch)


def input_shape(model: onnx.ModelProto, batch: int) -> tuple[int, ...]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return (dims[0].dim_value or batch,) + tuple(d.dim_value for d in dims[1:])


def random_input(model: onnx.ModelProto, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """A feed of random images; a fixed-batch model gets its own batch size."""
    x = np.random.default_rng(seed).normal(size=input_shape(model, batch)).astype(np.float32)
    return {model.graph.input[0].name: x}


def run(model: onnx.ModelProto, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(outputs, feed)


def save(model: onnx.ModelProto, path: Path, *, external: bool = False) -> Path:
    """Write `model` to `path`; with external=True every weight goes to `<name>.data` beside it."""
    path = Path(path)
    if external:
        clone = onnx.ModelProto()
        clone.CopyFrom(model)   # save_model moves tensors out of the proto it is given
        onnx.save_model(clone, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)
    else:
        onnx.save_model(model, str(path))
    return path


def images(n: int, h: int = 8, w: int = 8, c: int = 3, seed: int = 0) -> np.ndarray:
    """Random uint8 NHWC images, the raw pixels a calibration npz holds."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


BUILDERS = {
    "plain": plain, "with_bn": with_bn, "mobilenet": mobilenet, "resnet": resnet, "tf2onnx": tf2onnx,
    "flat_head": flat_head, "dense": dense, "dynamo": dynamo,
}


def brightest_channel(dtype: int = TensorProto.FLOAT, head: str | None = None, label_first: bool = False,
                      hw: tuple = (8, 8), batch="N") -> onnx.ModelProto:
    """A classifier that works, for tests that need a sane original (the sanity gate refuses random ones):
    class c = the brightest of the 3 input channels. ReduceMean over H, W → dense fc1 (3→6: the channel means
    and their negatives) → Relu → dense fc2 (6→3, reads the first three). `dtype`: the input's and every
    tensor's element type; bfloat16 (few CPU kernels) is Cast to float32 first. `head`: "softmax" adds a
    Softmax, "normalise" the same as Exp / ReduceSum (probabilities no Softmax op announces). `label_first`
    puts an int64 ArgMax label before the scores among the graph outputs. `hw` may hold dim names."""
    np_type = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
               TensorProto.BFLOAT16: np.float32}[dtype]
    inner = TensorProto.FLOAT if dtype == TensorProto.BFLOAT16 else dtype
    eye = np.eye(3)
    inits = [numpy_helper.from_array(np.concatenate([eye, -eye]).astype(np_type), "fc1.weight"),
             numpy_helper.from_array(np.zeros(6, np_type), "fc1.bias"),
             numpy_helper.from_array(np.concatenate([eye, 0 * eye], 1).astype(np_type), "fc2.weight"),
             numpy_helper.from_array(np.zeros(3, np_type), "fc2.bias")]
    nodes = []
    x = "input"
    if dtype == TensorProto.BFLOAT16:
        nodes.append(helper.make_node("Cast", [x], ["input_f32"], to=TensorProto.FLOAT))
        x = "input_f32"
    nodes += [helper.make_node("ReduceMean", [x], ["means"], axes=[2, 3], keepdims=0),
              helper.make_node("Gemm", ["means", "fc1.weight", "fc1.bias"], ["fc1_out"], name="fc1", transB=1),
              helper.make_node("Relu", ["fc1_out"], ["relu1_out"], name="relu1"),
              helper.make_node("Gemm", ["relu1_out", "fc2.weight", "fc2.bias"], ["scores"], name="fc2", transB=1)]
    if head == "softmax":
        nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=1))
    elif head == "normalise":
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "sum_axes"))
        nodes += [helper.make_node("Exp", ["scores"], ["exp"]),
                  helper.make_node("ReduceSum", ["exp", "sum_axes"], ["total"], keepdims=1),
                  helper.make_node("Div", ["exp", "total"], ["probs"])]
    out = "scores" if head is None else "probs"
    outputs = [helper.make_tensor_value_info(out, inner, [batch, 3])]
    if label_first:
        nodes.append(helper.make_node("ArgMax", [out], ["label"], axis=1, keepdims=0))
        outputs.insert(0, helper.make_tensor_value_info("label", TensorProto.INT64, [batch]))
    graph = helper.make_graph(nodes, "brightest_channel",
                              [helper.make_tensor_value_info("input", dtype, [batch, 3, *hw])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tests.models")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def channel_images(n: int, h: int = 8, w: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC images whose class (the label) is their brightest channel: that channel 150..255, the
    others 0..100; classes in turn, so every class holds a third of the images."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.integers(0, 101, size=(n, h, w, 3))
    x[np.arange(n), :, :, y] = rng.integers(150, 256, size=(n, h, w))
    return x.astype(np.uint8), y.astype(np.int64)
