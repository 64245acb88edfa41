"""A release's pristine files, from its published wheel: `pip download --no-deps` (or a wheel the user
gives), read as a zip without installing anything."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from ..errors import ExitCode, PatcherError
from ..target.discovery import InstalledPackage

PIP_TIMEOUT = 900


def _has_pip(python: str) -> bool:
    try:
        return subprocess.run([python, "-m", "pip", "--version"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pip_command(python: str | None, requirement: str) -> list[str]:
    """The target interpreter's pip when it has one, else the pip of the interpreter running this;
    an error naming --wheel when neither has pip (uv environments have none)."""
    for candidate in ([python] if python else []) + [sys.executable]:
        if _has_pip(candidate):
            return [candidate, "-m", "pip"]
    where = f"{python} nor {sys.executable}" if python else sys.executable
    raise PatcherError(ExitCode.ENVIRONMENT, f"cannot download {requirement}: no pip in {where}",
                       hint=f"pass --wheel FILE with the wheel of {requirement} (e.g. from `pip download --no-deps "
                            f"{requirement}` on a machine with pip, or `uv pip download`), or install pip")


def download_wheel(package: InstalledPackage, python: str | None, dest: Path, progress: bool = False) -> Path:
    """`pip download --no-deps PACKAGE==VERSION` of the installed release (see download_release)."""
    return download_release(package.name, package.version, python, dest, progress)


def download_release(name: str, version: str, python: str | None, dest: Path, progress: bool = False) -> Path:
    """`pip download --no-deps NAME==VERSION` (wheels only) into DEST; the wheel's path. With
    PROGRESS, pip's own output (its progress bar) goes to stderr."""
    requirement = f"{name}=={version}"
    command = [*pip_command(python, requirement), "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", *([] if progress else ["-q"]), "-d", str(dest), requirement]
    output = {"stdout": sys.stderr, "stderr": None} if progress else {"capture_output": True}
    try:
        done = subprocess.run(command, text=True, timeout=PIP_TIMEOUT, **output)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PatcherError(ExitCode.ENVIRONMENT, f"pip download {requirement} could not run: {exc}",
                           hint="pass --wheel FILE with the wheel of this release") from None
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = [line for line in (done.stderr or "").strip().splitlines() if line.strip()][-3:]
        raise PatcherError(ExitCode.ENVIRONMENT, f"pip download {requirement} found no wheel of that release",
                           details=tail, hint="check access to the package index (a local build such as "
                           "'+npu' is not published), or pass --wheel FILE with the wheel it was installed from")
    return wheels[0]


def wheel_release(wheel: Path) -> tuple[str, str]:
    """(distribution name, version) that WHEEL's file name declares."""
    try:
        name, version, _, _ = parse_wheel_filename(Path(wheel).name)
    except InvalidWheelFilename as exc:
        raise PatcherError(ExitCode.USAGE, f"{wheel} is not a wheel: {exc}") from None
    return str(name), str(version)


def same_release(name: str, version: str, wanted_name: str, wanted_version: str) -> bool:
    """Whether NAME VERSION (a wheel's) is the release WANTED_NAME WANTED_VERSION."""
    try:
        same_version = Version(version) == Version(wanted_version)
    except InvalidVersion:
        same_version = version == wanted_version
    return canonicalize_name(name) == canonicalize_name(wanted_name) and same_version


def check_wheel_release(wheel: Path, package: InstalledPackage) -> None:
    name, version = wheel_release(wheel)
    if not same_release(name, version, package.name, package.version):
        raise PatcherError(ExitCode.USAGE, f"{Path(wheel).name} is {name} {version}, but {package.name} "
                           f"{package.version} is installed", hint="use the wheel of the installed release")


def _wheel_member(names: set[str], relpath: str) -> str | None:
    if relpath in names:
        return relpath
    for name in sorted(names):
        head, _, rest = name.partition("/")
        if head.endswith(".data") and rest in (f"purelib/{relpath}", f"platlib/{relpath}"):
            return name
    return None


def pristine_files(wheel: Path, relpaths: list[str]) -> dict[str, bytes | None]:
    """The bytes of each RELPATH in WHEEL (None when the wheel does not ship it)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            found: dict[str, bytes | None] = {}
            for relpath in relpaths:
                member = _wheel_member(names, relpath)
                found[relpath] = archive.read(member) if member else None
            return found
    except (OSError, zipfile.BadZipFile) as exc:
        raise PatcherError(ExitCode.ENVIRONMENT, f"cannot read wheel {wheel}: {exc}") from None
