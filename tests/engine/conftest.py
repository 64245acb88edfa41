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
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target

ROOT = Path(__file__).resolve().parents[2]
TRANSFORMER = "diffusers/models/transformers/transformer_ernie_image.py"
DISPATCH = "diffusers/models/attention_dispatch.py"
OMNI_PIPELINE = "vllm_omni/diffusion/models/ernie_image/pipeline_ernie_image.py"
OMNI_TRANSFORMER = "vllm_omni/diffusion/models/ernie_image/ernie_image_transformer.py"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)


def cli(*args: str | Path) -> Result:
    """Run `ernie-patch ARGS` in-process (no TTY, so plain output)."""
    runner = CliRunner()
    out = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    return Result(out.exit_code, out.stdout, out.stderr)


def cli_process(*args: str | Path, env: dict | None = None, python: str = sys.executable) -> subprocess.CompletedProcess:
    """Run `python -m ernie_patcher ARGS` as a separate process."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([python, "-m", "ernie_patcher", *map(str, args)], capture_output=True, text=True,
                          env=environ, timeout=300)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A fresh pip --no-deps --target tree of the real diffusers 0.38.0 and vllm-omni 0.20.0."""
    return install_target(tmp_path / "site", DIFFUSERS, VLLM_OMNI)
