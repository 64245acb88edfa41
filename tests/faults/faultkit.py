"""Helpers of the fault-injection suite: run the CLI, build a patch set, compare trees.

Every scenario runs against the real diffusers 0.38.0 / vllm-omni 0.20.0 files installed with
`pip install --no-deps --target`; the patch set is the suite's own (difflib diffs of small
edits to those real files), so the scenarios do not depend on the shipped patches.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support import cli as _cli
from support.cli import DISPATCH, OMNI_PIPELINE, TRANSFORMER, Result, cli, command, environ  # noqa: F401
from support.patchsets import PatchDef, file_diff, insert_after, new_file_diff, write_patchset
from support.tree import snapshot

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


NO_BYTECODE = {"PYTHONDONTWRITEBYTECODE": "1"}


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """`ernie-patch ARGS` as a separate process."""
    return _cli.run(*args, env={**NO_BYTECODE, **(env or {})})


def spawn(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environ({**NO_BYTECODE, **(env or {})}))


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


def wait_stopped(process: subprocess.Popen) -> None:
    """Wait until PROCESS stops itself at its pause checkpoint (test-only SIGSTOP hook)."""
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), "the paused run ended instead of stopping at its checkpoint"
