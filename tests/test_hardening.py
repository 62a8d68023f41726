"""Issue 5, hardening: hostile or broken models, data and flags through the real CLI.

Every failure must be its documented exit code, one `error:` line on stderr, no traceback, no output (nor its
.data sibling, nor a temp file) and every input byte-identical afterwards. Then: two runs with one seed give
identical bytes, and a run that dies while writing leaves the previous output intact."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

import models as M
from sanitizer.cli import main
from sanitizer.errors import ExitCode

# Enough images for both sides of the held-out split; a fixed ratio keeps the budget out of the picture.
N_CALIB = 40
# random models on noise images: nothing for the sanity gate to pass (tests/test_sanity.py covers the gate)
PRUNE = ("--criterion", "linf", "--ratio", "0.25", "--allow-degraded", "--no-sanity-check")


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (symlinks followed, hidden files included)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(capfd, argv) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main([str(a) for a in argv])
    out, err = capfd.readouterr()   # fd-level: a C library writing to stderr counts too
    return code, out, err


class Env:
    """Inputs in tmp/in, the output in tmp/out; each setup breaks exactly one thing and keeps the rest valid."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.indir = tmp / "in"
        self.outdir = tmp / "out"
        self.indir.mkdir()
        self.outdir.mkdir()
        self.out = self.outdir / "clean.onnx"
        self.marker = tmp / "unpickled"

    def model(self, model: onnx.ModelProto | None = None, *, external: bool = False, check: bool = True) -> Path:
        model = M.plain() if model is None else model
        path = self.indir / "model.onnx"
        if check:
            M.save(model, path, external=external)
        else:   # onnx.save_model does not validate: hostile protos go to disk as they are
            path.write_bytes(model.SerializeToString())
        return path

    def file(self, name: str, data: bytes) -> Path:
        (self.indir / name).write_bytes(data)
        return self.indir / name

    def npz(self, name: str = "calib.npz", n: int = N_CALIB, **arrays) -> Path:
        arrays = arrays or {"X": M.images(n)}
        path = self.indir / name
        np.savez(path, **arrays)
        return path

    def pngs(self, n: int = N_CALIB) -> Path:
        d = self.indir / "imgs"
        d.mkdir()
        for i, im in enumerate(M.images(n)):
            Image.fromarray(im).save(d / f"{i:03d}.png")
        return d

    def argv(self, model: Path | None = None, calib: Path | None = None, *extra) -> list:
        return [model or self.model(), "--calib", calib or self.npz(), "--out", self.out, *PRUNE, *extra]


def edited(edit: Callable[[onnx.ModelProto], None], model: onnx.ModelProto | None = None) -> onnx.ModelProto:
    model = M.plain() if model is None else model
    edit(model)
    return model


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def init(model: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


# ------------------------------------------------------------------------------------------------- models

def _truncated(e: Env):
    e.model()
    blob = (e.indir / "model.onnx").read_bytes()
    (e.indir / "model.onnx").write_bytes(blob[: len(blob) // 2])
    return e.argv(e.indir / "model.onnx")


def _foreign_proto(proto) -> Callable[[Env], list]:
    def setup(e: Env):
        (e.indir / "model.onnx").write_bytes(proto().SerializeToString())
        return e.argv(e.indir / "model.onnx")
    return setup


def _cycle(m):
    node(m, "relu1").input[0] = "relu2_out"   # relu1 → conv2 → relu2 → relu1


def _no_inputs(m):
    del m.graph.input[:]
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 3, 8, 8), np.float32), "input"))


def _two_images(m):
    m.graph.input.append(helper.make_tensor_value_info("input2", TensorProto.FLOAT, ["N", 3, 8, 8]))
    m.graph.node.insert(0, helper.make_node("Add", ["input", "input2"], ["sum"], name="add_inputs"))
    node(m, "conv1").input[0] = "sum"


def _uint8_input(m):
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    m.graph.node.insert(0, helper.make_node("Cast", ["input"], ["input_f"], name="cast", to=TensorProto.FLOAT))
    node(m, "conv1").input[0] = "input_f"


def _unknown_domain(m):
    m.opset_import.append(helper.make_opsetid("evil.ops", 1))
    node(m, "pool").input[0] = "evil_out"
    m.graph.node.insert(len(m.graph.node) - 3,
                        helper.make_node("Backdoor", ["relu2_out"], ["evil_out"], name="evil", domain="evil.ops"))


