"""The wheel, as a user installs it: built from the sources, installed (not editable) into a fresh venv, run.

CI and the other tests import the editable checkout, which hides a module or data file the wheel leaves
out (the wheel once lacked sanitizer/demo/__init__.py, so `sanitize demo` failed only when installed).
The venv borrows the test interpreter's installed dependencies (torch, onnxruntime) as plain sys.path
entries from a .pth file: unlike --system-site-packages, that runs none of the .pth files there, so the
editable install's import hook (setuptools' __editable__ finder, which would serve sanitizer.demo from
the checkout) stays out. No network: the build and the install use --no-index."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sanitizer", "calib")
SOURCES = ("pyproject.toml", "README.md", *PACKAGES)
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def _package_files() -> set[str]:
    """Every file of the packages in the source tree, as wheel member names."""
    return {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def _run(args, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    # PYTHONPATH would put the checkout back in front of the wheel; PYTHONNOUSERSITE keeps ~/.local out
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONNOUSERSITE": "1", "NO_COLOR": "1",
                                                                         "COLUMNS": "200"}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel path, venv bin folder, venv site-packages, a folder outside the checkout to run in)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"   # a copy, so the build's build/ and *.egg-info stay out of the checkout
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree(ROOT / name, src / name, ignore=IGNORE) if (ROOT / name).is_dir()
         else shutil.copy2(ROOT / name, src / name))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "--wheel-dir", tmp / "dist", src], cwd=tmp, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("*.whl")

    venv.EnvBuilder(with_pip=False).create(tmp / "venv")
    bin_dir = tmp / "venv" / "bin"
    purelib = Path(_run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp).stdout.strip())
    borrowed = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    (purelib / "_borrowed_dependencies.pth").write_text("\n".join(borrowed) + "\n")
    # pip itself is borrowed too; --force-reinstall because the checkout's editable install, outside this
    # venv, has the same name and version
    inst = _run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall",
                 "--no-warn-script-location", wheel], cwd=tmp, timeout=300)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    work = tmp / "work"
    work.mkdir()
    return wheel, bin_dir, purelib, work


def test_wheel_holds_every_module_and_data_file(installed):
    wheel = installed[0]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    missing = sorted(_package_files() - names)
    assert not missing, f"left out of the wheel: {missing}"


def test_installed_packages_are_the_wheel_not_the_checkout(installed):
    _, bin_dir, purelib, work = installed
    res = _run([bin_dir / "python", "-c", "import json, calib, sanitizer, sanitizer.demo; "
                "print(json.dumps([m.__file__ for m in (calib, sanitizer, sanitizer.demo)]))"], cwd=work)
    assert res.returncode == 0, res.stderr
    for path in json.loads(res.stdout):
        assert Path(path).is_relative_to(purelib), path


def test_help_and_demo_run_from_the_wheel(installed):
    _, bin_dir, _, work = installed
    res = _run([bin_dir / "sanitize", "--help"], cwd=work)
    assert res.returncode == 0 and "demo" in res.stdout, res.stdout + res.stderr
    res = _run([bin_dir / "sanitize", "demo"], cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "units pruned" in res.stdout and "attack success rate" in res.stdout, res.stdout


def test_linf_run_on_the_shipped_model(installed):
    _, bin_dir, purelib, work = installed
    demo = purelib / "sanitizer" / "demo"
    res = _run([bin_dir / "sanitize", demo / "model.onnx", "--calib", demo / "calib.npz", "--criterion", "linf",
                "--out", work / "clean.onnx", "--report", work / "r.json"], cwd=work)
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads((work / "r.json").read_text())
    assert report["criterion"] == "linf" and report["output"]["onnx"] == str(work / "clean.onnx")
    assert (work / "clean.onnx").stat().st_size > 0
