"""Shared fixtures: tiny models and calibration sets written to tmp_path, and a CLI runner that captures output."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

import models as M


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


@pytest.fixture
def cli(capsys) -> Callable[..., CliResult]:
    """Run `sanitize ARGS` in-process through sanitizer.cli.main, as the console script does."""
    from sanitizer.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def write_model(tmp_path) -> Callable[..., Path]:
    """write_model(model_or_builder, name="model.onnx", external=False) -> path in tmp_path."""
    def write(model=M.plain, name: str = "model.onnx", *, external: bool = False) -> Path:
        if not isinstance(model, onnx.ModelProto):
            model = model()
        return M.save(model, tmp_path / name, external=external)

    return write


@pytest.fixture
def write_npz(tmp_path) -> Callable[..., Path]:
    """write_npz(name="calib.npz", n=120, labels=True, seed=0, hw=(8, 8)) -> an npz of random uint8 images (X, y)."""
    def write(name: str = "calib.npz", n: int = 120, *, labels: bool = True, seed: int = 0,
              hw: tuple[int, int] = (8, 8), classes: int = M.CLASSES) -> Path:
        arrays = {"X": M.images(n, *hw, seed=seed)}
        if labels:
            arrays["y"] = np.random.default_rng(seed + 1).integers(0, classes, n)
        path = tmp_path / name
        np.savez(path, **arrays)
        return path

    return write


def files_in(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, hidden temp files included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
