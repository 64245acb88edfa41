"""`ernie-patch create`: turn edits of installed files into a patch of a series, in the spirit of patch-package.

The pristine side of the diff is the file from the wheel of the installed release (`pip download
--no-deps PACKAGE==VERSION`), accepted only if its digest equals the one in the installed RECORD,
so a patch is always written against exactly what the release ships. Nothing here prints.
"""
from __future__ import annotations

import difflib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..core.assess import decode, encode
from ..core.state import StateDir
from ..errors import ExitCode, PatcherError
from ..fs.fsops import atomic_write, read_bytes, remove_file
from ..patchset.diffparse import DEV_NULL, parse_patch
from ..patchset.hunks import apply_hunks, split_lines
from ..patchset.series import SERIES_FILE, Series, load_series, safe_relative
from ..target.discovery import Environment, InstalledPackage, discover, record_digest
from .wheels import check_wheel_release, download_wheel, pristine_files

DEFAULT_PATCH_DIR = Path("patches")
NO_NEWLINE = "\\ No newline at end of file\n"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

MODIFY, CREATE, DELETE = "modify", "create", "delete"


@dataclass(frozen=True)
class FileChange:
    """One file of the new patch: import-root-relative path, what the patch does, lines +/-."""

    relpath: str
    action: str
    added: int
    removed: int

    def to_dict(self) -> dict:
        return {"relpath": self.relpath, "action": self.action, "added": self.added, "removed": self.removed}


@dataclass
class Created:
    """What `create` wrote: the patch file, the series entry, and where the pristine side came from."""

    id: str
    package: str
    module: str
    version: str
    patch_file: Path
    series_file: Path
    wheel: str
    files: list[FileChange] = field(default_factory=list)
    replaced: bool = False
    series_created: bool = False
    python: str = ""

    def to_dict(self) -> dict:
        return {"id": self.id, "package": self.package, "module": self.module, "version": self.version,
                "versions": f"=={self.version}", "patch_file": str(self.patch_file),
                "series_file": str(self.series_file), "wheel": self.wheel, "replaced": self.replaced,
                "series_created": self.series_created, "python": self.python,
                "files": [f.to_dict() for f in self.files]}


@dataclass(frozen=True)
class AuthoringRequest:
    """The options of `create`, as given on the command line."""

    package: str
    paths: tuple[str, ...]
    name: str
    patches: Path | None = None
    python: str | None = None
    site: Path | None = None
    allow_user_writable: bool = False  # as root: run a --python another user could replace
    module: str | None = None
    wheel: Path | None = None
    summary: str = ""
    force: bool = False
    progress: bool = False  # let pip show its download progress on stderr (a terminal)


def create_patch(request: AuthoringRequest) -> Created:
    """Diff the edited installed files of PACKAGE against its release; write NAME.patch and its entry."""
    _check_name(request.name)
    directory = patch_directory(request.patches)
    series = _existing_series(directory)
    replacing = _check_free(series, directory, request)
    module = request.module or request.package.replace("-", "_")
    env = discover([(request.package, module)], request.python, request.site, request.allow_user_writable)
    package = env.package(request.package)
    if package is None:
        raise PatcherError(ExitCode.MISSING, f"{request.package} is not installed in {env.python}",
                           hint="point --python or --site at the environment whose files you edited")
    relpaths = [resolve_path(package, raw) for raw in request.paths]
    _refuse_managed(env, package, relpaths)
    with tempfile.TemporaryDirectory(prefix="ernie-patch-create-") as tmp:
        wheel = request.wheel or download_wheel(package, request.python, Path(tmp), request.progress)
        check_wheel_release(wheel, package)
        pristine = pristine_files(wheel, relpaths)
    text, changes = build_diff(package, relpaths, pristine)
    created = Created(id=request.name, package=request.package, module=module, version=package.version,
                      patch_file=directory / f"{request.name}.patch", series_file=directory / SERIES_FILE,
                      wheel=Path(wheel).name, files=changes, replaced=replacing,
                      series_created=series is None, python=env.python)
    _write(created, text, request.summary, replacing)
    return created


def _check_name(name: str) -> None:
    if not _ID.match(name):
        raise PatcherError(ExitCode.USAGE, f"patch name {name!r} is not a valid id",
                           hint="use letters, digits, '.', '_' or '-' (at most 64), starting with a letter or digit")


def patch_directory(patches: Path | None) -> Path:
    """Where the new patch goes (default ./patches), never inside the installed ernie_patcher package."""
    directory = (patches if patches is not None else DEFAULT_PATCH_DIR).resolve()
    package_dir = Path(__file__).resolve().parents[1]
    if directory == package_dir or package_dir in directory.parents:
        raise PatcherError(ExitCode.USAGE, f"refusing to write into {directory}: it is the built-in patch set "
                           "of the installed ernie-patcher",
                           hint="pass --patches DIR with a directory of your own (it is created if missing)")
    if directory.exists() and not directory.is_dir():
        raise PatcherError(ExitCode.USAGE, f"--patches {directory} is not a directory")
    return directory


