"""Run the selftest in the target interpreter and check what it answers; never imports torch itself.

The runtime package is copied to a private temp directory and run there with `-I` (no PYTHONPATH, no
user site, no current directory on sys.path), `-B` (no bytecode written into the target environment)
and an explicit sys.path entry for that directory only,
so the target interpreter needs no ernie-patcher and cannot pick up anything of it but the checks.
Its answer is hostile input: it runs bounded (target.runner: stdout capped, the tail of stderr kept,
a timeout, every process it started ended), and the JSON document is checked field by field. A
--site directory someone else could write is refused: it goes ahead of the standard library; as
root, so is a --python interpreter another user could replace (target.interpreter), unless
--allow-user-writable.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExitCode, PatcherError
from ..settings import seconds
from ..target.runner import run_bounded

RUNTIME = Path(__file__).resolve().parent / "runtime"
PACKAGE = "ernie_patcher_selftest_runtime"
TIMEOUT_ENV = "ERNIE_PATCHER_SELFTEST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0
SP_TIMEOUT_ENV = "ERNIE_PATCHER_SELFTEST_SP_TIMEOUT"
DEFAULT_SP_TIMEOUT = 600.0
MAX_TIMEOUT = 86400.0
STDOUT_CAP = 1 << 20  # the document is a few KiB; more is refused, not parsed
STDERR_TAIL = 1 << 16  # the last 64 KiB of stderr are kept for the error's details
STATUSES = ("passed", "failed", "skipped")
MAX_CHECKS = 200
HINT = ("install torch in that interpreter (e.g. `pip install torch` there, the build for its device), "
        "or pass --python the interpreter of the patched environment")
BOOTSTRAP = (f"import sys, runpy; sys.path.insert(0, sys.argv[1]); del sys.argv[1]; "
             f"runpy.run_module('{PACKAGE}', run_name='__main__', alter_sys=True)")


@dataclass(frozen=True)
class Check:
    """One check as the target interpreter reported it, validated."""

    name: str
    status: str
    error: float | None
    tolerance: float | None
    unit: str
    detail: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "error": self.error, "tolerance": self.tolerance,
                "unit": self.unit, "detail": self.detail, "seconds": self.seconds}


@dataclass
class SelftestReport:
    """What the selftest found; `exit_code` is 0 when every check passed or was skipped with a reason."""

    python: str
    device: str
    dtype: str
    versions: dict[str, str]
    checks: list[Check]
    seconds: float
    failed: list[Check] = field(init=False)

    def __post_init__(self) -> None:
        self.failed = [check for check in self.checks if check.status == "failed"]

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.SELFTEST_FAILED if self.failed else ExitCode.OK

    def error(self) -> PatcherError | None:
        """The one-line error naming the failed checks, or None."""
        if not self.failed:
            return None
        first = self.failed[0]
        names = ", ".join(check.name for check in self.failed)
        measured = f"{first.error:.3g} > tolerance {first.tolerance:.3g}" if first.error is not None else first.detail
        return PatcherError(ExitCode.SELFTEST_FAILED,
                            f"selftest failed: {names} ({first.name}: {measured[:300]})",
                            details=[f"{c.name}: {c.detail}" for c in self.failed],
                            hint="run `ernie-patch verify`; attach `ernie-patch selftest --json` to a bug report")

    def to_dict(self) -> dict[str, Any]:
        """What goes under `selftest` in the command's JSON document: the checks and where they ran."""
        return {"device": self.device, "dtype": self.dtype, "versions": self.versions, "seconds": self.seconds,
                "checks": [check.to_dict() for check in self.checks]}


def _timeout() -> float:
    return seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT, minimum=1.0, maximum=MAX_TIMEOUT)


def _sp_timeout() -> float:
    """Seconds each group of SP workers may run (read only when --sp asks for them)."""
    return seconds(SP_TIMEOUT_ENV, DEFAULT_SP_TIMEOUT, minimum=1.0, maximum=MAX_TIMEOUT)


