"""Fixtures for the authoring tests: real wheels installed with --no-deps, and the CLI in-process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from ernie_patcher.cli import main
from support.realpkgs import DIFFUSERS, VLLM_OMNI, WHEELS, install_target, wheel

ROOT = Path(__file__).resolve().parents[2]
TRANSFORMER = "diffusers/models/transformers/transformer_ernie_image.py"
DISPATCH = "diffusers/models/attention_dispatch.py"
OMNI_PIPELINE = "vllm_omni/diffusion/models/ernie_image/pipeline_ernie_image.py"
OMNI_DIR = "vllm_omni/diffusion/models/ernie_image"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def cli(*args: str | Path) -> Result:
    """Run `ernie-patch ARGS` in-process (no TTY, so plain output)."""
    out = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return Result(out.exit_code, out.stdout, out.stderr)


def cli_process(*args: str | Path, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "ernie_patcher", *map(str, args)], capture_output=True,
                          text=True, env=environ, timeout=300)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A fresh pip --no-deps --target tree of the real diffusers 0.38.0 and vllm-omni 0.20.0."""
    return install_target(tmp_path / "site", DIFFUSERS, VLLM_OMNI)


@pytest.fixture
def local_index(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make `pip download` find the cached real wheels without the network (pip reads PIP_* vars)."""
    wheel(*DIFFUSERS)
    wheel(*VLLM_OMNI)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(WHEELS))
    return WHEELS
