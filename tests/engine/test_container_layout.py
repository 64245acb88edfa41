"""The container build of examples/Dockerfile, without docker: a fresh venv, ernie-patcher installed
offline from a wheelhouse (as a build with no network after COPY would), the real releases installed
with --no-deps, then the Dockerfile's `ernie-patch apply && ernie-patch verify` with no TTY and NO_COLOR."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from support.cli import ROOT
from support.realpkgs import CACHE, wheel

DOCKERFILE = ROOT / "examples" / "Dockerfile"


def _wheelhouse(tmp_path: Path) -> Path:
    """ernie-patcher's wheel, built from this checkout, and its dependencies' wheels (downloaded once)."""
    deps = CACHE / "wheelhouse-deps"
    if not (deps / ".complete").exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                        "--only-binary=:all:", "-d", str(deps), *_dependencies()], check=True)
        (deps / ".complete").write_text("ok\n")
    house = tmp_path / "wheelhouse"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "-w", str(house), str(ROOT)], check=True, cwd=tmp_path)
    for wheel_file in deps.glob("*.whl"):
        (house / wheel_file.name).symlink_to(wheel_file)
    return house


def _dependencies() -> list[str]:
    """The runtime requirements pyproject.toml declares (what the offline install must find)."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def _dockerfile_env() -> dict[str, str]:
    """The Dockerfile's ENV lines (NAME=VALUE)."""
    return dict(re.findall(r"^ENV ([A-Z_]+)=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE))


def _dockerfile_step() -> str:
    """The Dockerfile's patching step, so the test runs what the example says."""
    runs = re.findall(r"^RUN (ernie-patch .*)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert runs == ["ernie-patch apply && ernie-patch verify"], runs
    return runs[0]


def test_dockerfile_layout_applies_and_verifies_offline(tmp_path: Path):
    house = _wheelhouse(tmp_path)
    env_dir = tmp_path / "image"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-deps", str(wheel("diffusers", "0.40.0")), str(wheel("vllm-omni", "0.30.0"))],
                   check=True)
    subprocess.run([*pip, "--no-index", "--find-links", str(house), "ernie-patcher"], check=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("ERNIE_PATCHER_", "PYTHON"))}
    home = tmp_path / "home"
    home.mkdir()
    environment.pop("XDG_CACHE_HOME", None)
    environment.update(NO_COLOR="1", TERM="dumb", PATH=f"{env_dir / 'bin'}:{os.environ['PATH']}", HOME=str(home),
                       **_dockerfile_env())
    result = subprocess.run(["sh", "-c", _dockerfile_step()], stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, env=environment, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "verified: 5/5 patches applied" in result.stdout
    assert "\x1b[" not in result.stdout + result.stderr
    assert list(home.rglob("*")) == [], "the build left files in the home directory (an image layer)"
    quiet = subprocess.run([str(env_dir / "bin" / "ernie-patch"), "verify", "--quiet"], capture_output=True,
                           text=True, env=environment)
    assert quiet.returncode == 0 and quiet.stdout.count("\n") == 1, quiet.stdout