def _copy_runtime(into: Path) -> Path:
    """The runtime package's .py files copied into INTO/PACKAGE (a private directory: mode 0700)."""
    package = into / PACKAGE
    package.mkdir()
    for source in RUNTIME.glob("*.py"):
        shutil.copyfile(source, package / source.name)
    return into


def _run(python: str, options: dict[str, Any]) -> tuple[int | None, bytes, bool, str]:
    """(exit code, None when ended; stdout; stdout over the cap; stderr tail) of one selftest run."""
    with tempfile.TemporaryDirectory(prefix="ernie-patch-selftest-") as tmp:
        directory = _copy_runtime(Path(tmp))
        try:
            finished = run_bounded([python, "-I", "-B", "-c", BOOTSTRAP, str(directory), json.dumps(options)],
                                   _timeout(), stdout_cap=STDOUT_CAP, stderr_tail=STDERR_TAIL)
        except OSError as exc:
            raise PatcherError(ExitCode.ENVIRONMENT, f"cannot run interpreter {python}: {exc.strerror or exc}",
                               hint=HINT) from None
    return finished.code, finished.stdout, finished.stdout_over, finished.stderr.decode(errors="replace")


def _unsafe_site(site: Path) -> str | None:
    """Why SITE and the directories above it are not safe ahead of the standard library, or None:
    each must be owned by the running user or root, and writable by nobody else (unless it is the
    user's own and the user is not root, or it is sticky like /tmp and not SITE itself)."""
    me = os.geteuid()
    directory = site
    while True:
        try:
            st = os.stat(directory)
        except OSError as exc:
            return f"{directory} cannot be inspected ({exc.strerror or exc})"
        if st.st_uid not in (me, 0):
            return f"{directory} is owned by uid {st.st_uid}, neither you (uid {me}) nor root"
        shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky_above = directory != site and st.st_mode & stat.S_ISVTX
        if shared and not sticky_above and (st.st_uid != me or me == 0):
            return f"{directory} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'}"
        if directory.parent == directory:
            return None
        directory = directory.parent


def _checked_site(site: Path) -> str:
    resolved = site.resolve()
    why = _unsafe_site(resolved)
    if why is not None:
        raise PatcherError(ExitCode.ENVIRONMENT, f"refusing --site {site}: {why}; its modules would run ahead of "
                                                 "the standard library", hint="pass a directory only you (or root) "
                                                 "can write, e.g. a copy made with pip install --target")
    return str(resolved)


def _refuse_user_writable_search_path(python: str, allowed: bool) -> None:
    """As root, refuse a selftest in PYTHON when one of its site directories is one another user can
    write: the selftest imports torch and the patched packages from there and, unlike the environment
    probe, runs `site`, so that user's .pth lines and modules would run as root. Apply's rule for the
    directories it writes, applied to the code the selftest runs; found from the interpreter's layout
    (site_directories), since running anything of it first is what must not happen."""
    if allowed or os.geteuid() != 0:
        return
    from ..target.interpreter import changeable_by_others, site_directories

    for entry in site_directories(python):
        found = changeable_by_others(entry)
        if found is not None:
            raise PatcherError(ExitCode.ENVIRONMENT,
                               f"refusing to run selftest in {python} as root: {found[0]} is {found[1]}, and the "
                               f"selftest imports from {entry}",
                               details=["the selftest imports torch, diffusers and vllm-omni and runs the .pth files "
                                        "of the interpreter's site directories: a user who can write them runs "
                                        "code as root"],
                               hint="run selftest as the user who owns the environment, make its site directories "
                                    "root's and not group- or world-writable, or pass --allow-user-writable if every "
                                    "user who can write them is trusted")


