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

    def gate_code(self) -> ExitCode:
        """`status --exit-code`: OK when every patch is applied, else the code of the worst state
        (drifted 6, conflict 5, unsupported 4, missing 3, not applied 1), for a CI gate."""
        codes = [GATE_CODES.get(p.state, ExitCode.NOT_VERIFIED) for p in self.patches]
        return max(codes, default=ExitCode.OK) if self.exit_code == ExitCode.OK else self.exit_code


GATE_CODES = {"applied": ExitCode.OK, "not-applied": ExitCode.NOT_VERIFIED, "missing": ExitCode.MISSING,
              "unsupported": ExitCode.UNSUPPORTED_VERSION, "conflict": ExitCode.CONFLICT,
              "drifted": ExitCode.DRIFTED}
