"""Compare models (ONNX and TensorRT engines) on the same images with polygraphy's Comparator.

Top-1 agreement is the number that matters for a sanitized classifier: it must match the original on
clean images, and is expected to differ on triggered ones (that is the backdoor being gone)."""
from __future__ import annotations

import importlib.util
import shlex
from collections import OrderedDict
from dataclasses import replace
from itertools import combinations, islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from calib.data import open_dataset
from calib.preprocess import input_spec, resolve_preprocess
from calib.session import make_session

from .atomic import write_text
from .engine import is_engine
from .errors import BadModel, ExitCode, SanitizeError
from .model_io import load_model

# Comparator.run keeps every input of a call in memory, so the data goes through it this many
# batches at a time; runners are built once and reused across calls.
CHUNK_BATCHES = 16


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _quiet():
    """polygraphy's logger silenced for a `with` block. verbosity() alone leaves CRITICAL on, and polygraphy
    logs a CRITICAL line (plus, without the `colored` module, a [W] line on stdout) before each exception it
    raises; the exception reaches the user as the one `error:` line instead."""
    from polygraphy.logger import G_LOGGER

    return G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1)



def _load_runner(path: Path, name: str):
    """A polygraphy runner whose session/engine is loaded now, so activating it per chunk is cheap."""
    from polygraphy.exception import PolygraphyException

    path = Path(path)
    if not path.is_file():
        raise BadModel(f"model {path} does not exist")
    if is_engine(path):
        if importlib.util.find_spec("tensorrt") is None:
            raise SanitizeError(f"TensorRT is not installed, so {path} cannot be run; compare engines on the GPU host",
                                ExitCode.MISSING_DEP)
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        try:
            with _quiet():
                loaded = EngineFromBytes(BytesFromPath(str(path)))()
        except (PolygraphyException, RuntimeError) as e:
            raise BadModel(f"engine {path} cannot be loaded here ({_first_line(e)}); engines only run with the "
                           f"TensorRT version and GPU that built them: rebuild it with sanitize build") from None
        return TrtRunner(loaded, name=name)

    from polygraphy.backend.onnxrt import OnnxrtRunner

    # load_model refuses hostile or invalid files before onnxruntime parses them; make_session keeps
    # onnxruntime's warnings (initializers that are also graph inputs...) off stderr unless --debug
    try:
        session, _ = make_session(load_model(path).model, providers=["CPUExecutionProvider"])
    except BadModel as e:
        raise BadModel(f"{path}: {e}") from None
    return OnnxrtRunner(session, name=name)


def _load_runners(models: list[Path]) -> list:
    return [_load_runner(path, f"{i}:{Path(path).name}") for i, path in enumerate(models)]


def _shape(shape) -> str:
    return "[" + ", ".join("?" if d is None or (isinstance(d, int) and d < 0) else str(d) for d in shape) + "]"


def _input_metadata(runners: list, models: list[Path]) -> list[tuple[Path, object]]:
    """(model, polygraphy TensorMetadata of its inputs or None when it cannot be read), per runner; read once
    (activating a TensorRT runner creates an execution context), checked against every chunk of feeds."""
    metas = []
    for runner, path in zip(runners, models):
        try:
            with _quiet(), runner:
                try:
                    meta = runner.get_input_metadata(use_numpy_dtypes=False)
                except TypeError:  # polygraphy before 0.50 has no such flag (and only numpy dtypes)
                    meta = runner.get_input_metadata()
        except Exception:
            meta = None  # the run itself reports what is wrong with this model
        metas.append((Path(path), meta))
    return metas