def _existing_series(directory: Path) -> Series | None:
    if not (directory / SERIES_FILE).is_file():
        return None
    return load_series(directory)


def _check_free(series: Series | None, directory: Path, request: AuthoringRequest) -> bool:
    """True when the patch replaces an existing entry's diff (--force); refuse any other clash."""
    file = f"{request.name}.patch"
    existing = next((p for p in series.patches if p.id == request.name), None) if series else None
    if existing is not None:
        if not request.force:
            raise PatcherError(ExitCode.USAGE, f"patch {request.name!r} already exists in {directory / SERIES_FILE}",
                               hint="choose another --name, or pass --force to replace its diff")
        if existing.file != file or existing.package != request.package:
            raise PatcherError(ExitCode.USAGE,
                               f"patch {request.name!r} in {directory / SERIES_FILE} is {existing.file} "
                               f"for {existing.package}; --force only replaces {file} for {request.package}",
                               hint="choose another --name")
        return True
    if (directory / file).exists() and not request.force:
        raise PatcherError(ExitCode.USAGE, f"{directory / file} already exists (not listed in the series file)",
                           hint="choose another --name, or pass --force to overwrite it")
    return False


def resolve_path(package: InstalledPackage, raw: str) -> str:
    """RAW as a path relative to the import root, inside the package's module.

    Accepted: an absolute path, a path relative to the current directory that exists, or a path
    relative to the import root (`diffusers/models/attention_dispatch.py`).
    """
    root = package.import_root.resolve()
    candidate = Path(raw)
    if candidate.is_absolute() or (candidate.exists() and not raw.startswith(package.module + "/")):
        absolute = Path(os.path.abspath(candidate))
        parent = absolute.parent.resolve()
        if parent != root and root not in parent.parents:
            raise PatcherError(ExitCode.USAGE, f"{raw} is not inside {root}, where {package.name} is installed",
                               hint="name files of the installed package (absolute, or relative to site-packages)")
        relpath = str((parent / absolute.name).relative_to(root).as_posix())
    else:
        relpath = PurePosixPath(raw).as_posix()
    relative = safe_relative(relpath, "the paths given to create")
    if relative.parts[0] != package.module or len(relative.parts) < 2:
        raise PatcherError(ExitCode.USAGE, f"{raw} is not a file of module {package.module}",
                           hint=f"paths are relative to site-packages and start with {package.module}/")
    return str(relative)


def _refuse_managed(env: Environment, package: InstalledPackage, relpaths: list[str]) -> None:
    manifest = StateDir(env.state_dir).manifest()
    if manifest is None:
        return
    for entry in manifest.files.values():
        if entry.package == package.name and entry.relpath in relpaths:
            raise PatcherError(ExitCode.DRIFTED,
                               f"{entry.relpath} holds changes applied by ernie-patch ({', '.join(entry.patches)}); "
                               "a new patch would repeat them",
                               hint="run `ernie-patch revert`, make your edit on the pristine file, then create")


def _verified_pristine(package: InstalledPackage, relpath: str, pristine: bytes | None,
                       record: dict[str, str | None]) -> bytes | None:
    """PRISTINE if the installed RECORD vouches for it; refuse when it cannot be matched."""
    recorded = record.get(relpath)
    if pristine is None:
        if recorded is not None:
            raise PatcherError(ExitCode.DRIFTED, f"{relpath} is listed in the RECORD of {package.name} "
                               f"{package.version} but is not in its wheel",
                               hint="the installed package is not the published release; reinstall it")
        return None
    if recorded is None:
        raise PatcherError(ExitCode.DRIFTED, f"{relpath} has no digest in the RECORD of {package.name} "
                           f"{package.version} (editable or source install?)",
                           hint="create needs a wheel install whose RECORD proves which release the file came from; "
                           "for a source tree, write the diff with git (paths relative to site-packages)")
    if record_digest(pristine) != recorded:
        raise PatcherError(ExitCode.DRIFTED, f"{relpath} in the downloaded wheel does not match the installed "
                           f"RECORD of {package.name} {package.version} ({recorded})",
                           hint="the installed release differs from the published wheel; pass --wheel FILE "
                           "with the exact wheel it was installed from")
    return pristine


def build_diff(package: InstalledPackage, relpaths: list[str],
               pristine: dict[str, bytes | None]) -> tuple[str, list[FileChange]]:
    """The unified diff (a/ b/ paths, strip 1) of every RELPATH, checked to reproduce the edit."""
    record = package.record()
    texts: list[str] = []
    changes: list[FileChange] = []
    for relpath in dict.fromkeys(relpaths):
        before = _verified_pristine(package, relpath, pristine[relpath], record)
        after = read_bytes(package.import_root / relpath)
        if before is None and after is None:
            raise PatcherError(ExitCode.MISSING, f"{relpath} is neither installed nor in the wheel of "
                               f"{package.name} {package.version}", hint="check the path")
        if before == after:
            raise PatcherError(ExitCode.USAGE, f"{relpath} is unchanged from {package.name} {package.version}",
                               hint="edit the installed file first, or leave it out")
        text = file_diff(relpath, before, after)
        texts.append(text)
        changes.append(_describe(relpath, before, after, text))
    diff = "".join(texts)
    _check_round_trip(package, diff, pristine, relpaths)
    return diff, changes