def _opset(version: int):
    def edit(m):
        m.opset_import[0].version = version
    return edit


def _duplicate_init(m):
    dup = numpy_helper.from_array(np.zeros((6, 3, 1, 1), np.float32), "conv1.weight")
    m.graph.initializer.append(dup)


def _short_raw_data(m):
    w = init(m, "conv1.weight")
    w.raw_data = w.raw_data[:-8]


def _bias_too_short(m):
    b = init(m, "conv1.bias")
    b.CopyFrom(numpy_helper.from_array(np.zeros(5, np.float32), "conv1.bias"))   # consistent tensor, 6 channels


def _batch(value: int):
    def edit(m):
        m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = value
    return edit


def _npz_header_broken(e: Env):
    path = e.npz()
    blob = bytearray(path.read_bytes())
    at = blob.index(b"{'descr'")
    blob[at - 1] ^= 2   # the high byte of the .npy header length: the header now runs into the pixels
    path.write_bytes(bytes(blob))
    return e.argv(calib=path)


def _external(edit_entries: Callable[[Env, onnx.TensorProto, dict], None] | None = None,
              edit_files: Callable[[Env], None] | None = None) -> Callable[[Env], list]:
    """A model with every weight in model.onnx.data, then one reference or the data file itself spoiled."""
    def setup(e: Env):
        path = e.model(external=True)
        if edit_entries is not None:
            model = onnx.load(str(path), load_external_data=False)
            tensor = init(model, "conv1.weight")
            entries = {d.key: d.value for d in tensor.external_data}
            edit_entries(e, tensor, entries)
            del tensor.external_data[:]
            for k, v in entries.items():
                tensor.external_data.add(key=k, value=str(v))
            path.write_bytes(model.SerializeToString())
        if edit_files is not None:
            edit_files(e)
        return e.argv(path)
    return setup


def _data_file(e: Env) -> Path:
    return e.indir / "model.onnx.data"


def _loc_parent(e, t, d):
    _data_file(e).rename(e.tmp / "model.onnx.data")   # present, so only the `..` rule can refuse it
    d["location"] = "../model.onnx.data"


def _loc_absolute(e, t, d):
    d["location"] = str(_data_file(e).resolve())


def _symlink_out(e: Env):
    secret = e.tmp / "secret.bin"
    secret.write_bytes(_data_file(e).read_bytes())
    _data_file(e).unlink()
    _data_file(e).symlink_to(Path("..") / "secret.bin")


