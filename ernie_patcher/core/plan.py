"""What apply will write, planned in memory before anything is touched: the file changes, the
RECORD registrations of created files, the checks the result must pass (it imports as Python
source, every probe holds) and the manifest that will describe it."""
from __future__ import annotations

import copy
import csv
import io
import os
import stat
import tokenize
from dataclasses import dataclass, field
from importlib.util import MAGIC_NUMBER
from pathlib import Path

from .. import __version__
from ..errors import ExitCode, PatcherError
from ..fs.compilepool import CompileFailure, compile_many
from ..fs.fsops import (creates_dirs_detail, entries, import_root, new_file_mode, read_bytes, read_target, sha256,
                        stat_target)
from ..fs.safeio import FILE_MODE_BITS
from ..patchset.probes import ProbeResult, memo, probe_key, run_probe
from ..patchset.series import SERIES_FILE, ProbeSpec, Series
from ..target.discovery import record_digest
from . import bytecodecheck
from .assess import APPLIED, NOT_APPLIED, PatchState, decode
from .report import Action
from .state import FileRecord, Manifest, PatchRecord, StateDir, import_name, now
from .transaction import Write


@dataclass
class FileChange:
    """One file apply will write: its bytes before and after, and the patches that change it."""

    path: Path
    relpath: str
    package: str
    version: str
    action: str
    before: bytes | None
    after: bytes | None
    mode: int
    patches: list[str] = field(default_factory=list)
    module: str = ""
    code: bytes | None = None
    code_record: tuple[str, str] | None = None
    dirs: list[str] = field(default_factory=list)
    before_mode: int | None = None  # the mode the file has now (None: apply creates it)
    emptied: dict[str, int] = field(default_factory=dict)

    @property
    def chmod_only(self) -> bool:
        """Whether only the file's mode changes (git's old mode/new mode without a hunk)."""
        return self.before is not None and self.after == self.before and self.mode != self.before_mode


def _collect(todo: list[PatchState]) -> dict[Path, FileChange]:
    changes: dict[Path, FileChange] = {}
    for patch in todo:
        for file in patch.files:
            if file.state != NOT_APPLIED:
                continue
            change = changes.get(file.path)
            if change is None:
                before_mode = _current_mode(file.path, file.relpath) if file.current is not None else None
                mode = before_mode if before_mode is not None else new_file_mode(file.path, file.relpath) & ~0o111
                change = FileChange(file.path, file.relpath, patch.spec.package, patch.package.version,
                                 "create" if file.creates else "modify", file.current, file.patched, mode,
                                 module=patch.spec.module, before_mode=before_mode)
                changes[file.path] = change
            change.after = file.patched
            if file.mode is not None:
                change.mode = git_mode(change.mode, file.mode)
            change.patches.append(patch.spec.id)
            change.dirs = sorted(set(change.dirs) | set(file.dirs))
    return changes


def git_mode(mode: int, git: int) -> int:
    """MODE with the executable bits git mode GIT says (100755: where it may be read; 100644: none),
    as git apply leaves a file under the usual umask."""
    if git & 0o100:
        return mode | 0o100 | ((mode & 0o044) >> 2)
    return mode & ~0o111


def _current_mode(path: Path, relpath: str) -> int:
    """The permission bits of the file PATH replaces; never a set-id or sticky bit (safeio.FILE_MODE_BITS)."""
    found = stat_target(path, relpath)
    return found.st_mode & FILE_MODE_BITS if found is not None else 0o644


