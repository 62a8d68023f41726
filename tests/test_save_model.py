"""save_model with external data: at every instant the model file on disk references a complete .data file
that matches it, whatever step a crash interrupts."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper

import models as M
from sanitizer import model_io
from sanitizer.atomic import check_writable
from sanitizer.errors import BadOutput


class Crash(Exception):
    pass


def weights(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model_io.load_model(path).model.graph.initializer}


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def fail_on_call(monkeypatch, n: int, error: BaseException) -> list:
    """Make model_io's n-th os.replace raise `error`, as a kill or a full disk at that instant would."""
    calls = []
    real = os.replace

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == n:
            raise error
        return real(src, dst)

    monkeypatch.setattr(model_io.os, "replace", replace)
    return calls


@pytest.mark.parametrize("error", [Crash("killed"), OSError(28, "No space left on device")], ids=["kill", "disk_full"])
@pytest.mark.parametrize("step", [1, 2], ids=["data_rename", "model_rename"])
def test_a_crash_at_either_rename_keeps_the_old_model_and_its_data(tmp_path, monkeypatch, error, step):
    out = tmp_path / "clean.onnx"
    old, new = M.plain(seed=0), M.plain(seed=1)
    model_io.save_model(old, out, external=True)
    before = listing(tmp_path)
    want = weights(out)

    calls = fail_on_call(monkeypatch, step, error)
    with pytest.raises(BadOutput if isinstance(error, OSError) else Crash):
        model_io.save_model(new, out, external=True)
    assert calls[0].endswith(".data") and calls[-1] == ("clean.onnx" if step == 2 else calls[0])

    after = listing(tmp_path)
    # the old pair is untouched; at most the new .data (named by its own content) stands beside it
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) <= {calls[0]}
    got = weights(out)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)

    monkeypatch.undo()   # the next run completes, and removes the .data only the old model used
    written = model_io.save_model(new, out, external=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    assert all(np.array_equal(weights(out)[t.name], numpy_helper.to_array(t)) for t in new.graph.initializer)


def test_same_model_gives_the_same_files_and_rewriting_it_keeps_one_data_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        model_io.save_model(M.plain(), d / "clean.onnx", external=True)
    assert listing(a) == listing(b) and len(listing(a)) == 2
    model_io.save_model(M.plain(), a / "clean.onnx", external=True)
    assert listing(a) == listing(b)


def test_only_data_files_the_replaced_model_referenced_are_removed(tmp_path):
    out = tmp_path / "clean.onnx"
    M.save(M.plain(), out, external=True)   # named the way outputs were before content naming: clean.onnx.data
    unrelated = tmp_path / "clean.onnx.0123abcd.data"
    unrelated.write_bytes(b"not referenced by the model being replaced")
    written = model_io.save_model(M.plain(seed=1), out, external=True)
    assert not (tmp_path / "clean.onnx.data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([unrelated.name, *(p.name for p in written)])


def test_an_input_named_like_the_outputs_data_is_refused(tmp_path):
    out = tmp_path / "clean.onnx"
    src = tmp_path / "clean.onnx.89abcdef.data"
    src.write_bytes(b"weights some input model reads")
    with pytest.raises(BadOutput, match="would replace"):
        check_writable(out, force=True, inputs=(src,))
    with pytest.raises(BadOutput, match="exists"):
        check_writable(out, force=False)
    assert check_writable(out, force=True) == out


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, mask):
    from sanitizer.atomic import write_text

    old = os.umask(mask)
    try:
        written = model_io.save_model(M.plain(), tmp_path / "m.onnx", external=True)
        write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert len(written) == 2   # the model and its .data
    for path in [*written, tmp_path / "r.json"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
