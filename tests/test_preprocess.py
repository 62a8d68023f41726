import numpy as np
import pytest
from onnx import TensorProto, helper

from calib.preprocess import InputSpec, Preprocess, input_spec, parse_floats, parse_size, resolve_preprocess
from sanitizer.errors import ExitCode, SanitizeError


def model(*inputs, initializers=(), outputs=(("out", TensorProto.FLOAT, None, "Identity"),)):
    """A graph that only declares inputs and outputs (each written by one op on the first input):
    input_spec never looks further."""
    infos = [helper.make_tensor_value_info(name, elem, shape) for name, elem, shape in inputs]
    outs = [helper.make_tensor_value_info(name, elem, shape) for name, elem, shape, _ in outputs]
    nodes = [helper.make_node(op, [inputs[0][0]], [name]) for name, _, _, op in outputs]
    graph = helper.make_graph(nodes, "g", infos, outs, initializer=list(initializers))
    return helper.make_model(graph)


def fails(code, fn, *args, **kwargs) -> str:
    with pytest.raises(SanitizeError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code
    assert "\n" not in str(info.value)
    return str(info.value)


def spec(channels=3, layout="nchw"):
    return InputSpec(name="x", layout=layout, channels=channels, height=2, width=2, batch=None, dtype="float32",
                     output="out")


# ------------------------------------------------------------------------------------- input_spec

def test_nchw_with_dynamic_batch():
    s = input_spec(model(("x", TensorProto.FLOAT, ["N", 3, 32, 24])))
    assert s == InputSpec(name="x", layout="nchw", channels=3, height=32, width=24, batch=None, dtype="float32",
                          output="out", output_kind="logits")


def test_nhwc_with_fixed_batch():
    s = input_spec(model(("img", TensorProto.FLOAT, [8, 28, 20, 1])))
    assert (s.layout, s.channels, s.height, s.width, s.batch) == ("nhwc", 1, 28, 20, 8)


def test_unnamed_dynamic_batch_and_other_float_types():
    s = input_spec(model(("x", TensorProto.FLOAT16, [None, 1, 4, 4])))
    assert s.batch is None and s.dtype == "float16"
    assert input_spec(model(("x", TensorProto.DOUBLE, [1, 3, 4, 4]))).dtype == "float64"
    assert input_spec(model(("x", TensorProto.BFLOAT16, [1, 3, 4, 4]))).dtype == "bfloat16"


def test_ambiguous_shape_defaults_to_nchw_unless_layout_given():
    m = model(("x", TensorProto.FLOAT, [1, 3, 8, 3]))
    assert (input_spec(m).layout, input_spec(m).channels, input_spec(m).width) == ("nchw", 3, 3)
    s = input_spec(m, layout="nhwc")
    assert (s.layout, s.channels, s.height, s.width) == ("nhwc", 3, 3, 8)


def test_layout_contradicting_the_shape_is_a_usage_error():
    msg = fails(ExitCode.USAGE, input_spec, model(("x", TensorProto.FLOAT, [1, 3, 32, 32])), layout="nhwc")
    assert "nchw" in msg
    fails(ExitCode.USAGE, input_spec, model(("x", TensorProto.FLOAT, [1, 32, 32, 3])), layout="nchw")
    fails(ExitCode.USAGE, input_spec, model(("x", TensorProto.FLOAT, [1, 3, 32, 32])), layout="chw")


def test_int_input_is_a_bad_model():
    msg = fails(ExitCode.BAD_MODEL, input_spec, model(("ids", TensorProto.INT64, [1, 3, 4, 4])))
    assert msg == "input ids is int64, not a float image tensor"


@pytest.mark.parametrize("shape", [[1, 3, 32], [1, 3, 4, 4, 4], None])
def test_rank_must_be_four(shape):
    fails(ExitCode.BAD_MODEL, input_spec, model(("x", TensorProto.FLOAT, shape)))


def test_dynamic_channels_are_a_bad_model():
    fails(ExitCode.BAD_MODEL, input_spec, model(("x", TensorProto.FLOAT, [1, "C", 32, 32])))
    # with neither end static the layout was not read off the model: the line says it was assumed
    msg = fails(ExitCode.BAD_MODEL, input_spec, model(("x", TensorProto.FLOAT, ["N", "H", "W", "C"])))
    assert "assumed" in msg and "channel count must be static" in msg, msg
    msg = fails(ExitCode.BAD_MODEL, input_spec, model(("x", TensorProto.FLOAT, ["N", "H", "W", "C"])), layout="nhwc")
    assert "(as nhwc)" in msg, msg


@pytest.mark.parametrize("shape", [[1, 3, "H", 32], [1, 3, 32, None], ["N", "H", "W", 3]])
def test_dynamic_height_or_width_needs_input_size(shape):
    assert "--input-size" in fails(ExitCode.USAGE, input_spec, model(("x", TensorProto.FLOAT, shape)))
    s = input_spec(model(("x", TensorProto.FLOAT, shape)), size=(32, 32))
    assert (s.height, s.width, s.channels) == (32, 32, 3)


def test_input_size_contradicting_a_fixed_size_is_a_usage_error():
    msg = fails(ExitCode.USAGE, input_spec, model(("x", TensorProto.FLOAT, [1, 3, "H", 32])), size=(16, 16))
    assert "fixed width of 32" in msg
    assert input_spec(model(("x", TensorProto.FLOAT, [1, 3, 8, 32])), size=(8, 32)).height == 8


@pytest.mark.parametrize("text,size", [("224x160", (224, 160)), ("32X32", (32, 32)), ("8,4", (8, 4)), (None, None)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["224", "0x4", "ax4", "1x2x3", "-3x3", "99999x2"])
def test_parse_size_refuses(text):
    assert "--input-size" in fails(ExitCode.USAGE, parse_size, text)


# --------------------------------------------------------------------------------- classifier output

IMG = ("x", TensorProto.FLOAT, ["N", 1, 4, 4])


def test_the_float_output_is_chosen_over_an_integer_label():
    m = model(IMG, outputs=(("label", TensorProto.INT64, ["N"], "ArgMax"),
                            ("logits", TensorProto.FLOAT, ["N", 10], "Flatten")))
    assert (input_spec(m).output, input_spec(m).output_kind) == ("logits", "logits")
    msg = fails(ExitCode.USAGE, input_spec, m, output_name="label")
    assert "label (int64 [N])" in msg and "logits (float [N,10])" in msg


def test_several_float_score_outputs_need_output_name():
    m = model(IMG, outputs=(("logits", TensorProto.FLOAT, ["N", 10], "Flatten"),
                            ("probs", TensorProto.FLOAT, ["N", 10], "Softmax")))
    msg = fails(ExitCode.USAGE, input_spec, m)
    assert "--output-name" in msg and "logits" in msg and "probs" in msg
    assert input_spec(m, output_name="logits").output_kind == "logits"
    assert input_spec(m, output_name="probs").output_kind == "probabilities"
    assert "no output named 'p'" in fails(ExitCode.USAGE, input_spec, m, output_name="p")


def test_outputs_that_are_not_class_scores_are_passed_over():
    # a feature map [N, C, H, W] is not a score vector; [N, K, 1, 1] is
    m = model(IMG, outputs=(("features", TensorProto.FLOAT, ["N", 1, 4, 4], "Identity"),
                            ("scores", TensorProto.FLOAT, ["N", 10, 1, 1], "Identity")))
    assert input_spec(m).output == "scores"


def test_no_float_output_is_a_bad_model():
    m = model(IMG, outputs=(("label", TensorProto.INT64, ["N"], "ArgMax"),))
    assert "no float [N, classes] output" in fails(ExitCode.BAD_MODEL, input_spec, m)


def test_initializers_are_not_inputs():
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [1.0, 2.0, 3.0])
    m = model(("x", TensorProto.FLOAT, [1, 3, 4, 4]), ("w", TensorProto.FLOAT, [1, 3, 1, 1]), initializers=[w])
    assert input_spec(m).name == "x"


@pytest.mark.parametrize("name", [None, "img"])
def test_inputs_besides_the_image_are_refused(name):
    """onnxruntime needs every input without an initializer, and only images can be fed: naming the image input
    does not make a model with another input runnable."""
    m = model(("img", TensorProto.FLOAT, [1, 3, 4, 4]), ("scale", TensorProto.FLOAT, [1]))
    msg = fails(ExitCode.BAD_MODEL, input_spec, m, name)
    assert "img" in msg and "scale" in msg
    two = model(("a", TensorProto.FLOAT, [1, 3, 4, 4]), ("b", TensorProto.FLOAT, [1, 1, 4, 4]))
    fails(ExitCode.BAD_MODEL, input_spec, two, name)


def test_an_unknown_input_name_is_a_usage_error():
    fails(ExitCode.USAGE, input_spec, model(IMG), "c")


# ------------------------------------------------------------------------------------- Preprocess

def test_apply_matches_hand_computation_and_transposes():
    raw = np.arange(2 * 2 * 3 * 3, dtype=np.float32).reshape(2, 2, 3, 3)   # N=2, H=2, W=3, C=3
    mean, std, scale = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0], 1 / 255
    p = resolve_preprocess(spec(), scale=scale, mean=mean, std=std)
    out = p.apply(raw)
    assert out.dtype == np.float32 and out.shape == (2, 3, 2, 3)
    for n in range(2):
        for h in range(2):
            for w in range(3):
                for c in range(3):
                    expected = (raw[n, h, w, c] / 255 - mean[c]) / std[c]
                    assert out[n, c, h, w] == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_apply_nhwc_keeps_layout_and_broadcasts_single_values():
    raw = np.full((1, 2, 2, 3), 255, dtype=np.float32)
    out = resolve_preprocess(spec(layout="nhwc"), mean=[0.5], std=[0.5]).apply(raw)
    assert out.shape == (1, 2, 2, 3) and np.all(out == 1.0)