def _refuse(python: str, what: str, stderr: str) -> PatcherError:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    said = f": it printed {lines[-1][:200]!r} on stderr" if lines else ""
    return PatcherError(ExitCode.ENVIRONMENT, f"selftest in interpreter {python} {what}{said}",
                        details=lines[-10:], hint=HINT)


def _number(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"not a finite number: {value!r}")
    return float(value)


def _text(value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"not a string: {type(value).__name__}")
    return value[:limit]


def _check(data: object) -> Check:
    if not isinstance(data, dict):
        raise ValueError("a check is not an object")
    status = data.get("status")
    if status not in STATUSES:
        raise ValueError(f"check status {status!r} is none of {STATUSES}")
    check = Check(_text(data.get("name"), 100), status, _number(data.get("error")), _number(data.get("tolerance")),
                  _text(data.get("unit", ""), 10), _text(data.get("detail", ""), 2000),
                  _number(data.get("seconds", 0.0)) or 0.0)
    if status == "passed" and (check.error is None or check.tolerance is None or check.error > check.tolerance):
        raise ValueError(f"check {check.name!r} says passed without an error within its tolerance")
    if status == "skipped" and not check.detail:
        raise ValueError(f"check {check.name!r} is skipped without a reason")
    return check


def _parse(python: str, stdout: bytes) -> tuple[dict[str, Any], list[Check]]:
    """The document the runtime printed, checked; ValueError says what is wrong with it."""
    document = json.loads(stdout.decode("utf-8"))
    if not isinstance(document, dict) or document.get("schema") != 1:
        raise ValueError("not a selftest document (schema 1)")
    if document.get("error") is not None:
        hint = document.get("hint")
        raise PatcherError(ExitCode.ENVIRONMENT, f"selftest in interpreter {python}: "
                                                 f"{_text(document['error'], 300)}",
                           hint=_text(hint, 300) if isinstance(hint, str) else HINT)
    checks = document.get("checks")
    if not isinstance(checks, list) or not 0 < len(checks) <= MAX_CHECKS:
        raise ValueError("no list of checks")
    versions = document.get("versions")
    if not isinstance(versions, dict):
        raise ValueError("no versions")
    return document, [_check(item) for item in checks]


def run_selftest(python: str | None, site: Path | None, device: str, sp: int | None, dtype: str,
                 threads: int | None = None, allow_user_writable: bool = False) -> SelftestReport:
    """Run the checks in PYTHON (default: this interpreter) with SITE first on its sys.path. As root,
    a PYTHON another user could replace is refused unless ALLOW_USER_WRITABLE, as for --site."""
    if python:
        from ..target.interpreter import refuse_user_writable, resolve

        python = resolve(python)
        refuse_user_writable(python, allow_user_writable)
        _refuse_user_writable_search_path(python, allow_user_writable)
    python = python or sys.executable
    options = {"device": device, "dtype": dtype, "sp": sp, "threads": threads,
               "site": _checked_site(site) if site else None, "sp_timeout": _sp_timeout() if sp else None}
    code, stdout, over, stderr = _run(python, options)
    if over:
        raise _refuse(python, f"printed more than {STDOUT_CAP} bytes on stdout and was ended", stderr)
    if code is None:
        raise _refuse(python, f"did not finish within {_timeout():g} s ({TIMEOUT_ENV}) and was ended with every "
                              "process it started", stderr)
    if code != 0:
        raise _refuse(python, f"failed (exit {code})", stderr)
    try:
        document, checks = _parse(python, stdout)
        versions = {_text(k, 50): _text(v, 100) for k, v in document["versions"].items()}
        return SelftestReport(_text(document.get("python", python), 500), _text(document.get("device"), 200),
                              _text(document.get("dtype"), 10), versions, checks,
                              _number(document.get("seconds", 0.0)) or 0.0)
    except (ValueError, RecursionError, UnicodeDecodeError, AttributeError) as exc:
        raise _refuse(python, f"printed no valid selftest document ({str(exc)[:200]})", stderr) from None
