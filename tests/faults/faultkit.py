"""Helpers of the fault-injection suite: run the CLI, build a patch set, compare trees.

Every scenario runs against the real diffusers 0.38.0 / vllm-omni 0.20.0 files installed with
`pip install --no-deps --target`; the patch set is the suite's own (difflib diffs of small
edits to those real files), so the scenarios do not depend on the shipped patches.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

from ernie_patcher.cli import main
from support.patchsets import PatchDef, file_diff, insert_after, new_file_diff, write_patchset
from support.tree import snapshot

ROOT = Path(__file__).resolve().parents[2]
TRANSFORMER = "diffusers/models/transformers/transformer_ernie_image.py"
DISPATCH = "diffusers/models/attention_dispatch.py"
OMNI_PIPELINE = "vllm_omni/diffusion/models/ernie_image/pipeline_ernie_image.py"
CREATED = "vllm_omni/diffusion/models/ernie_image/fault_helpers.py"
OMNI_RECORD = "vllm_omni-0.20.0.dist-info/RECORD"
STATE = ".ernie-patcher"
KILL_ENV = "ERNIE_PATCHER_TEST_KILL_AT"
PAUSE_ENV = "ERNIE_PATCHER_TEST_PAUSE_AT"
# The files the fault set writes, in the order apply writes them (journal checkpoints file-1..5).
WRITTEN = (TRANSFORMER, DISPATCH, OMNI_PIPELINE, CREATED, OMNI_RECORD)
# Inputs each fuzz target tried in this run; the conftest prints them in the terminal summary.
FUZZ_COUNTS: dict[str, int] = {}
# One-line tallies of the randomized scenarios (kill loop, disk-full sweep, races), printed likewise.
SUMMARY: list[str] = []


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


def _environ(env: dict[str, str] | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, PAUSE_ENV)}
    return {**base, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}


def command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "ernie_patcher", *map(str, args)]


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """`ernie-patch ARGS` as a separate process."""
    done = subprocess.run(command(*args), capture_output=True, text=True, env=_environ(env), timeout=300)
    return Result(done.returncode, done.stdout, done.stderr)


def spawn(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_environ(env))


def fault_set(site: Path, directory: Path) -> Path:
    """Three patches, two packages, five writes: two diffusers edits, a vllm-omni edit + new file."""
    omni = (file_diff(site, OMNI_PIPELINE, insert_after("import torch", "FAULT_MARK_OMNI = \"omni-mark\"\n"))
            + new_file_diff(CREATED, ["def fault_helper():\n", "    return 1\n"]))
    return write_patchset(directory, [
        PatchDef("rope", "diffusers", "diffusers",
                 file_diff(site, TRANSFORMER, insert_after("import torch", "FAULT_MARK = \"rope-mark\"\n")),
                 probes=[{"file": TRANSFORMER, "kind": "string", "value": "rope-mark"}]),
        PatchDef("dispatch", "diffusers", "diffusers",
                 file_diff(site, DISPATCH, insert_after("import torch", "FAULT_MARK = \"dispatch-mark\"\n")),
                 probes=[{"file": DISPATCH, "kind": "string", "value": "dispatch-mark"}]),
        PatchDef("omni", "vllm-omni", "vllm_omni", omni, versions="==0.20.0",
                 probes=[{"file": CREATED, "kind": "function", "name": "fault_helper", "params": []},
                         {"file": OMNI_PIPELINE, "kind": "string", "value": "omni-mark"}]),
    ], name="fault-set")


def tree(site: Path) -> dict[str, tuple[str, int]]:
    """Snapshot of SITE without the tool's own state directory."""
    return {k: v for k, v in snapshot(site).items() if k != STATE and not k.startswith(STATE + "/")}


def settled(site: Path) -> dict[str, tuple[str, int]]:
    """Snapshot of SITE where the lock file counts by presence only (it holds the last holder's pid)."""
    entries = snapshot(site)
    lock = f"{STATE}/lock"
    if lock in entries:
        entries[lock] = ("lock", entries[lock][1])
    return entries


def debris(site: Path) -> list[str]:
    """Temporary files of an interrupted atomic write left in SITE outside the tool's state directory
    (the state directory's own are swept when it is next emptied)."""
    found = (str(p.relative_to(site)) for p in site.rglob("*.ernie-tmp"))
    return sorted(p for p in found if not p.startswith(STATE + "/"))


def changed(before: dict[str, tuple[str, int]], after: dict[str, tuple[str, int]]) -> list[str]:
    """Entries that differ between two snapshots (for readable assertion messages)."""
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def states(site: Path, patches: Path) -> list[str]:
    result = cli("status", "--site", site, "--patches", patches, "--json")
    assert result.code == 0, result.stdout + result.stderr
    return [p["state"] for p in result.json()["patches"]]