def test_apply_accepts_uint8_and_is_float32():
    out = Preprocess(scale=1.0, mean=(0.0,), std=(1.0,), layout="nchw").apply(np.zeros((1, 2, 2, 1), np.uint8))
    assert out.dtype == np.float32 and out.shape == (1, 1, 2, 2)


def test_defaults_and_to_dict():
    p = resolve_preprocess(spec())
    assert p.to_dict() == {"scale": 1 / 255, "mean": [0.0], "std": [1.0], "layout": "nchw"}


@pytest.mark.parametrize("kwargs", [
    {"mean": [0.1, 0.2]},
    {"std": [1, 1, 1, 1]},
    {"std": [1, 0, 1]},
    {"std": [float("nan")]},
    {"mean": [float("inf")]},
    {"scale": 0},
    {"scale": -1.0},
    {"scale": float("inf")},
    {"layout": "nhwc"},
])
def test_bad_preprocess_flags_are_usage_errors(kwargs):
    fails(ExitCode.USAGE, resolve_preprocess, spec(), **kwargs)


def test_parse_floats():
    assert parse_floats(None) is None
    assert parse_floats("0.5") == [0.5]
    assert parse_floats(" 0.485, 0.456,0.406 ") == [0.485, 0.456, 0.406]
    assert parse_floats("[1,2]") == [1.0, 2.0]
    for bad in ["", "a", "1,,2", "1;2", "nan", "1,inf"]:
        fails(ExitCode.USAGE, parse_floats, bad)
