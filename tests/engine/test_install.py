"""The install commands the README shows, run as written: from a checkout, and offline from a
wheelhouse that holds ernie-patcher's dependencies too (a `--no-deps` wheel alone cannot install
offline)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.cli import ROOT

# The README's Install section, in order (run in a directory holding the checkout as ./ernie-patcher).
FROM_CHECKOUT = "pip install ./ernie-patcher"
WHEELHOUSE = "pip wheel ./ernie-patcher -w wheelhouse"
OFFLINE = "pip install --no-index --find-links wheelhouse ernie-patcher"


def _venv(path: Path) -> dict[str, str]:
    """A fresh venv at PATH; the environment that puts its pip and ernie-patch first on PATH."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ERNIE_PATCHER_", "PYTHON", "VIRTUAL_ENV"))}
    return {**environment, "PATH": f"{path / 'bin'}:{os.environ['PATH']}", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _shell(command: str, environment: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], env=environment, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_install_from_a_checkout(tmp_path: Path):
    (tmp_path / "ernie-patcher").symlink_to(ROOT)
    environment = _venv(tmp_path / "venv")
    installed = _shell(FROM_CHECKOUT, environment, tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]
    version = _shell("ernie-patch --version && ernie-patch list", environment, tmp_path)
    assert version.returncode == 0 and "diffusers-rope" in version.stdout, version.stderr


def test_install_offline_from_a_wheelhouse(tmp_path: Path):
    (tmp_path / "ernie-patcher").symlink_to(ROOT)
    builder = _venv(tmp_path / "builder")
    built = _shell(WHEELHOUSE, builder, tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    wheels = sorted(p.name.split("-")[0].lower() for p in (tmp_path / "wheelhouse").glob("*.whl"))
    assert {"ernie_patcher", "click", "rich", "packaging"} <= set(wheels), wheels
    target = _venv(tmp_path / "offline")
    target = {k: v for k, v in target.items() if not k.startswith("PIP_")}  # nothing but the wheelhouse:
    target.update(PIP_CONFIG_FILE=os.devnull)  # no index, no find-links from this machine's pip configuration
    installed = _shell(OFFLINE, target, tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]
    shown = _shell("ernie-patch list", target, tmp_path)
    assert shown.returncode == 0 and "diffusers-rope" in shown.stdout, shown.stderr
