"""A user patch set adding a two-level subpackage to the real diffusers 0.38.0, and a way to import it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.cli import DISPATCH
from support.patchsets import PatchDef, file_diff, insert_after, new_file_diff, write_patchset

TOP = "diffusers/ernie_extra"
SUB = f"{TOP}/kernels"
NEW_FILES = {
    f"{TOP}/__init__.py": ["LEVEL = 1\n"],
    f"{SUB}/__init__.py": ["from .. import LEVEL as PARENT_LEVEL\n", "LEVEL = PARENT_LEVEL + 1\n"],
    f"{SUB}/rope.py": ["from . import LEVEL\n", "\n", "\n", "def depth():\n", "    return LEVEL\n"],
}
RECORD = "diffusers-0.38.0.dist-info/RECORD"
# The new modules imported by the real import system, without running diffusers/__init__.py
# (which needs diffusers' dependencies): the package object only names its directory.
IMPORT = ("import sys, types; root = types.ModuleType('diffusers'); root.__path__ = [sys.argv[1] + '/diffusers'];"
          " sys.modules['diffusers'] = root; from diffusers.ernie_extra.kernels import rope; print(rope.depth())")


def subpackage_set(site: Path, directory: Path) -> Path:
    diff = file_diff(site, DISPATCH, insert_after("import torch", "EXTRA_MARK = \"extra-mark\"\n"))
    diff += "".join(new_file_diff(relpath, lines) for relpath, lines in NEW_FILES.items())
    return write_patchset(directory, [PatchDef(
        "extra", "diffusers", "diffusers", diff,
        probes=[{"file": f"{SUB}/rope.py", "kind": "function", "name": "depth", "params": []},
                {"file": DISPATCH, "kind": "string", "value": "extra-mark"}])])


def import_depth(site: Path) -> subprocess.CompletedProcess:
    """The new module imported by this venv's python (writing its bytecode, as any import does)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return subprocess.run([sys.executable, "-c", IMPORT, str(site)], capture_output=True, text=True, env=env)
