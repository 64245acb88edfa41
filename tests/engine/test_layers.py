"""The layer contracts (pyproject.toml, import-linter) hold for the package and catch what they forbid:
an import from a folder above, and the target's stack imported outside selftest/runtime."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache", "--no-logo", "--config", str(root / "pyproject.toml")],
                          cwd=root, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copytree(REPO / "ernie_patcher", root / "ernie_patcher",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    return root


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text() + f"\n{line}\n")


def test_the_package_keeps_its_layers():
    done = _lint(REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("fs/safeio.py", "from ..core import state", "cli > authoring"),
    ("patchset/series.py", "from ..target import discovery", "cli > authoring"),
    ("core/engine.py", "from ..authoring import create", "cli > authoring"),
    ("errors.py", "from .fs import safeio", "errors and settings import nothing"),
    ("core/plan.py", "import torch", "only selftest/runtime imports"),
    ("cli/render.py", "import vllm_omni", "only selftest/runtime imports"),
])
def test_an_import_against_the_layers_breaks_a_contract(tmp_path: Path, module: str, line: str, broken: str):
    root = _copy(tmp_path)
    _append(root / "ernie_patcher" / module, line)
    done = _lint(root)
    assert done.returncode != 0
    assert f"{broken}" in done.stdout and "BROKEN" in done.stdout, done.stdout
