"""Build a TensorRT engine from a (sanitized) ONNX model, for TensorRT 10 and 11.

An engine only runs with the TensorRT version that built it and on the GPU model it was built on
(unless built version-compatible / hardware-compatible), so the facts returned name both.
tensorrt is imported inside the functions: nothing else in the project needs it, and hosts without
it still produce the sanitized ONNX (exit 3)."""
from __future__ import annotations

import ctypes
import re
import tempfile
from pathlib import Path

import onnx

from .atomic import write_bytes
from .errors import BadModel, ExitCode, SanitizeError, require
from .model_io import load_model

# What an engine file is called: `--out` with one of these builds an engine, `compare` loads such a file with TensorRT.
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def is_engine(path: Path) -> bool:
    return Path(path).suffix.lower() in ENGINE_SUFFIXES

# A dynamic batch dimension with no --batch gets this (MIN, OPT, MAX): single images up to a
# moderate batch, tuned for small batches, without the memory a large MAX would reserve.
DEFAULT_DYNAMIC_BATCH = (1, 8, 32)

# --hardware-compat names -> tensorrt.HardwareCompatibilityLevel member names.
HARDWARE_COMPAT = {"same": "NONE", "ampere+": "AMPERE_PLUS"}

# CUdevice_attribute values from cuda.h (stable since CUDA 3.x).
_CU_CC_MAJOR, _CU_CC_MINOR = 75, 76


def no_tensorrt_message(onnx_path: Path | str, out: Path | str) -> str:
    return (f"TensorRT is not installed; the ONNX model is usable as is; build the engine on the GPU host with: "
            f"sanitize build {onnx_path} --out {out}")


def api_generation(version: str) -> int:
    """10 for TensorRT 10.x (weakly typed builder flags), 11 for 11.x and later (strongly typed only)."""
    m = re.match(r"\s*(\d+)\.", str(version) + ".")
    if not m:
        raise SanitizeError(f"cannot read the TensorRT version {version!r}", ExitCode.NO_ENGINE)
    major = int(m.group(1))
    if major < 10:
        raise SanitizeError(f"TensorRT {version} is not supported; install TensorRT 10 or 11", ExitCode.NO_ENGINE)
    # Later majors are assumed to keep 11's strongly typed API; the report records the real version.
    return 10 if major == 10 else 11


def parse_batch(text: str) -> tuple[int, int, int]:
    """'1,8,32' -> (1, 8, 32); a single number N means a fixed batch (N, N, N)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise SanitizeError(f"--batch must be MIN,OPT,MAX integers, got {text!r}", ExitCode.USAGE) from None
    if len(values) == 1:
        values *= 3
    if len(values) != 3:
        raise SanitizeError(f"--batch must be MIN,OPT,MAX (three integers), got {text!r}", ExitCode.USAGE)
    lo, opt, hi = values
    if not 1 <= lo <= opt <= hi:
        raise SanitizeError(f"--batch needs 1 <= MIN <= OPT <= MAX, got {text!r}", ExitCode.USAGE)
    return lo, opt, hi


def hardware_compat_level(name: str) -> str:
    """Map --hardware-compat to the tensorrt.HardwareCompatibilityLevel member name."""
    try:
        return HARDWARE_COMPAT[name.strip().lower()]
    except KeyError:
        raise SanitizeError(f"--hardware-compat must be one of {', '.join(HARDWARE_COMPAT)}, got {name!r}",
                            ExitCode.USAGE) from None


def _is_dynamic(dim) -> bool:
    return dim is None or isinstance(dim, str) or int(dim) <= 0


def profile_shapes(input_shape: list, batch: tuple[int, int, int] | None
                   ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(MIN, OPT, MAX) shapes of one input. Only the batch (first) dimension may be dynamic
    (a name, None or -1); a fixed batch makes all three equal and rejects a different --batch."""
    shape = list(input_shape)
    if not shape:
        raise BadModel("a scalar model input cannot take a batch profile")
    rest = shape[1:]
    if any(_is_dynamic(d) for d in rest):
        raise BadModel(f"input shape {shape} has a dynamic non-batch dimension; export the model with a fixed image size")
    rest = [int(d) for d in rest]
    if _is_dynamic(shape[0]):
        lo, opt, hi = batch if batch is not None else DEFAULT_DYNAMIC_BATCH
    else:
        fixed = int(shape[0])
        if batch is not None and tuple(batch) != (fixed,) * 3:
            raise SanitizeError(f"the model has a fixed batch of {fixed}; --batch {','.join(map(str, batch))} "
                                f"contradicts it (omit --batch or re-export with a dynamic batch)", ExitCode.USAGE)
        lo = opt = hi = fixed
    if not 1 <= lo <= opt <= hi:
        raise SanitizeError(f"batch profile needs 1 <= MIN <= OPT <= MAX, got {lo},{opt},{hi}", ExitCode.USAGE)
    return (lo, *rest), (opt, *rest), (hi, *rest)


