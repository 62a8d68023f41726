"""Load a possibly hostile ONNX file safely; save a sanitized one atomically, keeping external data external."""
from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from .errors import BadModel, BadOutput

# protobuf cannot serialize a message above 2 GiB, and the in-memory checker serializes: larger models are
# checked (and shape-inferred, which full_check includes) from a file. A module attribute so that tests can
# force the file route on a tiny model.
PROTO_LIMIT = 2**31 - 1
SUPPORTED_OPSETS = range(7, 24)
# two elements per byte in raw_data
_PACKED_4BIT = {getattr(TensorProto, t) for t in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, t)}


@dataclass
class LoadedModel:
    path: Path
    model: onnx.ModelProto      # with every external tensor loaded into memory
    external: bool              # the file kept weights as external data
    sha256: str
    data_files: list[Path] = field(default_factory=list)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _validate_external(model: onnx.ModelProto, folder: Path) -> list[Path]:
    """Refuse any external-data reference that leaves the model's folder or points past a file's end;
    return the data files it reads."""
    root = folder.resolve()
    found: list[Path] = []
    for tensor in external_data_helper._get_all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        loc = info.get("location", "")
        if not loc or os.path.isabs(loc) or Path(loc).is_absolute() or ".." in Path(loc).parts:
            raise BadModel(f"tensor {tensor.name!r}: external data location {loc!r} must be a relative path inside the model's folder")
        target = (folder / loc).resolve()
        if root not in target.parents:
            raise BadModel(f"tensor {tensor.name!r}: external data {loc!r} resolves outside the model's folder")
        if not target.is_file():
            raise BadModel(f"tensor {tensor.name!r}: external data file {loc!r} is missing")
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else target.stat().st_size - offset
        except ValueError:
            raise BadModel(f"tensor {tensor.name!r}: external data offset/length are not integers") from None
        if offset < 0 or length < 0 or offset + length > target.stat().st_size:
            raise BadModel(f"tensor {tensor.name!r}: external data {loc!r} offset+length past the end of the file")
        if target not in found:
            found.append(target)
    return found