def _input_mismatch(inputs: list[tuple[Path, object]], feeds: list[dict]) -> str | None:
    """Why some model cannot take `feeds` as they are; None when every model can.

    Checked before inference because polygraphy "rescues" an input of the wrong shape by transposing or
    reshaping it (50 images of 3x6x6 become 540 rows for a model taking [N, 10]), which compares nothing,
    and otherwise fails with a log of its own. Dtypes are left to polygraphy, which casts (an FP16 engine
    gets the float32 images as float16), and so are names when model and data have one input each."""
    from polygraphy.util import is_valid_shape_override

    seen = set()
    for feed in feeds:
        key = tuple((name, np.shape(x)) for name, x in feed.items())
        if key in seen:
            continue
        seen.add(key)
        fed = ", ".join(f"{name} {_shape(np.shape(x))} {np.asarray(x).dtype}" for name, x in feed.items())
        for path, meta in inputs:
            if meta is None:
                continue
            for name, (dtype, shape) in meta.items():
                if name in feed:
                    x = feed[name]
                elif len(meta) == 1 and len(feed) == 1:
                    x = next(iter(feed.values()))
                else:
                    return (f"{path} takes input {name}, which compare does not feed (it feeds every model {fed}); "
                            "compare needs models with the same input")
                if shape is None or is_valid_shape_override(tuple(np.shape(x)), tuple(shape)):
                    continue
                hint = ""
                if (len(shape) == np.ndim(x) and isinstance(shape[0], int) and shape[0] > 0 and not is_engine(path)
                        and is_valid_shape_override(np.shape(x)[1:], tuple(shape)[1:])):
                    hint = (f"; it takes batches of exactly {shape[0]}, another model batches of another fixed size, "
                            "and compare feeds every model the same batches")
                return (f"{path} takes input {name} {_shape(shape)} {dtype}, but compare feeds every model {fed}"
                        + (hint or "; compare needs models with the same input"))
    return None


def _run(runners: list, feeds: list[dict], inputs: list | None = None) -> list[dict[str, np.ndarray]]:
    """Outputs of every runner over `feeds`, concatenated along the batch axis; `inputs` (from
    _input_metadata) has the feeds checked against every model first."""
    from polygraphy.comparator import Comparator
    from polygraphy.exception import PolygraphyException

    if inputs is not None and (why := _input_mismatch(inputs, feeds)):
        raise BadModel(why)
    try:
        with _quiet():
            results = Comparator.run(runners, data_loader=feeds)
    except PolygraphyException as e:
        raise BadModel(f"inference failed: {_first_line(e)}") from None
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        # a model that loads but cannot execute (a Reshape to a fixed batch...): polygraphy lets it through
        raise BadModel(f"inference failed: onnxruntime cannot run a model: {_first_line(e)[:300]}") from None
    outputs = []
    for runner in runners:
        iterations = results[runner.name]
        names = list(iterations[0].keys())
        outputs.append({name: np.concatenate([np.asarray(it[name]) for it in iterations]) for name in names})
    return outputs


