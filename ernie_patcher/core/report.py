"""What a command worked on and what it found or did: the data every renderer reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ExitCode, PatcherError

if TYPE_CHECKING:  # verify and status start faster without the assessment machinery
    from ..patchset.series import Series
    from ..target.discovery import Environment
    from .assess import PatchState


@dataclass(frozen=True)
class Target:
    """Which environment and which patch set a command works on."""

    python: str | None = None
    site: Path | None = None
    patches: Path | None = None
    allow_user_writable: bool = False  # as root: run a --python another user could replace


@dataclass
class Action:
    """A file the command changed (or, with --dry-run, would change)."""

    path: str
    what: str
    detail: str = ""

    def to_dict(self) -> dict:
        return {"path": self.path, "action": self.what, "detail": self.detail}


@dataclass
class Report:
    command: str
    env: Environment
    series: Series | None
    patches: list[PatchState] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    exit_code: ExitCode = ExitCode.OK
    error: PatcherError | None = None
    dry_run: bool = False
    manifest_patches: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # ids apply applied or revert took out (or would)

    def gate_error(self) -> PatcherError | None:
        """`status --exit-code`: None when every patch is applied, else the error of the worst state
        (drifted 6, conflict 5, unsupported 4, missing 3, not applied 1), naming its first patch."""
        codes = [(GATE_CODES.get(p.state, ExitCode.NOT_VERIFIED), p) for p in self.patches]
        worst = max((code for code, _ in codes), default=ExitCode.OK)
        if worst == ExitCode.OK:
            return None
        failing = [p for code, p in codes if code == worst]
        first = failing[0]
        others = [p for code, p in codes if code != ExitCode.OK and p is not first and p.reason]
        return PatcherError(worst, f"status: {first.spec.id}: {first.reason or 'patch is ' + first.state}",
                            details=[f"{p.spec.id}: {p.reason}" for p in others],
                            hint="`ernie-patch status` shows each patch's state; `ernie-patch apply` applies "
                                 "what is not applied")


GATE_CODES = {"applied": ExitCode.OK, "not-applied": ExitCode.NOT_VERIFIED, "missing": ExitCode.MISSING,
              "unsupported": ExitCode.UNSUPPORTED_VERSION, "conflict": ExitCode.CONFLICT,
              "drifted": ExitCode.DRIFTED, "upstream": ExitCode.OK}