def _emptied(changes: dict[Path, FileChange]) -> list[str]:
    """Give each file apply removes the directories it empties (relpath -> mode): every entry in
    them removed by the plan -- files, the bytecode of removed modules, directories it empties --
    and nothing planned in them; they are removed once empty. Returns the notes for directories
    where apply removes files and that keep something else (kept, as git apply keeps them)."""
    removed = {c.path for c in changes.values() if c.after is None and c.before is not None}
    if not removed:
        return []
    kept = {c.path for c in changes.values() if c.after is not None}
    holding = {parent for path in kept for parent in path.parents}  # directories with a file the plan writes
    roots = {c.path: (import_root(c.path, c.relpath), c.relpath) for c in changes.values() if c.path in removed}
    candidates: dict[Path, tuple[Path, str]] = {}
    for path, (root, relpath) in roots.items():
        parts = relpath.split("/")
        for depth in range(len(parts) - 1, 1, -1):
            candidates[root.joinpath(*parts[:depth])] = (root, "/".join(parts[:depth]))
    emptied: dict[Path, int] = {}
    blocked: dict[Path, list[str]] = {}
    for directory, (root, relpath) in sorted(candidates.items(), key=lambda item: -len(item[0].parts)):
        listing = entries(root, relpath)
        if listing is None or directory in holding:
            continue
        left = [name for name, found in listing.items()
                if not _goes(directory / name, found, removed, emptied)]
        if left:
            blocked[directory] = left
            continue
        parent = entries(root, relpath.rpartition("/")[0]) or {}
        found = parent.get(directory.name)
        if found is not None:
            emptied[directory] = found.st_mode & 0o7777
    for change in changes.values():
        if change.path in removed:
            change.emptied = {roots[change.path][1].rsplit("/", depth)[0]: emptied[parent]
                              for depth, parent in enumerate(change.path.parents, start=1) if parent in emptied}
    return [f"kept {directory}: apply removed files from it, but it also holds {', '.join(sorted(left)[:5])}"
            f"{' ...' if len(left) > 5 else ''}, which apply did not remove" for directory, left in sorted(blocked.items())
            if not _release_file_left(directory, left)]


def _goes(path: Path, found: os.stat_result, removed: set[Path], emptied: dict[Path, int]) -> bool:
    """Whether entry PATH of a directory disappears with the plan: a file it removes, a directory it
    empties, or a __pycache__ holding only the bytecode of modules it removes."""
    if path in removed or path in emptied:
        return True
    if path.name != "__pycache__" or not stat.S_ISDIR(found.st_mode):
        return False
    stems = {p.stem for p in removed if p.parent == path.parent and p.suffix == ".py"}
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return all(n.endswith(".pyc") and n.split(".", 1)[0] in stems for n in names)


def _release_file_left(directory: Path, left: list[str]) -> bool:
    """Whether what stays in DIRECTORY looks like the release's own (a module, a subpackage), rather
    than leftovers (bytecode of other modules, a file someone put there): then no note is due."""
    return any(name.endswith(".py") or (directory / name / "__init__.py").exists() for name in left)


def _encoding_refusal(data: bytes) -> CompileFailure | None:
    """Why DATA would not import as Python source although compile() may accept it (e.g. latin-1
    in a comment of a file without a coding line), else None."""
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as exc:  # a coding line naming no codec
        return CompileFailure("SyntaxError", str(exc))
    try:
        data.decode(encoding)
    except (UnicodeDecodeError, LookupError) as exc:
        return CompileFailure("ValueError", f"not valid {encoding} ({exc})")
    return None


def _compile_checks(changes: list[FileChange]) -> None:
    """Compile the planned bytes of every Python file (in parallel: compilepool) as the import system
    would; keep each result as its new bytecode; raise on the first that would not import."""
    CompileCheck(changes).run()


COMPILE_BATCH = 8 << 20


def _batches(changes: list[FileChange]) -> list[list[FileChange]]:
    """CHANGES in runs of at most COMPILE_BATCH bytes of source (a larger file alone)."""
    batches: list[list[FileChange]] = [[]]
    size = 0
    for change in changes:
        if batches[-1] and size + len(change.after or b"") > COMPILE_BATCH:
            batches.append([])
            size = 0
        batches[-1].append(change)
        size += len(change.after or b"")
    return [batch for batch in batches if batch]


