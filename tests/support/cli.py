"""Run `ernie-patch` from the tests, in-process or as a process, and the real target paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from ernie_patcher.cli.commands import main

ROOT = Path(__file__).resolve().parents[2]
TRANSFORMER = "diffusers/models/transformers/transformer_ernie_image.py"
DISPATCH = "diffusers/models/attention_dispatch.py"
OMNI_DIR = "vllm_omni/diffusion/models/ernie_image"
OMNI_PIPELINE = f"{OMNI_DIR}/pipeline_ernie_image.py"
OMNI_TRANSFORMER = f"{OMNI_DIR}/ernie_image_transformer.py"
TEST_HOOKS = ("ERNIE_PATCHER_TEST_KILL_AT", "ERNIE_PATCHER_TEST_PAUSE_AT")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        return json.loads(self.stdout)

    @property
    def reason(self) -> str:
        """The first line of the error output: the one-line reason."""
        lines = self.stderr.strip().splitlines()
        return lines[0] if lines else ""


def cli(*args: str | Path) -> Result:
    """`ernie-patch ARGS` in this process (no TTY: plain output); any traceback fails the test."""
    out = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return Result(out.exit_code, out.stdout, out.stderr)


def environ(env: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without the test hooks, with the checkout importable, plus ENV."""
    base = {k: v for k, v in os.environ.items() if k not in TEST_HOOKS}
    return {**base, "PYTHONPATH": str(ROOT), **(env or {})}


def command(*args: str | Path, python: str = sys.executable) -> list[str]:
    return [python, "-m", "ernie_patcher", *map(str, args)]


def run(*args: str | Path, env: dict[str, str] | None = None, python: str = sys.executable) -> Result:
    """`ernie-patch ARGS` as a separate process."""
    done = subprocess.run(command(*args, python=python), capture_output=True, text=True, env=environ(env),
                          timeout=300)
    return Result(done.returncode, done.stdout, done.stderr)