def onnx_input_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Shapes of the real graph inputs (initializers listed as inputs by old exporters excluded)."""
    weights = {t.name for t in model.graph.initializer}
    shapes = {}
    for inp in model.graph.input:
        if inp.name in weights:
            continue
        dims = []
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shapes[inp.name] = dims
    return shapes


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """FP16 copy of the model with FP32 inputs/outputs, for TensorRT 11 which has no FP16 builder flag.

    onnxruntime's float16 converter is used because it ships inside onnxruntime, which every install
    of this project already has (cpu and gpu extras), and is maintained with it; it keeps numerically
    sensitive ops in FP32 by default. NVIDIA's ModelOpt AutoCast would do too but is a large extra
    dependency (onnxconverter-common's converter is the older copy of the same code)."""
    float16 = require("onnxruntime.transformers.float16", "gpu")
    try:
        return float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as e:
        raise BadModel(f"cannot convert the model to FP16: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


def gpu_info() -> dict | None:
    """Name and compute capability of the CUDA device TensorRT builds on (device 0 of
    CUDA_VISIBLE_DEVICES), read through the driver API; None when no driver or GPU is usable."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return None
    dev = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(), ctypes.c_int()
    if (cuda.cuDeviceGetName(name, len(name), dev) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), _CU_CC_MAJOR, dev) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CU_CC_MINOR, dev) != 0):
        return None
    return {"name": name.value.decode(errors="replace"), "compute_capability": f"{major.value}.{minor.value}"}


def _import_tensorrt(onnx_path: Path, out: Path):
    try:
        import tensorrt as trt
    except ImportError:
        raise SanitizeError(no_tensorrt_message(onnx_path, out), ExitCode.NO_ENGINE) from None
    return trt


def _first_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else "no detail"


def build_engine(onnx_path: Path, out: Path, *, fp16: bool = False, workspace_mib: int | None = None,
                 batch: tuple[int, int, int] | None = None, timing_cache: Path | None = None,
                 version_compatible: bool = False, hardware_compat: str = "same") -> dict:
    """Build and atomically write a serialized engine; return the facts a report needs."""
    onnx_path, out = Path(onnx_path), Path(out)
    level = hardware_compat_level(hardware_compat)
    if workspace_mib is not None and workspace_mib < 1:
        raise SanitizeError(f"--workspace must be a positive number of MiB, got {workspace_mib}", ExitCode.USAGE)
    loaded = load_model(onnx_path)
    shapes = onnx_input_shapes(loaded.model)
    profiles = {name: profile_shapes(shape, batch) for name, shape in shapes.items()}

    trt = _import_tensorrt(onnx_path, out)
    generation = api_generation(trt.__version__)
    gpu = gpu_info()
    if gpu is None:
        raise SanitizeError(f"no CUDA GPU is visible; an engine must be built on the GPU it will run on: "
                            f"run sanitize build {onnx_path} --out {out} there", ExitCode.NO_ENGINE)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are explicit-batch by default; TensorRT 11 networks are always strongly
    # typed (its STRONGLY_TYPED flag is ignored), so 0 is right for both.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    config = builder.create_builder_config()

    fp16_method = None
    with tempfile.TemporaryDirectory(prefix="sanitize-fp16-") as tmp:
        source = onnx_path
        if fp16 and generation == 10:
            config.set_flag(trt.BuilderFlag.FP16)
            fp16_method = "TensorRT 10 builder flag FP16"
        elif fp16:
            source = Path(tmp) / "model_fp16.onnx"
            # External data keeps models over protobuf's 2 GiB limit saveable.
            onnx.save_model(convert_fp16(loaded.model), str(source), save_as_external_data=True,
                            all_tensors_to_one_file=True, location="model_fp16.data")
            fp16_method = "ONNX converted to FP16 (onnxruntime float16, FP32 I/O), strongly typed build"
        if not parser.parse_from_file(str(source)):
            errors = [_first_line(parser.get_error(i)) for i in range(parser.num_errors)]
            raise BadModel(f"TensorRT cannot parse {onnx_path}: {errors[0] if errors else 'unknown parser error'}")

        if workspace_mib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
        if version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)

        if any(_is_dynamic(shape[0]) for shape in shapes.values()):
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profiles.items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)

        cache = None
        if timing_cache is not None:
            timing_cache = Path(timing_cache)
            cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
            if not config.set_timing_cache(cache, ignore_mismatch=False):
                raise SanitizeError(f"timing cache {timing_cache} does not match this GPU or TensorRT version; "
                                    f"delete it or pass another --timing-cache", ExitCode.USAGE)

        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise SanitizeError(f"TensorRT {trt.__version__} failed to build an engine for {onnx_path} "
                            f"(see the TensorRT log above); the ONNX model is still usable", ExitCode.NO_ENGINE)
    data = bytes(plan)
    write_bytes(out, data)
    if cache is not None:
        write_bytes(timing_cache, bytes(cache.serialize()))

    return {
        "engine": str(out),
        "engine_bytes": len(data),
        "tensorrt": trt.__version__,
        "api_generation": generation,
        "gpu": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "fp16": fp16,
        "fp16_method": fp16_method,
        "workspace_mib": workspace_mib,
        "version_compatible": version_compatible,
        "hardware_compat": hardware_compat,
        "timing_cache": None if timing_cache is None else str(timing_cache),
        "profile": {name: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                    for name, (lo, opt, hi) in profiles.items()},
        "runs_on": (f"TensorRT {trt.__version__}" + (" or a later version" if version_compatible else "")
                    + (" on Ampere or newer GPUs" if level == "AMPERE_PLUS"
                       else f" on {gpu['name']} (compute capability {gpu['compute_capability']})")),
    }