class CompileCheck:
    """The compile check of a plan, run now (`run`) or in a thread (`start`) while the transaction
    stores the originals, writes its journal and stages the new files, none of which the package
    shows; `finish` waits for it and raises on the first file that would not import, before any
    file is renamed in place (a refusal then rolls back what was staged)."""

    def __init__(self, changes: list[FileChange]) -> None:
        self.sources = [c for c in changes if c.after is not None and c.path.suffix == ".py"]
        for change in self.sources:
            refusal = _encoding_refusal(change.after or b"")
            if refusal:
                raise _not_compiling(change, refusal.kind, refusal.message)
        self._thread = None
        self._outcome: list | BaseException | None = None

    def run(self) -> None:
        """Compile in batches of about BATCH bytes of source: the marshalled code of a batch is dropped
        (where the release keeps no bytecode) before the next is compiled, so a whole-release diff
        never holds the code of every module at once."""
        for batch in _batches(self.sources):
            for change, result in zip(batch, compile_many([(c.path, c.after or b"") for c in batch])):
                if isinstance(result, CompileFailure):
                    raise _not_compiling(change, result.kind, result.message)
                change.code_record = bytecodecheck.code_record(result)  # what verify vouches for, small
                change.code = result if _gets_bytecode(change) else None  # else it only costs memory

    def start(self) -> "CompileCheck":
        import threading

        def work() -> None:
            try:
                self.run()
            except BaseException as error:  # handed to finish(), in the main thread
                self._outcome = error

        self._thread = threading.Thread(target=work, name="ernie-patch-compile-check", daemon=True)
        self._thread.start()
        return self

    def finish(self, manifest: Manifest | None = None) -> dict[Path, bytes]:
        """The new bytecode of each file that gets some (path -> marshalled code), once all compiled;
        MANIFEST (the one the transaction will write) gets the record of the code verify vouches for."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        if manifest is not None:
            _record_code(manifest, self.sources)
        return {c.path: c.code for c in self.sources if c.code is not None}


def _record_code(manifest: Manifest, changes: list[FileChange]) -> None:
    """The answer's 'bytecode' record of MANIFEST with the code of CHANGES compiled by this run."""
    manifest.answer["bytecode"] = bytecodecheck.record(
        manifest.answer, {relpath: entry.after for relpath, entry in manifest.files.items()},
        {c.relpath: c.code_record for c in changes if c.code_record is not None}, MAGIC_NUMBER.hex())


def _gets_bytecode(change: FileChange) -> bool:
    """Whether the release keeps bytecode where CHANGE's file goes (as transaction._bytecode_flags)."""
    from ..fs import bytecode

    made = sorted([*change.dirs, *change.emptied], key=len)
    beside = (import_root(change.path, change.relpath) / made[0]).parent if made else None
    return bytecode.release_flags(change.path, beside) is not None


def _not_compiling(change: FileChange, kind: str, message: str) -> PatcherError:
    return PatcherError(ExitCode.CONFLICT, f"patched {change.path} would not compile: "
                        f"{kind}: {message[:200] or 'no detail'}",
                        hint="the patch set is broken for this release; nothing was written")


def _check_results(changes: dict[Path, FileChange], todo: list[PatchState],
                   compile_now: bool = True) -> dict[str, dict[str, dict]]:
    """Refuse before writing when a patched file would not compile (unless COMPILE_NOW is false: the
    transaction waits for the check, CompileCheck) or a probe would not pass.

    Returns each patch's probe results on the planned bytes, kept in the manifest for verify.
    """
    if compile_now:
        _compile_checks(list(changes.values()))
    planned = {c.relpath: c.after for c in changes.values()}
    memos: dict[str, dict[str, dict]] = {}
    for patch in todo:
        memos[patch.spec.id] = {}
        for probe in patch.spec.probes:
            source = (planned[probe.file] if probe.file in planned
                      else read_target(patch.package.import_root / probe.file, probe.file))
            result = _probe_planned(probe, source)
            if not result.passed:
                raise PatcherError(ExitCode.CONFLICT,
                                   f"{patch.spec.id}: probe '{probe.describe()}' would fail after applying "
                                   f"({result.detail})", hint="the patch and its probes disagree; nothing was written")
            memos[patch.spec.id][probe_key(probe)] = memo(result, source)
    return memos


