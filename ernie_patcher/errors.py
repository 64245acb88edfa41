"""Exit codes and the one error type the engine raises."""
from __future__ import annotations

import errno
from enum import IntEnum
from pathlib import Path

# Everything parsing or compiling hostile source raises: syntax, null bytes, nesting too deep for
# the compiler's recursion limit, a constant too large for memory.
COMPILE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError)


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
    SELFTEST_FAILED = 8
    INTERNAL = 70
    INTERRUPTED = 130
    TERMINATED = 143


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


def environment_error(action: str, path: Path, exc: OSError) -> PatcherError:
    reason = exc.strerror or str(exc)
    hint = None
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "the target is read-only: run as the owner of the environment, or remount it writable"
    elif exc.errno == errno.ENOSPC:
        hint = "free disk space and run the command again"
    return PatcherError(ExitCode.ENVIRONMENT, f"cannot {action} {path}: {reason}", hint=hint)
