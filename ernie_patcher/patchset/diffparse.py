"""Parse a unified diff (via unidiff) into the file patches the engine applies, refusing unsafe ones."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from ..errors import ExitCode, PatcherError
from .series import safe_relative

DEV_NULL = "/dev/null"
MAX_INFERRED_STRIP = 3


@dataclass(frozen=True)
class Hunk:
    """One hunk: the lines it expects (`old`) and the lines it leaves (`new`), newlines included."""

    source_start: int
    target_start: int
    old: tuple[str, ...]
    new: tuple[str, ...]

    def reversed(self) -> "Hunk":
        return Hunk(self.target_start, self.source_start, self.new, self.old)


@dataclass(frozen=True)
class FilePatch:
    """The changes to one file; `path` is relative to the import root (e.g. `diffusers/...`)."""

    path: PurePosixPath
    hunks: tuple[Hunk, ...]
    creates: bool = False
    deletes: bool = False


@dataclass(frozen=True)
class ParsedPatch:
    files: tuple[FilePatch, ...]
    strip: int
    strip_inferred: bool


def _hunk(raw) -> Hunk:
    old: list[str] = []
    new: list[str] = []
    last: list[list[str]] = []
    for line in raw:
        kind = line.line_type
        if kind == "\\":
            for side in last:
                side[-1] = side[-1][:-1] if side[-1].endswith("\n") else side[-1]
            continue
        value = line.value
        if kind == " ":
            old.append(value)
            new.append(value)
            last = [old, new]
        elif kind == "-":
            old.append(value)
            last = [old]
        elif kind == "+":
            new.append(value)
            last = [new]
    return Hunk(source_start=raw.source_start, target_start=raw.target_start, old=tuple(old), new=tuple(new))


def _strip(name: str, level: int) -> str | None:
    parts = PurePosixPath(name).parts
    if len(parts) <= level:
        return None
    return "/".join(parts[level:])


def _raw_name(patched) -> str:
    return patched.target_file if patched.is_added_file else patched.source_file


def _infer_strip(names: list[str], module: str) -> int | None:
    for level in range(MAX_INFERRED_STRIP + 1):
        stripped = [_strip(n, level) for n in names]
        if all(s is not None and PurePosixPath(s).parts[0] == module for s in stripped):
            return level
    return None


def parse_patch(text: str, module: str, strip: int | None, where: str) -> ParsedPatch:
    """Parse TEXT; every path must stay inside MODULE. STRIP None means infer it and say so."""
    from unidiff import PatchSet  # imported here: verify of applied patches never needs it
    from unidiff.errors import UnidiffParseError

    if any(line.startswith("@@ ") and line.endswith("\r")
           for line in text.split("\n")):
        raise PatcherError(ExitCode.USAGE, f"{where} has CRLF line ends on its header lines",
                           hint="the patch file was converted to CRLF; convert it back (dos2unix) or regenerate it")
    try:
        patch_set = PatchSet(text)
    except (UnidiffParseError, ValueError, IndexError, TypeError) as exc:
        raise PatcherError(ExitCode.USAGE, f"malformed diff in {where}: {exc}",
                           hint="regenerate it with `diff -u` or `git diff`") from None
    if not len(patch_set):
        raise PatcherError(ExitCode.USAGE, f"malformed diff in {where}: no file changes found")
    for patched in patch_set:
        _refuse_unsupported(patched, where)
    names = [_raw_name(p) for p in patch_set]
    for name in names:
        safe_relative(name, where)
    inferred = strip is None
    if inferred:
        strip = _infer_strip(names, module)
        if strip is None:
            raise PatcherError(
                ExitCode.USAGE, f"paths in {where} do not point into package module {module!r}",
                details=[f"path: {n}" for n in names],
                hint="paths are relative to site-packages (e.g. 'a/diffusers/...'); set 'strip' in the series file")
    files = tuple(_file_patch(p, module, strip, where) for p in patch_set)
    paths = [f.path for f in files]
    if len(set(paths)) != len(paths):
        raise PatcherError(ExitCode.USAGE, f"{where} changes the same file twice",
                           hint="merge the changes into one diff per file")
    return ParsedPatch(files=files, strip=strip, strip_inferred=inferred)


def _refuse_unsupported(patched, where: str) -> None:
    name = patched.path
    if patched.is_binary_file:
        raise PatcherError(ExitCode.USAGE, f"binary patch for {name} in {where} is not supported")
    if patched.is_rename:
        raise PatcherError(ExitCode.USAGE, f"rename of {patched.source_file} in {where} is not supported")
    if getattr(patched, "is_symlink", False):
        raise PatcherError(ExitCode.USAGE, f"symlink change for {name} in {where} is not supported")
    if patched.source_file != DEV_NULL and patched.target_file != DEV_NULL:
        if _strip(patched.source_file, 1) != _strip(patched.target_file, 1) and \
                patched.source_file != patched.target_file:
            raise PatcherError(ExitCode.USAGE,
                               f"{where}: source {patched.source_file} and target {patched.target_file} differ",
                               hint="renames are not supported; one diff per file, same path on both sides")
    if not len(patched) and not patched.is_removed_file:
        raise PatcherError(ExitCode.USAGE, f"{where}: no hunks for {name} (mode or metadata-only change)")


def _file_patch(patched, module: str, strip: int, where: str) -> FilePatch:
    raw = _raw_name(patched)
    stripped = _strip(raw, strip)
    if stripped is None:
        raise PatcherError(ExitCode.USAGE, f"{where}: strip {strip} removes the whole path {raw!r}")
    path = safe_relative(stripped, where)
    if path.parts[0] != module or len(path.parts) < 2:
        raise PatcherError(ExitCode.USAGE, f"{where}: path {stripped!r} is outside package module {module!r}",
                           hint="a patch may only change files of the package it declares")
    hunks = tuple(_hunk(h) for h in patched)
    return FilePatch(path=path, hunks=hunks, creates=patched.is_added_file, deletes=patched.is_removed_file)