def _short_data(e: Env):
    blob = _data_file(e).read_bytes()
    _data_file(e).write_bytes(blob[: len(blob) // 2])


def _offset_past_end(e, t, d):
    d["offset"] = _data_file(e).stat().st_size + 16


def _length_past_end(e, t, d):
    d["length"] = _data_file(e).stat().st_size * 2


def _negative_offset(e, t, d):
    d["offset"] = -4


def _no_length_short_file(e, t, d):
    # without `length` the reader takes "to the end of the file": the tensor gets fewer bytes than its dims need
    del d["length"]
    d["offset"] = _data_file(e).stat().st_size - 8


def _loc_folder(e, t, d):
    (e.indir / "weights").mkdir()
    d["location"] = "weights"


# --------------------------------------------------------------------------------------------------- data

class Payload:
    """Unpickling this creates the marker file: proof that a loader ran pickle."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _pickled_x(e: Env):
    x = np.empty(N_CALIB, dtype=object)
    x[:] = [Payload(e.marker)] * N_CALIB
    return e.argv(calib=e.npz(X=x))


def _pickled_y(e: Env):
    y = np.empty(N_CALIB, dtype=object)
    y[:] = [Payload(e.marker)] * N_CALIB
    return e.argv(calib=e.npz(X=M.images(N_CALIB), y=y))


def _pickled_npy(e: Env):
    x = np.empty(N_CALIB, dtype=object)
    x[:] = [Payload(e.marker)] * N_CALIB
    np.save(e.indir / "calib.npy", x, allow_pickle=True)
    return e.argv(calib=e.indir / "calib.npy")


def _corrupt_png(e: Env):
    d = e.pngs()
    blob = (d / "017.png").read_bytes()
    (d / "017.png").write_bytes(blob[: len(blob) - 40])   # header intact: fails only when decoded
    return e.argv(calib=d)


def _bomb_png(e: Env):
    d = e.pngs()
    blob = bytearray((d / "005.png").read_bytes())
    assert blob[12:16] == b"IHDR"
    blob[16:24] = struct.pack(">II", 100_000, 100_000)
    blob[29:33] = struct.pack(">I", zlib.crc32(bytes(blob[12:29])))
    (d / "005.png").write_bytes(bytes(blob))
    return e.argv(calib=d)


def _png_16bit(e: Env):
    d = e.pngs()
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(d / "020.png")
    assert Image.open(d / "020.png").mode.startswith("I")
    return e.argv(calib=d)


def _text_as_png(e: Env):
    d = e.pngs()
    (d / "003.png").write_text("not an image\n")
    return e.argv(calib=d)


def _text_folder(e: Env):
    d = e.indir / "imgs"
    d.mkdir()
    for i in range(N_CALIB):
        (d / f"{i}.txt").write_text("hello\n")
    return e.argv(calib=d)


def _float_pixels(value: float):
    def setup(e: Env):
        x = M.images(N_CALIB).astype(np.float32)
        x[7, 3, 3, 1] = value
        return e.argv(calib=e.npz(X=x))
    return setup


def _mixed_sizes(e: Env):
    d = e.pngs()
    for i, im in enumerate(M.images(5, 13, 11, seed=99)):
        Image.fromarray(im).save(d / f"big{i}.png")
    return e.argv(calib=d)


# -------------------------------------------------------------------------------------------------- flags

def _existing_out(e: Env):
    e.out.write_bytes(b"an older result")
    return e.argv()


def _out_symlink_to_input(e: Env):
    model = e.model()
    e.out.symlink_to(model)
    return [model, "--calib", e.npz(), "--out", e.out, *PRUNE, "--force"]


def _out_is_folder(e: Env):
    e.out.mkdir()
    return e.argv(None, None, "--force")


def _out_data_sibling_exists(e: Env):
    (e.outdir / "clean.onnx.data").write_bytes(b"someone else's weights")
    return e.argv(e.model(external=True))


def _out_is_input_data(e: Env):
    model = e.model(external=True)
    return [model, "--calib", e.npz(), "--out", e.indir / "model.onnx.data", *PRUNE, "--force"]


def _out_is_calib(e: Env):
    calib = e.npz()
    return [e.model(), "--calib", calib, "--out", calib, *PRUNE, "--force"]


def _report_over_a_calib_image(e: Env):
    calib = e.pngs()
    return [e.model(), "--calib", calib, "--out", e.out, *PRUNE, "--report", calib / "000.png", "--force"]


def _report_is_out(e: Env):
    return e.argv(None, None, "--report", e.out)


def _read_only_out(e: Env):
    e.outdir.chmod(0o555)
    if os.access(e.outdir, os.W_OK):   # root ignores permission bits; the immutable attribute stops root too
        e.outdir.chmod(0o755)
        done = subprocess.run(["chattr", "+i", str(e.outdir)], capture_output=True)
        if done.returncode != 0 or os.access(e.outdir, os.W_OK):
            pytest.skip("running as root and chattr +i is unavailable: no way to make a read-only folder here")
        e.cleanup = lambda: subprocess.run(["chattr", "-i", str(e.outdir)], check=True)
    return e.argv()


# name -> (expected exit code, setup(env) -> argv)
CASES: dict[str, tuple[int, Callable[[Env], list]]] = {
    # the model file
    "model_missing": (ExitCode.BAD_MODEL, lambda e: e.argv(e.indir / "nope.onnx")),
    "model_is_a_folder": (ExitCode.BAD_MODEL, lambda e: e.argv(e.indir)),
    "model_empty_file": (ExitCode.BAD_MODEL, lambda e: e.argv(e.file("m.onnx", b""))),
    "model_random_bytes": (ExitCode.BAD_MODEL, lambda e: e.argv(e.file("m.onnx", np.random.default_rng(1).bytes(5000)))),
    "model_truncated_protobuf": (ExitCode.BAD_MODEL, _truncated),
    "model_is_a_tensorproto": (ExitCode.BAD_MODEL, _foreign_proto(lambda: numpy_helper.from_array(M.images(4), "X"))),
    "model_is_a_graphproto": (ExitCode.BAD_MODEL, _foreign_proto(lambda: M.plain().graph)),
    "graph_cycle": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_cycle), check=False))),
    "dangling_tensor_name": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(
        lambda m: node(m, "conv2").input.__setitem__(0, "nowhere")), check=False))),
    "no_inputs": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_no_inputs), check=False))),
    # only images can be fed, and onnxruntime needs every input
    "several_image_inputs": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_two_images), check=False))),
    "several_image_inputs_one_named": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_two_images), check=False),
                                                                          None, "--input-name", "input")),
    "uint8_input": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_uint8_input), check=False))),
    "unknown_op_domain": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_unknown_domain), check=False))),
    "unknown_op_type": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(
        lambda m: setattr(node(m, "relu1"), "op_type", "Relux")), check=False))),
    "opset_5": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_opset(5)), check=False))),
    "opset_99": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_opset(99)), check=False))),
    "duplicate_initializer": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_duplicate_init), check=False))),
    "initializer_raw_data_too_long": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(
        lambda m: setattr(init(m, "conv1.bias"), "raw_data", init(m, "conv1.bias").raw_data * 2)), check=False))),
    "initializer_dims_absurd": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(
        lambda m: init(m, "fc.weight").dims.__setitem__(0, 2**62)), check=False))),
    "conv_bias_shorter_than_channels": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_bias_too_short), check=False))),
    "input_batch_dim_0": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_batch(0)), check=False))),
    # 2**62, not 2**31: numpy refuses it outright, where 2**31 could really be allocated under memory overcommit
    "input_batch_dim_2_62": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_batch(2**62)), check=False))),
    "initializer_raw_data_too_short": (ExitCode.BAD_MODEL, lambda e: e.argv(e.model(edited(_short_raw_data), check=False))),
    # external data
    "external_location_parent_dir": (ExitCode.BAD_MODEL, _external(_loc_parent)),
    "external_location_absolute": (ExitCode.BAD_MODEL, _external(_loc_absolute)),
    "external_location_is_a_folder": (ExitCode.BAD_MODEL, _external(_loc_folder)),
    "external_symlink_escapes_folder": (ExitCode.BAD_MODEL, _external(edit_files=_symlink_out)),
    "external_data_missing": (ExitCode.BAD_MODEL, _external(edit_files=lambda e: _data_file(e).unlink())),
    "external_data_short": (ExitCode.BAD_MODEL, _external(edit_files=_short_data)),
    "external_offset_past_end": (ExitCode.BAD_MODEL, _external(_offset_past_end)),
    "external_length_past_end": (ExitCode.BAD_MODEL, _external(_length_past_end)),
    "external_negative_offset": (ExitCode.BAD_MODEL, _external(_negative_offset)),
    "external_no_length_too_few_bytes": (ExitCode.BAD_MODEL, _external(_no_length_short_file)),
    # calibration data
    "calib_missing": (ExitCode.BAD_DATA, lambda e: e.argv(calib=e.indir / "nope.npz")),
    "calib_empty_folder": (ExitCode.BAD_DATA, lambda e: (e.indir / "empty").mkdir() or e.argv(calib=e.indir / "empty")),
    "calib_folder_of_text_files": (ExitCode.BAD_DATA, _text_folder),
    "calib_text_file_named_png": (ExitCode.BAD_DATA, _text_as_png),
    "calib_corrupt_png": (ExitCode.BAD_DATA, _corrupt_png),
    "calib_16bit_png": (ExitCode.BAD_DATA, _png_16bit),
    "calib_decompression_bomb_png": (ExitCode.BAD_DATA, _bomb_png),
    "calib_mixed_sizes_are_resized_exit_0": (ExitCode.OK, _mixed_sizes),
    "calib_unknown_suffix": (ExitCode.BAD_DATA, lambda e: e.argv(calib=e.file("c.txt", b"x"))),
    "npz_not_a_zip": (ExitCode.BAD_DATA, lambda e: e.argv(calib=e.file("c.npz", b"PK\x03\x04" + bytes(300)))),
    "npz_without_X": (ExitCode.BAD_DATA, lambda e: e.argv(calib=e.npz(images=M.images(N_CALIB)))),
    "npz_X_wrong_rank": (ExitCode.BAD_DATA, lambda e: e.argv(calib=e.npz(X=M.images(N_CALIB).reshape(N_CALIB, -1)))),
    "npz_X_pickled_objects": (ExitCode.BAD_DATA, _pickled_x),
    "npz_y_pickled_objects": (ExitCode.BAD_DATA, _pickled_y),
    "npy_pickled_objects": (ExitCode.BAD_DATA, _pickled_npy),
    "npz_array_header_corrupt": (ExitCode.BAD_DATA, _npz_header_broken),
    "npz_y_wrong_length": (ExitCode.BAD_DATA, lambda e: e.argv(calib=e.npz(X=M.images(N_CALIB), y=np.zeros(3, np.int64)))),
    "npz_nan_pixel": (ExitCode.BAD_DATA, _float_pixels(np.nan)),
    "npz_inf_pixel": (ExitCode.BAD_DATA, _float_pixels(np.inf)),
    "too_few_images_for_split": (ExitCode.BAD_DATA, lambda e: e.argv(calib=e.npz(n=30))),
    # flags
    "mean_wrong_length": (ExitCode.USAGE, lambda e: e.argv(None, None, "--mean", "0.1,0.2")),
    "std_wrong_length": (ExitCode.USAGE, lambda e: e.argv(None, None, "--std", "1,1,1,1")),
    "std_zero": (ExitCode.USAGE, lambda e: e.argv(None, None, "--std", "0")),
    "mean_not_numbers": (ExitCode.USAGE, lambda e: e.argv(None, None, "--mean", "a,b,c")),
    "scale_zero": (ExitCode.USAGE, lambda e: e.argv(None, None, "--scale", "0")),
    "layout_contradicts_model": (ExitCode.USAGE, lambda e: e.argv(None, None, "--layout", "nhwc")),
    "input_name_unknown": (ExitCode.USAGE, lambda e: e.argv(None, None, "--input-name", "image")),
    "unknown_flag": (ExitCode.USAGE, lambda e: e.argv(None, None, "--prune-everything")),
    "out_is_input": (ExitCode.OUTPUT, lambda e: [e.model(), "--calib", e.npz(), "--out", e.indir / "model.onnx", *PRUNE]),
    "out_symlink_to_input_with_force": (ExitCode.OUTPUT, _out_symlink_to_input),
    "out_folder_missing": (ExitCode.OUTPUT, lambda e: [e.model(), "--calib", e.npz(), "--out", e.tmp / "no" / "c.onnx", *PRUNE]),
    "out_folder_read_only": (ExitCode.OUTPUT, _read_only_out),
    "out_exists_without_force": (ExitCode.OUTPUT, _existing_out),
    "out_is_a_folder_with_force": (ExitCode.OUTPUT, _out_is_folder),
    "out_data_sibling_exists_without_force": (ExitCode.OUTPUT, _out_data_sibling_exists),
    "out_is_input_external_data_with_force": (ExitCode.OUTPUT, _out_is_input_data),
    "out_is_calib_with_force": (ExitCode.OUTPUT, _out_is_calib),
    "report_is_out": (ExitCode.OUTPUT, _report_is_out),
    "report_over_a_calib_image_with_force": (ExitCode.OUTPUT, _report_over_a_calib_image),
}


@pytest.mark.parametrize("code,setup", [pytest.param(c, s, id=n) for n, (c, s) in CASES.items()])
def test_bad_input(code, setup, tmp_path, capfd):
    env = Env(tmp_path)
    env.cleanup = lambda: None
    try:
        argv = setup(env)
        before = snapshot(tmp_path)
        out_dir_before = set(os.listdir(env.outdir))
        got, out, err = run_cli(capfd, argv)
        after = snapshot(tmp_path)
    finally:
        env.cleanup()

    assert "Traceback" not in out + err
    assert not env.marker.exists(), "a pickle was loaded"
    out_path = Path(argv[argv.index("--out") + 1])
    if code == ExitCode.OK:
        assert got == 0, err
        assert not [line for line in err.splitlines() if line.strip()], err
        onnx.checker.check_model(onnx.load(str(out_path)), full_check=True)
        new = set(after) - set(before)
        assert new == {str(out_path.relative_to(tmp_path))}, new
        assert all(after[k] == v for k, v in before.items())
        return
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, (got, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for p in (out_path, out_path.with_name(out_path.name + ".data")):
        rel = str(p.relative_to(tmp_path)) if p.is_relative_to(tmp_path) else None
        assert rel is None or (rel in before) == (rel in after), f"{p} was created or removed"
    assert set(os.listdir(env.outdir)) == out_dir_before, "temp files left in the output folder"
    assert after == before, "an input or an existing file changed"


def test_the_pickle_payload_would_have_fired(tmp_path):
    """Without this, an absent marker could mean a broken payload rather than a loader that refused it."""
    marker = tmp_path / "fired"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# ------------------------------------------------------------------------------------ determinism, atomicity

def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "timings_seconds" and "seconds" not in k}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_same_inputs_and_seed_give_identical_bytes(tmp_path, capfd):
    env = Env(tmp_path)
    # the searched count (no --ratio) with external weights: the bisection and the .data file are both covered
    # (the clean-data criterion: on a random model the default's probes find nothing pruning would silence)
    argv = [env.model(external=True), "--calib", env.npz(n=60), "--out", env.out, "--report", tmp_path / "r.json",
            "--max-acc-drop", "0.3", "--seed", "3", "--force", "--no-sanity-check", "--criterion", "linf"]
    runs = []
    for _ in range(2):
        code, _, err = run_cli(capfd, argv)
        assert code == 0, err
        (data,) = env.outdir.glob("clean.onnx.*.data")   # one .data file: the previous run's is the same file
        runs.append((env.out.read_bytes(), data.read_bytes(), json.loads((tmp_path / "r.json").read_text())))
    (model_a, data_a, report_a), (model_b, data_b, report_b) = runs
    assert model_a == model_b and data_a == data_b
    assert report_a["plan"]["count"] > 0, "nothing pruned: the comparison would be trivial"
    assert _without_timings(report_a) == _without_timings(report_b)


class Crash(Exception):
    pass


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external"])
@pytest.mark.parametrize("error,code", [(OSError(28, "No space left on device"), ExitCode.OUTPUT),
                                        (Crash("killed mid-write"), ExitCode.INTERNAL)], ids=["disk_full", "crash"])
def test_a_write_that_dies_midway_keeps_the_previous_output(error, code, external, tmp_path, capfd, monkeypatch):
    env = Env(tmp_path)
    argv = [env.model(external=external), "--calib", env.npz(), "--out", env.out, "--allow-degraded", "--force",
            "--no-sanity-check"]
    assert run_cli(capfd, [*argv, "--criterion", "linf", "--ratio", "0.25"])[0] == 0
    previous, listing = snapshot(env.outdir), sorted(os.listdir(env.outdir))
    real_save = onnx.save_model

    def half_then_die(model, path, *args, **kwargs):
        real_save(model, path, *args, **kwargs)
        blob = Path(path).read_bytes()
        Path(path).write_bytes(blob[: len(blob) // 2])
        raise error

    monkeypatch.setattr(onnx, "save_model", half_then_die)
    got, out, err = run_cli(capfd, [*argv, "--criterion", "linf", "--ratio", "0.5"])
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code and len(lines) == 1 and "Traceback" not in out + err, err
    assert snapshot(env.outdir) == previous and sorted(os.listdir(env.outdir)) == listing
    onnx.checker.check_model(onnx.load(str(env.out)), full_check=True)


def test_a_checker_message_over_several_lines_names_the_node(tmp_path):
    from onnx import TensorProto, helper

    from sanitizer.errors import BadModel
    from sanitizer.model_io import load_model

    # nodes out of order: the checker's message breaks its line before naming the node
    x, y = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2]) for n in ("x", "b"))
    graph = helper.make_graph([helper.make_node("Relu", ["a"], ["b"], name="second"),
                               helper.make_node("Relu", ["x"], ["a"], name="first")], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    with pytest.raises(BadModel) as info:
        load_model(tmp_path / "m.onnx")
    said = str(info.value)
    assert "\n" not in said and "name: second OpType: Relu" in said and "is not output of any previous nodes" in said