def run_outputs(models: list[Path], feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    """Run each model on the same feed dicts; per model, its outputs concatenated over the feeds."""
    runners = _load_runners(models)
    return _run(runners, feeds, _input_metadata(runners, models))


def _fixed_batch(meta, name: str) -> int | None:
    """The fixed first dimension of input `name` in a runner's input metadata (_input_metadata), or None
    (dynamic, no such input, or metadata that could not be read)."""
    if meta is None or name not in meta:
        return None
    _, shape = meta[name]
    return shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None


def _feeds(dataset, preprocess, spec, batch_size: int) -> Iterator[tuple[int, OrderedDict]]:
    """(real image count, feed dict) per batch; fixed-batch models get full batches."""
    for _, raw in dataset.batches(batch_size):
        x = preprocess.apply(raw).astype(spec.dtype, copy=False)
        n = len(x)
        if spec.batch is not None and n < spec.batch:
            # A fixed-batch model only takes full batches: repeat the last image, drop its outputs after.
            x = np.concatenate([x, np.repeat(x[-1:], spec.batch - n, axis=0)])
        yield n, OrderedDict([(spec.name, x)])


def _top1(a: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1)
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        return a  # already labels: rows must match exactly
    return a.argmax(axis=1)


class _PairStats:
    def __init__(self):
        self.n = self.agree = self.elements = 0
        self.abs_sum = 0.0
        self.abs_max = 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        ta, tb = _top1(a), _top1(b)
        same = ta == tb if ta.ndim == 1 else (ta == tb).all(axis=1)
        self.n += len(a)
        self.agree += int(same.sum())
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        self.elements += diff.size
        self.abs_sum += float(diff.sum())
        if diff.size:
            self.abs_max = max(self.abs_max, float(diff.max()))

    def result(self) -> dict:
        return {
            "agreement": self.agree / self.n if self.n else float("nan"),
            "max_abs_diff": self.abs_max,
            "mean_abs_diff": self.abs_sum / self.elements if self.elements else float("nan"),
            "images": self.n,
        }


def _common_outputs(outputs: list[dict[str, np.ndarray]], models: list[Path], output: str) -> list[str]:
    """[output], the classifier output of the first ONNX model, once every model is seen to have it."""
    names = [output] if all(output in o for o in outputs) else []
    if not names:
        raise BadModel(f"not every model has the output {output} ({', '.join(map(str, models))}); compare needs "
                       "matching outputs")
    for name in names:
        shapes = {o[name].shape[1:] for o in outputs}
        if len(shapes) > 1:
            raise BadModel(f"output {name} has different per-image shapes across models: {sorted(shapes)}")
    return names


def _compare_set(runners, models, data: Path, spec, preprocess, batch_size: int,
                 saved: list | None, inputs: list | None = None) -> dict:
    dataset = open_dataset(data, size=(spec.height, spec.width), channels=spec.channels)
    if dataset.n == 0:
        raise SanitizeError(f"{data} holds no images", ExitCode.BAD_DATA)
    stats: dict[tuple[int, int, str], _PairStats] = {}
    names = None
    feeds = _feeds(dataset, preprocess, spec, batch_size)
    while chunk := list(islice(feeds, CHUNK_BATCHES)):
        counts = [n for n, _ in chunk]
        fed = [feed for _, feed in chunk]
        if saved is not None:
            saved.extend(fed)
        outputs = _run(runners, fed, inputs)
        if spec.batch is not None:
            keep = np.concatenate([np.arange(n) + k * spec.batch for k, n in enumerate(counts)])
            outputs = [{name: arr[keep] for name, arr in out.items()} for out in outputs]
        names = names or _common_outputs(outputs, models, spec.output)
        for i, j in combinations(range(len(runners)), 2):
            for name in names:
                stats.setdefault((i, j, name), _PairStats()).add(outputs[i][name], outputs[j][name])
    pairs = [{"a": str(models[i]), "b": str(models[j]), "output": name, **s.result()}
             for (i, j, name), s in stats.items()]
    return {"data": str(data), "images": dataset.n, "pairs": pairs,
            "min_agreement": min(p["agreement"] for p in pairs)}


def compare_models(models: list[Path], data: Path, *, triggered: Path | None = None, scale: float = 1 / 255,
                   mean: list[float] | None = None, std: list[float] | None = None, layout: str | None = None,
                   input_name: str | None = None, output_name: str | None = None,
                   input_size: tuple[int, int] | None = None, min_agreement: float = 0.99, batch_size: int = 64,
                   save_inputs: Path | None = None) -> dict:
    """Pairwise top-1 agreement and absolute output differences on `data` (and `triggered`), on the
    classifier output (InputSpec.output of the first ONNX model; --output-name when it has several).

    `passed` is False when any pair agrees on less than `min_agreement` of the clean images; the
    triggered set is informational only, since a sanitized model should disagree there. "polygraphy" holds
    the equivalent polygraphy lines; without `save_inputs` they start with the `sanitize compare` line that
    writes the inputs.json they load."""
    models = [Path(m) for m in models]
    if len(models) < 2:
        raise SanitizeError("compare needs at least two models", ExitCode.USAGE)
    if not 0.0 <= min_agreement <= 1.0:
        raise SanitizeError(f"--min-agreement must be within 0..1, got {min_agreement}", ExitCode.USAGE)
    if batch_size < 1:
        raise SanitizeError(f"batch size must be positive, got {batch_size}", ExitCode.USAGE)
    onnx_models = [m for m in models if not is_engine(m)]
    if not onnx_models:
        raise SanitizeError("compare needs at least one .onnx model to read the input shape from", ExitCode.USAGE)

    spec = input_spec(load_model(onnx_models[0]).model, input_name=input_name, layout=layout,
                      output_name=output_name, size=input_size)
    if spec.dtype == "bfloat16":
        raise SanitizeError(f"input {spec.name} is bfloat16, which polygraphy's runners cannot be fed from numpy; "
                            "compare the models with `sanitize evaluate` instead", ExitCode.BAD_MODEL)
    preprocess = resolve_preprocess(spec, scale=scale, mean=mean, std=std, layout=layout)
    runners = _load_runners(models)
    inputs = _input_metadata(runners, models)
    if spec.batch is None:
        # an ONNX model that takes batches of exactly N anywhere in the list sets the batch for all: the others
        # take any batch, and the last one is padded (_feeds)
        spec = replace(spec, batch=next((b for path, meta in inputs if not is_engine(path)
                                         if (b := _fixed_batch(meta, spec.name))), None))
    if spec.batch is not None:
        batch_size = spec.batch
    saved = [] if save_inputs is not None else None

    clean = _compare_set(runners, models, Path(data), spec, preprocess, batch_size, saved, inputs)
    trig = None if triggered is None else _compare_set(runners, models, Path(triggered), spec, preprocess,
                                                       batch_size, None, inputs)
    if save_inputs is not None:
        from polygraphy.json import to_json

        write_text(save_inputs, to_json(saved))
    return {
        "models": [str(m) for m in models],
        "input": spec.name,
        "preprocess": preprocess.to_dict(),
        "min_agreement": min_agreement,
        "clean": clean,
        "triggered": trig,
        "passed": clean["min_agreement"] >= min_agreement,
        "output": spec.output,
        "polygraphy": polygraphy_command(models, inputs=save_inputs) if save_inputs else
        "\n".join([_saving_command(models, data, scale=scale, mean=mean, std=std, layout=layout, input_name=input_name,
                                   output_name=output_name, input_size=input_size, batch_size=batch_size),
                    polygraphy_command(models)]),
    }


def _saving_command(models: list[Path], data: Path, *, scale, mean, std, layout, input_name, output_name,
                    input_size, batch_size: int, inputs: Path = Path("inputs.json")) -> str:
    """The `sanitize compare` line that writes `inputs` (the polygraphy lines' --load-inputs) for this run."""
    args = ["sanitize", "compare", *map(str, models), "--data", str(data), "--scale", repr(scale)]
    for flag, value in (("--mean", mean), ("--std", std)):
        if value is not None:
            args += [flag, ",".join(repr(v) for v in value)]
    for flag, value in (("--layout", layout), ("--input-name", input_name), ("--output-name", output_name)):
        if value is not None:
            args += [flag, value]
    if input_size is not None:
        args += ["--input-size", f"{input_size[0]}x{input_size[1]}"]
    return shlex.join(args + ["--batch-size", str(batch_size), "--save-inputs", str(inputs)])


def polygraphy_command(models: Iterable[Path], *, inputs: Path = Path("inputs.json"), atol: float = 1e-3,
                       rtol: float = 1e-3, check_error_stat: str = "mean") -> str:
    """The `polygraphy run` lines doing the same inference (one model per run, each checked against the
    first model's saved outputs). Top-1 agreement has no polygraphy flag; tolerances stand in for it."""
    models = [Path(m) for m in models]
    reference = Path(f"{models[0].stem}.outputs.json")
    lines = []
    for k, model in enumerate(models):
        args = ["polygraphy", "run", str(model)]
        args += ["--model-type", "engine", "--trt"] if is_engine(model) else ["--onnxrt", "--providers", "cpu"]
        args += ["--load-inputs", str(inputs)]
        if k == 0:
            args += ["--save-outputs", str(reference)]
        else:
            args += ["--load-outputs", str(reference), "--atol", f"{atol:g}", "--rtol", f"{rtol:g}",
                     "--check-error-stat", check_error_stat]
        lines.append(shlex.join(args))
    return "\n".join(lines)