def _probe_planned(probe: ProbeSpec, source: bytes | None) -> ProbeResult:
    """PROBE on the planned bytes: a pure function of the release's file and the patch, so a result
    kept from an earlier run on the same bytes (probememo) is reused."""
    if source is None:
        return run_probe(probe, source)
    from .probememo import probe_kept

    return probe_kept(probe, source)


def _record_line(relpath: str, data: bytes) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow([relpath, record_digest(data), len(data)])
    return out.getvalue()


def _registrations(changes: dict[Path, FileChange], todo: list[PatchState]) -> list[FileChange]:
    """RECORD edits so `pip uninstall` also removes the files the patches create."""
    packages = {p.spec.package: p.package for p in todo}
    extra: list[FileChange] = []
    for package_name, package in packages.items():
        created = [c for c in changes.values() if c.action == "create" and c.package == package_name]
        if not created or package.dist_info is None or package.editable:
            continue
        record, relpath = package.dist_info / "RECORD", f"{package.dist_info.name}/RECORD"
        before, found = read_target(record, relpath), stat_target(record, relpath)
        if before is None or found is None:
            continue
        text = decode(before)
        if text and not text.endswith("\n"):
            text += "\n"
        text += "".join(_record_line(c.relpath, c.after or b"") for c in created)
        extra.append(FileChange(record, relpath, package_name, package.version,
                             "register", before, text.encode("utf-8", "surrogateescape"),
                             found.st_mode & FILE_MODE_BITS, sorted({p for c in created for p in c.patches}),
                             module=package.module))
    return extra


def _manifest(previous: Manifest | None, series: Series, states: list[PatchState],
                      todo: list[PatchState], changes: list[FileChange], probe_memos: dict[str, dict[str, dict]]) -> Manifest:
    manifest = copy.deepcopy(previous) if previous else Manifest(series=series.name, patch_dir=str(series.directory))
    for stale in [p.spec.id for p in states if p.stale]:
        manifest.patches.pop(stale, None)
        for key, entry in list(manifest.files.items()):
            if stale in entry.patches:
                entry.patches.remove(stale)
            if not entry.patches:
                del manifest.files[key]
    for change in changes:
        entry = manifest.files.get(change.relpath)
        before = sha256(change.before) if change.before is not None else None
        if entry is None:
            restore_mode = change.before_mode if change.before_mode is not None else change.mode
            entry = FileRecord(path=str(change.path), package=change.package, version=change.version,
                               relpath=change.relpath, action=change.action, before=before, after=None,
                               mode=restore_mode, module=change.module, dirs=list(change.dirs),
                               emptied=dict(change.emptied))
            manifest.files[change.relpath] = entry
        entry.after = sha256(change.after) if change.after is not None else None
        entry.after_mode = change.mode if change.mode != entry.mode and change.after is not None else None
        entry.patches = sorted(set(entry.patches) | set(change.patches))
    for patch in todo:
        manifest.patches[patch.spec.id] = PatchRecord(
            package=patch.spec.package, version=patch.package.version, patch_sha256=patch.spec.digest(),
            files=[f.relpath for f in patch.files], offsets=[o for f in patch.files for o in f.offsets],
            applied_at=now(), probes=probe_memos.get(patch.spec.id, {}))
    manifest.series, manifest.patch_dir, manifest.tool_version = series.name, str(series.directory), __version__
    previous_answer = manifest.answer
    manifest.answer = answer(previous_answer, series, [p for p in states if p.state == APPLIED] + todo)
    manifest.answer["bytecode"] = previous_answer.get("bytecode", {})
    _record_code(manifest, changes)
    return manifest


