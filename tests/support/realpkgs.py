"""Real published wheels for the tests: downloaded once with `pip download --no-deps`, cached.

Tests never use hand-made copies of library files: they install the wheels the patches target
into throwaway directories with `pip install --no-deps --target`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CACHE = Path(os.environ.get("ERNIE_PATCHER_CACHE", Path.home() / ".cache" / "ernie-patcher"))
WHEELS = CACHE / "wheels"

DIFFUSERS = ("diffusers", "0.38.0")
VLLM_OMNI = ("vllm-omni", "0.20.0")


def _normalized(name: str) -> str:
    return name.replace("-", "_").lower()


def _download(name: str, version: str, pattern: str, kind: str) -> Path:
    """The cached file matching PATTERN, fetched with `pip download --no-deps` (KIND: binary or sdist)."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    found = sorted(WHEELS.glob(pattern))
    if not found:
        only = "--only-binary=:all:" if kind == "binary" else "--no-binary=:all:"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", only, "-q", "-d", str(WHEELS),
                        f"{name}=={version}"], check=True)
        found = sorted(WHEELS.glob(pattern))
    if not found:
        raise FileNotFoundError(f"pip download ({kind}) of {name}=={version} produced nothing in {WHEELS}")
    return found[0]


def wheel(name: str, version: str) -> Path:
    """Path of the real wheel NAME==VERSION, downloaded (no dependencies) on first use."""
    return _download(name, version, f"{_normalized(name)}-{version}-*.whl", "binary")


def _template(specs: tuple[tuple[str, str], ...]) -> Path:
    """A cached `pip install --no-deps --target` tree of SPECS, built once, copied per test."""
    key = "+".join(f"{_normalized(n)}-{v}" for n, v in specs)
    tree = CACHE / "targets" / key
    if not (tree / ".complete").exists():
        shutil.rmtree(tree, ignore_errors=True)
        tree.parent.mkdir(parents=True, exist_ok=True)
        staging = tree.with_name(tree.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
             "--disable-pip-version-check", "--target", str(staging),
             *[str(wheel(n, v)) for n, v in specs]],
            check=True,
        )
        (staging / ".complete").write_text("ok\n")
        try:
            staging.rename(tree)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return tree


def install_target(dest: Path, *specs: tuple[str, str]) -> Path:
    """Put a fresh copy of the real installed files of SPECS (default: both targets) at DEST."""
    specs = specs or (DIFFUSERS, VLLM_OMNI)
    shutil.copytree(_template(tuple(specs)), dest, symlinks=True, ignore=shutil.ignore_patterns(".complete"))
    return dest


def sdist(name: str, version: str) -> Path:
    """Path of the real source distribution NAME==VERSION (for editable installs), cached."""
    return _download(name, version, f"{_normalized(name)}-{version}.tar.gz", "sdist")


def make_venv(dest: Path, *specs: tuple[str, str]) -> Path:
    """A new virtual environment at DEST with SPECS' real wheels installed (--no-deps); its python."""
    subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True)
    python = dest / "bin" / "python"
    if specs:
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", *[str(wheel(n, v)) for n, v in specs]], check=True)
    return python
