"""Exit codes and the one error type the engine raises."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; documented in `ernie-patch --help` and the README."""

    OK = 0
    NOT_VERIFIED = 1
    USAGE = 2
    MISSING = 3
    UNSUPPORTED_VERSION = 4
    CONFLICT = 5
    DRIFTED = 6
    ENVIRONMENT = 7


class PatcherError(Exception):
    """A failure the user can act on: a one-line reason, then optional detail lines."""

    def __init__(self, code: ExitCode, reason: str, details: list[str] | None = None,
                 hint: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.details = list(details or [])
        self.hint = hint

    def to_dict(self) -> dict:
        return {"code": int(self.code), "kind": self.code.name.lower(), "reason": self.reason,
                "details": self.details, "hint": self.hint}