def answer(previous: dict, series: Series, applied: list[PatchState]) -> dict:
    """What the fast path reports for APPLIED patches: the series digest and order, and per id the
    variant, its range, strip, requirements and probes as the engine would show them."""
    digest = sha256(read_bytes(series.directory / SERIES_FILE) or b"")
    patches = dict(previous.get("patches", {})) if previous.get("series_sha256") == digest else {}
    for patch in applied:
        spec = patch.spec
        patches[spec.id] = {
            "file": spec.file, "package": spec.package, "module": spec.module, "tested": spec.tested,
            "variants": [[v.file, v.tested] for v in patch.variants or (spec,)], "untested": patch.untested,
            "strip": spec.strip, "requires": list(spec.requires),
            "probes": [{"key": probe_key(p), "file": p.file, "kind": p.kind, "check": p.describe()}
                       for p in spec.probes]}
    return {"series_sha256": digest, "patch_dir": str(series.directory), "ids": series.ids, "patches": patches}


def _action(change: FileChange, offsets: list[int]) -> Action:
    """What apply does to one file; OFFSETS are where its hunks matched, in every patch."""
    if change.action == "register":
        return Action(str(change.path), "register", "lists the created file(s) for pip uninstall")
    if change.after is None:
        emptied = sorted(change.emptied)
        return Action(str(change.path), "remove", "removed by the patch" + (
            f"; and, once empty, the director{'ies' if len(emptied) > 1 else 'y'} it empties: {', '.join(emptied)}"
            if emptied else ""))
    mode = f"mode {change.before_mode:o} -> {change.mode:o}" if change.before_mode not in (None, change.mode) else ""
    if change.chmod_only:
        return Action(str(change.path), "patch", mode)
    moved = [o for o in offsets if o]
    detail = f"{len(offsets)} hunk(s)" + (f", offsets {', '.join(f'{o:+d}' for o in moved)}" if moved else ", exact")
    if change.dirs:
        detail += f"; {creates_dirs_detail(change.dirs)}"
    if mode:
        detail += f"; {mode}"
    return Action(str(change.path), "create" if change.action == "create" else "patch", detail)


@dataclass
class Plan:
    """Every write of one apply, checked, with the probe results computed on the planned bytes."""

    changes: list[FileChange]
    probe_memos: dict[str, dict[str, dict]]
    notes: list[str] = field(default_factory=list)
    compiling: CompileCheck | None = None

    def actions(self, states: list[PatchState]) -> list[Action]:
        offsets: dict[Path, list[int]] = {}
        for patch in states:
            for file in patch.files:
                offsets.setdefault(file.path, []).extend(file.offsets)
        return [_action(c, offsets.get(c.path, [])) for c in self.changes]

    def manifest(self, previous: Manifest | None, series: Series, states: list[PatchState],
                 todo: list[PatchState]) -> Manifest:
        return _manifest(previous, series, states, todo, self.changes, self.probe_memos)

    def writes(self, state: StateDir) -> list[Write]:
        """The writes for the transaction; the current bytes of each file are stored first."""
        kept = [c for c in self.changes if c.before is not None]
        stored = iter(state.store_many([c.before for c in kept], [c.mode for c in kept]))
        return [Write(c.path, c.after, c.mode, next(stored) if c.before is not None else None,
                      package=c.package, module=import_name(c.package, c.module), version=c.version,
                      relpath=c.relpath, action=c.action, code=c.code, dirs=tuple(c.dirs), emptied=dict(c.emptied),
                      restore_mode=c.before_mode, chmod_only=c.chmod_only) for c in self.changes]


def build_plan(todo: list[PatchState], compile_later: bool = False) -> Plan:
    """Plan the writes of the patches in TODO (all assessed `not-applied`); raise if the result
    would not import or a probe would not hold. With COMPILE_LATER the compile check runs in a
    thread (Plan.compiling) that the transaction finishes before renaming anything in place."""
    changes = _collect(todo)
    compiling = CompileCheck(list(changes.values())).start() if compile_later else None
    notes = _emptied(changes)
    memos = _check_results(changes, todo, compile_now=not compile_later)
    return Plan(list(changes.values()) + _registrations(changes, todo), memos, notes, compiling)