def _check_tensor_sizes(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a tensor whose data does not fill its dims exactly. The checker only catches too little data;
    onnxruntime refuses too much, but logs to stderr while doing so, and absurd dims can make later shape
    arithmetic allocate terabytes."""
    for tensor in external_data_helper._get_all_tensors(model):
        count = math.prod(tensor.dims)
        ok = min(tensor.dims, default=0) >= 0
        try:
            if ok and tensor.HasField("raw_data"):
                itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
                need = (count + 1) // 2 if tensor.data_type in _PACKED_4BIT else count * itemsize
                ok = len(tensor.raw_data) == need
            elif ok:
                ok = numpy_helper.to_array(tensor).size == count
        except Exception:  # unknown data type, or typed fields that do not fit the dims
            ok = False
        if not ok:
            raise BadModel(f"model {path}: tensor {tensor.name!r} holds data that does not match its dims "
                           f"{list(tensor.dims)} and type")


def load_model(path: Path) -> LoadedModel:
    path = Path(path)
    if not path.exists():
        raise BadModel(f"model {path} does not exist")
    if not path.is_file():
        raise BadModel(f"model {path} is not a file")
    if path.stat().st_size == 0:
        raise BadModel(f"model {path} is empty")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several unrelated types on garbage input
        raise BadModel(f"model {path} is not a readable ONNX file ({type(e).__name__})") from None
    if not model.HasField("graph") or not model.graph.node or model.ir_version <= 0:
        raise BadModel(f"model {path} holds no ONNX graph")
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version not in SUPPORTED_OPSETS:
            raise BadModel(f"model {path} uses opset {op.version}; supported: {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}")
    data_files = _validate_external(model, path.parent)
    external = bool(data_files)
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as e:
            raise BadModel(f"model {path}: external data unreadable ({e})") from None
    _check_tensor_sizes(model, path)
    check(model, path)
    constants_to_initializers(model)
    return LoadedModel(path=path, model=model, external=external, sha256=sha256_file(path), data_files=data_files)


# Layers whose constant inputs past the first hold their units' weights (and bias), by input position.
WEIGHT_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (1,),
                 "BatchNormalization": (1, 2, 3, 4), "PRelu": (1,)}
# Element-wise ops whose constant operand is a layer's bias or per-unit scale when their other operand is that
# layer's output.
BIAS_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """In place: each main-graph `Constant` node holding a tensor (`value`, or a float/int scalar or list) that
    sits where a layer keeps its weights — a weight input of WEIGHT_INPUTS, or the constant operand of a
    BIAS_OPS node applied to the output of a layer whose weight is constant — becomes an initializer of the
    same name: onnxoptimizer's extract_constant_to_initializer pass, restricted to weights; the two forms
    compute the same. Some exporters and hand-edited graphs keep weights in Constant nodes, which the site
    analysis and the rewrite would otherwise not see as weights. Every other constant (preprocessing, GELU's
    and attention's factors, LayerNorm's epsilon, shapes, the bounds this tool writes) stays a node: the
    repair tunes initializers, and must tune weights only. Models of IR version < 4, where every initializer
    must also be a graph input, are left as they are."""
    if model.ir_version < 4:
        return
    nodes = model.graph.node
    constant = {n.output[0]: n for n in nodes if n.op_type == "Constant" and n.domain in ("", "ai.onnx")
                and len(n.attribute) == 1}
    inits = {t.name for t in model.graph.initializer}
    weights = {n.input[i] for n in nodes if n.domain in ("", "ai.onnx")
               for i in WEIGHT_INPUTS.get(n.op_type, ()) if i < len(n.input)}
    layer_out = {n.output[0] for n in nodes if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")
                 and n.domain in ("", "ai.onnx") and len(n.input) > 1 and (n.input[1] in inits or n.input[1] in constant)}
    for n in nodes:
        if n.op_type in BIAS_OPS and n.domain in ("", "ai.onnx") and len(n.input) == 2 and \
                any(i in layer_out for i in n.input):
            weights.update(i for i in n.input if i in constant)
    kept = []
    for node in nodes:
        tensor = None
        if node.output[0] in constant and node.output[0] in weights:
            a = node.attribute[0]
            if a.name == "value":
                tensor = TensorProto()
                tensor.CopyFrom(a.t)
            elif a.name in ("value_float", "value_floats", "value_int", "value_ints"):
                value = helper.get_attribute_value(a)
                tensor = numpy_helper.from_array(np.asarray(value, np.float32 if "float" in a.name else np.int64))
        if tensor is None:
            kept.append(node)
            continue
        tensor.name = node.output[0]
        model.graph.initializer.append(tensor)
    if len(kept) < len(nodes):
        del nodes[:]
        nodes.extend(kept)


def check(model: onnx.ModelProto, path: Path | None = None) -> None:
    """Full check (structure, then strict shape inference) of `model`; `path`, when given, holds this very model."""
    try:
        if model.ByteSize() <= PROTO_LIMIT:
            onnx.checker.check_model(model, full_check=True)
        elif path is not None:
            onnx.checker.check_model(str(path), full_check=True)
        else:   # a model built in memory (the sanitized one): the path-based checker needs it on disk first
            with tempfile.TemporaryDirectory(prefix="sanitize-check.") as tmp:
                staged = Path(tmp) / "model.onnx"
                try:
                    onnx.save_model(_copy(model), str(staged), save_as_external_data=True,
                                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
                except OSError as e:   # the environment failed, not the model
                    raise BadOutput(f"could not stage the model in {tmp} for the checker: {e.strerror or e}") from None
                onnx.checker.check_model(str(staged), full_check=True)
    except BadOutput:
        raise
    except Exception as e:
        # the checker's message runs over lines ("... of node:\nname: x OpType: Relu\n is not ..."): one line of it
        said = " ".join(str(e).split())
        said = (said[:400] + " …" if len(said) > 400 else said) or type(e).__name__
        where = f"model {path}" if path else "model"
        raise BadModel(f"{where} is not a valid ONNX model: {said}") from None


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone


def data_name(out: Path, sha256: str) -> str:
    """The external-data file of output `out`, named by its content: a new pair never overwrites the .data
    file that the model currently on disk references."""
    return f"{out.name}.{sha256[:8]}.data"


def is_data_name(out: Path, name: str) -> bool:
    """Whether `name` is (or, before content naming, was) an external-data file name of output `out`."""
    return name == out.name + ".data" or re.fullmatch(re.escape(out.name) + r"\.[0-9a-f]{8}\.data", name) is not None


def _referenced_data(out: Path) -> set[Path]:
    """The data files of the output model now at `out`, to remove once a new model replaced it. Only files
    named like our own .data beside it: whatever else a hand-edited model points at is not ours to delete."""
    try:
        old = onnx.load(str(out), load_external_data=False)
    except Exception:   # missing or unreadable: nothing we know to be ours
        return set()
    found = set()
    for tensor in external_data_helper._get_all_tensors(old):
        if external_data_helper.uses_external_data(tensor):
            loc = next((e.value for e in tensor.external_data if e.key == "location"), "")
            if is_data_name(out, loc):
                found.add(out.parent / loc)
    return found


def follow_umask(path: Path) -> None:
    """Give a file we wrote the mode a plain open() would: temp files (mkstemp) and onnx's external data are
    created 0600, which would leave the model 0644 and its .data or the report unreadable to the same readers."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(model: onnx.ModelProto, out: Path, *, external: bool) -> list[Path]:
    """Write the model (and its .data file when external) so that at every instant the model file on disk
    references a complete .data file that matches it.

    The .data file is named by its content hash and renamed into place first; the model file is renamed
    last; only then is the .data file of the replaced model removed. A crash at any step leaves either the
    old model with its old .data or the new model with its new .data (plus, at worst, a stray old .data)."""
    out = Path(out)
    written = [out]
    stale = _referenced_data(out)
    try:
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
            tmp_model = Path(tmp) / out.name
            if external:
                # save_model moves tensors out of the proto it is given; keep the caller's model whole.
                model = _copy(model)
                onnx.save_model(model, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                                location="staged.data", size_threshold=1024)
                staged = Path(tmp) / "staged.data"
                if staged.exists():   # absent when every tensor was small enough to stay inline
                    final = out.parent / data_name(out, sha256_file(staged))
                    for tensor in external_data_helper._get_all_tensors(model):
                        for entry in tensor.external_data:
                            if entry.key == "location":
                                entry.value = final.name
                    onnx.save_model(model, str(tmp_model))
                    follow_umask(staged)
                    _fsync(staged)
                    # a rename within one folder: never a copy that a crash could leave half done; an existing
                    # file of that name has the same content, so replacing it changes nothing for its readers
                    os.replace(staged, final)
                    _fsync(out.parent)   # the .data rename is durable before the model that needs it appears
                    written.append(final)
            else:
                onnx.save_model(model, str(tmp_model))
            follow_umask(tmp_model)
            _fsync(tmp_model)
            os.replace(tmp_model, out)
            _fsync(out.parent)
    except OSError as e:   # disk full, folder removed or made read-only during the run
        raise BadOutput(f"could not write {out}: {e.strerror or e}") from None
    for old in stale - set(written):
        try:
            old.unlink()
        except OSError:   # a leftover file wastes space but breaks nothing: the model no longer references it
            pass
    return written
