"""Atomic artifact writes: temp file in the target folder, fsync, rename — a killed run leaves the old state."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import BadOutput
from .model_io import follow_umask, is_data_name


def check_writable(path: Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    """Validate an output path before any work is done, so a bad --out fails fast and writes nothing."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise BadOutput(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise BadOutput(f"output folder {folder} is not writable")
    # an ONNX output may carry its weights in <name>.<sha8>.data beside it (model_io.data_name): such files are
    # part of the artifact, written or removed with it, so none may be an input
    is_onnx = path.suffix.lower() == ".onnx"
    target = path.resolve()
    for src in inputs:
        real = Path(src).resolve()
        if real == target or (is_onnx and real.parent == target.parent and is_data_name(target, real.name)):
            raise BadOutput(f"output {path} would replace {src}, which this run reads or writes; choose another path")
        if real.is_dir() and real in target.parents:
            # a file written into an image folder replaces one of its images, or becomes one the next run reads
            raise BadOutput(f"output {path} is inside {src}, a folder this run reads; choose a path outside it")
    siblings = sorted(p for p in folder.iterdir() if is_data_name(path, p.name)) if is_onnx else []
    for p in [path, *siblings]:
        if p.is_dir():
            raise BadOutput(f"output {p} is a folder; choose a file path")
        if p.exists() and not force:
            raise BadOutput(f"{p} exists; pass --force to overwrite")
    return path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path in the target folder; on success fsync it and rename it onto `path`."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    except OSError as e:
        raise BadOutput(f"could not write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        follow_umask(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:   # disk full, or the target became a folder / read-only during the run
        raise BadOutput(f"could not write {path}: {e.strerror or e}") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())
