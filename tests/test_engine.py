"""Engine building: pure helpers everywhere; the real TensorRT build only where TensorRT and a GPU exist."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
import typer
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from sanitizer import cli_deploy, engine
from sanitizer.errors import ExitCode, SanitizeError

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def tiny_classifier(batch="N", classes=5, seed=0) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm over 3x8x8 images."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    fc = numpy_helper.from_array(rng.normal(size=(4, classes)).astype(np.float32), "fc")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        [w, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def code_of(fn, *args, **kwargs) -> ExitCode:
    with pytest.raises(SanitizeError) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return info.value.code


# ------------------------------------------------------------------------------------- helpers

@pytest.mark.parametrize("version, generation", [("10.0.1", 10), ("10.11.0.33", 10), ("11.0.0", 11),
                                                 ("11.4.1.2", 11), ("12.1", 11)])
def test_api_generation(version, generation):
    assert engine.api_generation(version) == generation


@pytest.mark.parametrize("version", ["8.6.1", "9.3.0", "", "trt"])
def test_api_generation_refuses_old_or_unreadable_versions(version):
    assert code_of(engine.api_generation, version) == ExitCode.NO_ENGINE


def test_parse_batch():
    assert engine.parse_batch("1,8,32") == (1, 8, 32)
    assert engine.parse_batch(" 2, 2 ,4") == (2, 2, 4)
    assert engine.parse_batch("16") == (16, 16, 16)


@pytest.mark.parametrize("text", ["1,8", "1,2,3,4", "8,4,16", "1,32,8", "0,1,2", "a,b,c", ""])
def test_parse_batch_rejects(text):
    assert code_of(engine.parse_batch, text) == ExitCode.USAGE


def test_hardware_compat_level():
    assert engine.hardware_compat_level("same") == "NONE"
    assert engine.hardware_compat_level("Ampere+") == "AMPERE_PLUS"
    assert code_of(engine.hardware_compat_level, "any") == ExitCode.USAGE


def test_profile_dynamic_batch():
    assert engine.profile_shapes(["N", 3, 8, 8], None) == ((1, 3, 8, 8), (8, 3, 8, 8), (32, 3, 8, 8))
    assert engine.profile_shapes([None, 3, 8, 8], (2, 4, 6)) == ((2, 3, 8, 8), (4, 3, 8, 8), (6, 3, 8, 8))
    assert engine.profile_shapes([-1, 8, 8, 3], (1, 1, 1)) == ((1, 8, 8, 3),) * 3


def test_profile_fixed_batch():
    assert engine.profile_shapes([4, 3, 8, 8], None) == ((4, 3, 8, 8),) * 3
    assert engine.profile_shapes([4, 3, 8, 8], (4, 4, 4)) == ((4, 3, 8, 8),) * 3
    assert code_of(engine.profile_shapes, [1, 3, 8, 8], (1, 8, 32)) == ExitCode.USAGE


def test_profile_rejects_bad_shapes_and_orders():
    assert code_of(engine.profile_shapes, ["N", 3, "H", "W"], None) == ExitCode.BAD_MODEL
    assert code_of(engine.profile_shapes, [], None) == ExitCode.BAD_MODEL
    assert code_of(engine.profile_shapes, ["N", 3, 8, 8], (8, 4, 16)) == ExitCode.USAGE
    assert code_of(engine.profile_shapes, ["N", 3, 8, 8], (0, 1, 1)) == ExitCode.USAGE


def test_onnx_input_shapes_skips_initializers():
    model = tiny_classifier()
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3, 3, 3]))
    assert engine.onnx_input_shapes(model) == {"x": ["N", 3, 8, 8]}


def test_fp16_conversion_keeps_io_and_predictions():
    """The TensorRT 11 FP16 path's conversion, run for real with onnxruntime."""
    import onnxruntime as ort

    model = tiny_classifier()
    half = engine.convert_fp16(model)
    assert {t.data_type for t in half.graph.initializer} == {TensorProto.FLOAT16}
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(1).random((16, 3, 8, 8), dtype=np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    full, reduced = run(model), run(half)
    assert reduced.dtype == np.float32
    np.testing.assert_allclose(reduced, full, atol=1e-2, rtol=1e-2)
    assert (reduced.argmax(1) == full.argmax(1)).mean() >= 0.9


def test_usage_errors_come_before_the_tensorrt_check(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_classifier(batch=1), path)
    assert code_of(engine.build_engine, path, tmp_path / "m.engine", hardware_compat="all") == ExitCode.USAGE
    assert code_of(engine.build_engine, path, tmp_path / "m.engine", batch=(1, 8, 32)) == ExitCode.USAGE
    assert code_of(engine.build_engine, path, tmp_path / "m.engine", workspace_mib=0) == ExitCode.USAGE
    assert not (tmp_path / "m.engine").exists()


def test_bad_model_is_reported_before_the_tensorrt_check(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not an onnx file")
    assert code_of(engine.build_engine, path, tmp_path / "m.engine") == ExitCode.BAD_MODEL


# ------------------------------------------------------------------------------ no TensorRT here

@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT path cannot happen here")
def test_missing_tensorrt_exits_no_engine_with_one_line(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_classifier(), path)
    out = tmp_path / "m.engine"
    with pytest.raises(SanitizeError) as info:
        engine.build_engine(path, out, fp16=True)
    assert info.value.code == ExitCode.NO_ENGINE == 3
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("TensorRT is not installed")
    assert f"sanitize build {path} --out {out}" in message
    assert not out.exists()


# --------------------------------------------------------------------------------------- the CLI

def run_cli(args: list[str]):
    """Register into a bare app and map SanitizeError to its exit code, as the main CLI does."""
    app = typer.Typer()
    cli_deploy.register(app)
    result = CliRunner().invoke(app, args)
    if isinstance(result.exception, SanitizeError):
        return int(result.exception.code), str(result.exception)
    return result.exit_code, result.output


def test_cli_build_checks_out_path_first(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_classifier(), path)
    code, message = run_cli(["build", str(path), "--out", str(tmp_path / "missing" / "m.engine")])
    assert code == ExitCode.OUTPUT
    (tmp_path / "m.engine").write_bytes(b"old")
    code, message = run_cli(["build", str(path), "--out", str(tmp_path / "m.engine")])
    assert code == ExitCode.OUTPUT and "--force" in message
    code, _ = run_cli(["build", str(path), "--out", str(path), "--force"])
    assert code == ExitCode.OUTPUT


def test_cli_build_usage_errors(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_classifier(), path)
    code, _ = run_cli(["build", str(path), "--out", str(tmp_path / "m.engine"), "--batch", "8,4,16"])
    assert code == ExitCode.USAGE
    code, _ = run_cli(["build", str(path), "--out", str(tmp_path / "m.engine"), "--hardware-compat", "all"])
    assert code == ExitCode.USAGE


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the missing-TensorRT path cannot happen here")
def test_cli_build_without_tensorrt_exits_3(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_classifier(), path)
    code, message = run_cli(["build", str(path), "--out", str(tmp_path / "m.engine"), "--fp16"])
    assert code == ExitCode.NO_ENGINE == 3
    assert message.startswith("TensorRT is not installed")
    assert not (tmp_path / "m.engine").exists()


# ------------------------------------------------------------------------- real TensorRT + a GPU

def _require_tensorrt_and_gpu():
    if not HAS_TENSORRT:
        pytest.skip("TensorRT is not installed here; real engine builds need the GPU host (NGC image)")
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # a broken install (e.g. missing CUDA libraries) is still 'no TensorRT'
        pytest.skip(f"tensorrt does not import here ({type(e).__name__}: {e})")
    if engine.gpu_info() is None:
        pytest.skip("no CUDA GPU visible; TensorRT engines can only be built on a GPU")


@pytest.mark.parametrize("fp16", [False, True])
def test_real_engine_build_and_agreement(tmp_path, fp16):
    _require_tensorrt_and_gpu()
    from sanitizer.compare import run_outputs

    path = tmp_path / "m.onnx"
    onnx.save(tiny_classifier(), path)
    out = tmp_path / "m.engine"
    cache = tmp_path / "timing.cache"
    facts = engine.build_engine(path, out, fp16=fp16, batch=(1, 4, 8), timing_cache=cache, workspace_mib=256)
    assert out.stat().st_size == facts["engine_bytes"] > 0
    assert cache.stat().st_size > 0
    assert facts["api_generation"] in (10, 11) and facts["gpu"]
    assert facts["profile"]["x"] == {"min": [1, 3, 8, 8], "opt": [4, 3, 8, 8], "max": [8, 3, 8, 8]}
    assert (facts["fp16_method"] is not None) == fp16
    json.dumps(facts)

    x = np.random.default_rng(2).random((8, 3, 8, 8), dtype=np.float32)
    onnx_out, engine_out = run_outputs([path, out], [{"x": x}])
    np.testing.assert_allclose(engine_out["logits"], onnx_out["logits"], atol=5e-2 if fp16 else 1e-3, rtol=5e-2)


def test_real_engine_fixed_batch(tmp_path):
    _require_tensorrt_and_gpu()
    path = tmp_path / "m.onnx"
    onnx.save(tiny_classifier(batch=2), path)
    facts = engine.build_engine(path, tmp_path / "m.engine", hardware_compat="same")
    assert facts["profile"]["x"]["min"] == facts["profile"]["x"]["max"] == [2, 3, 8, 8]