def _lines(data: bytes | None, relpath: str) -> list[str]:
    """Lines split on '\\n' only, like the applier does (never on \\f or U+2028), ends kept."""
    if not data:
        return []
    if b"\x00" in data:
        raise PatcherError(ExitCode.USAGE, f"{relpath} is a binary file; patches hold text only")
    return split_lines(decode(data))


def file_diff(relpath: str, before: bytes | None, after: bytes | None) -> str:
    """A git-style unified diff of one file; /dev/null stands for the side that does not exist."""
    source = DEV_NULL if before is None else f"a/{relpath}"
    target = DEV_NULL if after is None else f"b/{relpath}"
    out: list[str] = []
    for line in difflib.unified_diff(_lines(before, relpath), _lines(after, relpath), source, target):
        out.append(line if line.endswith("\n") else line + "\n" + NO_NEWLINE)
    return "".join(out)


def _describe(relpath: str, before: bytes | None, after: bytes | None, text: str) -> FileChange:
    action = CREATE if before is None else DELETE if after is None else MODIFY
    body = [line for line in text.splitlines() if not line.startswith(("---", "+++"))]
    return FileChange(relpath, action, sum(line.startswith("+") for line in body),
                      sum(line.startswith("-") for line in body))


def _check_round_trip(package: InstalledPackage, diff: str, pristine: dict[str, bytes | None],
                      relpaths: list[str]) -> None:
    """Applying DIFF to the pristine files must give the edited files, byte for byte."""
    parsed = parse_patch(diff, package.module, 1, "the new patch")
    for file in parsed.files:
        relpath = str(file.path)
        text, _ = apply_hunks(decode(pristine.get(relpath) or b""), file.hunks)
        result = None if file.deletes else encode(text)
        if result != read_bytes(package.import_root / relpath):
            raise PatcherError(ExitCode.USAGE, f"the diff of {relpath} does not reproduce the edited file",
                               hint="the file mixes line endings the diff format cannot carry; normalise them")


def toml_string(value: str) -> str:
    """VALUE as a TOML basic string."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    escaped = "".join(ch if ch >= " " or ch == "\t" else f"\\u{ord(ch):04x}" for ch in escaped)
    return f'"{escaped}"'


def series_entry(created: Created, summary: str) -> str:
    """The [[patch]] table for a created patch, as text to append to a series file."""
    lines = ["[[patch]]", f"id = {toml_string(created.id)}", f"file = {toml_string(created.patch_file.name)}",
             f"package = {toml_string(created.package)}", f"module = {toml_string(created.module)}",
             f"versions = {toml_string('==' + created.version)}", "strip = 1"]
    if summary:
        lines.append(f"summary = {toml_string(summary)}")
    return "\n".join(lines) + "\n"


def _new_series_text(directory: Path) -> str:
    return (f"# Patch set for ernie-patch; see `ernie-patch list`, `ernie-patch diff ID` and docs/patch-sets.md of ernie-patcher.\n"
            f"schema = 1\nname = {toml_string(directory.name or 'patches')}\n")


def _write(created: Created, text: str, summary: str, replacing: bool) -> None:
    """Write the patch file and append its entry; undo both if the series no longer loads."""
    add_to_series(created.patch_file, text, None if replacing else series_entry(created, summary), created.id)


def add_to_series(patch_file: Path, text: str, entry: str | None, patch_id: str) -> None:
    """Write PATCH_FILE (TEXT) and append ENTRY (a [[patch]] table; None: the entry is there) to the
    series file beside it, created if missing; undo both if the series then no longer loads with
    PATCH_ID in it."""
    directory = patch_file.parent
    series_file = directory / SERIES_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PatcherError(ExitCode.ENVIRONMENT, f"cannot create {directory}: {exc.strerror}") from None
    old_patch = read_bytes(patch_file)
    old_series = read_bytes(series_file)
    atomic_write(patch_file, text.encode("utf-8", "surrogateescape"))
    if entry is not None:
        base = decode(old_series) if old_series is not None else _new_series_text(directory)
        if base and not base.endswith("\n"):
            base += "\n"
        atomic_write(series_file, encode(base + "\n" + entry))
    try:
        load_series(directory).get(patch_id)
    except PatcherError:
        _restore(patch_file, old_patch)
        _restore(series_file, old_series)
        raise


def _restore(path: Path, data: bytes | None) -> None:
    if data is None:
        remove_file(path)
    else:
        atomic_write(path, data)
