"""The one JSON document every command prints under --json, success or failure, with the same keys;
its JSON Schema ships beside this module (schema/report.schema.json)."""
from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from .. import __version__
from ..errors import ExitCode, PatcherError

SCHEMA = 2
# Keys every document has; a command without that kind of data leaves the empty value.
EMPTY: dict[str, Any] = {
    "python": None, "state_dir": None, "patch_set": None, "dry_run": False, "patches": [], "actions": [],
    "notes": [], "manifest_patches": [], "series": None, "diff": None, "created": None, "selftest": None,
    "ported": None,
}


def document(command: str, error: PatcherError | None = None, code: ExitCode | None = None, **payload: Any) -> dict:
    """The document of COMMAND: the envelope (schema, tool, version, command, ok, exit_code, error)
    and every payload key, PAYLOAD's values in place of the empty ones."""
    unknown = set(payload) - set(EMPTY)
    if unknown:
        raise ValueError(f"not keys of the JSON document: {sorted(unknown)}")
    if code is None:
        code = error.code if error else ExitCode.OK
    return {"schema": SCHEMA, "tool": "ernie-patcher", "version": __version__, "command": command,
            "ok": code == ExitCode.OK, "exit_code": int(code), "error": error.to_dict() if error else None,
            **EMPTY, **payload}


def emit(doc: dict, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(json.dumps(doc, indent=2) + "\n")
