"""What apply will write, planned in memory before anything is touched: the file changes, the
RECORD registrations of created files, the checks the result must pass (it imports as Python
source, every probe holds) and the manifest that will describe it."""
from __future__ import annotations

import copy
import csv
import io
import tokenize
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import ExitCode, PatcherError
from ..fs.compilepool import CompileFailure, compile_many
from ..fs.fsops import creates_dirs_detail, read_bytes, sha256
from ..patchset.probes import ProbeResult, memo, probe_key, run_probe
from ..patchset.series import SERIES_FILE, ProbeSpec, Series
from ..target.discovery import record_digest
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
    dirs: list[str] = field(default_factory=list)


def _collect(todo: list[PatchState]) -> dict[Path, FileChange]:
    changes: dict[Path, FileChange] = {}
    for patch in todo:
        for file in patch.files:
            if file.state != NOT_APPLIED:
                continue
            change = changes.get(file.path)
            if change is None:
                mode = file.path.stat().st_mode & 0o7777 if file.current is not None else _new_file_mode(file.path)
                change = FileChange(file.path, file.relpath, patch.spec.package, patch.package.version,
                                 "create" if file.creates else "modify", file.current, file.patched, mode,
                                 module=patch.spec.module)
                changes[file.path] = change
            change.after = file.patched
            change.patches.append(patch.spec.id)
            change.dirs = sorted(set(change.dirs) | set(file.dirs))
    return changes


def _new_file_mode(path: Path) -> int:
    """The mode of a .py file in PATH's directory, else in the nearest existing one above it
    (PATH may lie in directories apply creates), else 0o644."""
    directory = path.parent
    while not directory.is_dir() and directory != directory.parent:
        directory = directory.parent
    siblings = [p for p in directory.glob("*.py") if p.is_file()]
    return siblings[0].stat().st_mode & 0o7777 if siblings else 0o644


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
    sources = [c for c in changes if c.after is not None and c.path.suffix == ".py"]
    for change in sources:
        refusal = _encoding_refusal(change.after or b"")
        if refusal:
            raise _not_compiling(change, refusal.kind, refusal.message)
    for change, result in zip(sources, compile_many([(c.path, c.after or b"") for c in sources])):
        if isinstance(result, CompileFailure):
            raise _not_compiling(change, result.kind, result.message)
        change.code = result


def _not_compiling(change: FileChange, kind: str, message: str) -> PatcherError:
    return PatcherError(ExitCode.CONFLICT, f"patched {change.path} would not compile: "
                        f"{kind}: {message[:200] or 'no detail'}",
                        hint="the patch set is broken for this release; nothing was written")


def _check_results(changes: dict[Path, FileChange], todo: list[PatchState]) -> dict[str, dict[str, dict]]:
    """Refuse before writing when a patched file would not compile or a probe would not pass.

    Returns each patch's probe results on the planned bytes, kept in the manifest for verify.
    """
    _compile_checks(list(changes.values()))
    planned = {c.relpath: c.after for c in changes.values()}
    memos: dict[str, dict[str, dict]] = {}
    for patch in todo:
        memos[patch.spec.id] = {}
        for probe in patch.spec.probes:
            source = planned[probe.file] if probe.file in planned else read_bytes(patch.package.import_root / probe.file)
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
        record = package.dist_info / "RECORD"
        before = read_bytes(record)
        if before is None:
            continue
        text = decode(before)
        if text and not text.endswith("\n"):
            text += "\n"
        text += "".join(_record_line(c.relpath, c.after or b"") for c in created)
        extra.append(FileChange(record, f"{package.dist_info.name}/RECORD", package_name, package.version,
                             "register", before, text.encode("utf-8", "surrogateescape"),
                             record.stat().st_mode & 0o7777, sorted({p for c in created for p in c.patches}),
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
            entry = FileRecord(path=str(change.path), package=change.package, version=change.version,
                               relpath=change.relpath, action=change.action, before=before, after=None,
                               mode=change.mode, module=change.module, dirs=list(change.dirs))
            manifest.files[change.relpath] = entry
        entry.after = sha256(change.after) if change.after is not None else None
        entry.patches = sorted(set(entry.patches) | set(change.patches))
    for patch in todo:
        manifest.patches[patch.spec.id] = PatchRecord(
            package=patch.spec.package, version=patch.package.version, patch_sha256=patch.spec.digest(),
            files=[f.relpath for f in patch.files], offsets=[o for f in patch.files for o in f.offsets],
            applied_at=now(), probes=probe_memos.get(patch.spec.id, {}))
    manifest.series, manifest.patch_dir, manifest.tool_version = series.name, str(series.directory), __version__
    manifest.answer = answer(manifest.answer, series, [p for p in states if p.state == APPLIED] + todo)
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
    moved = [o for o in offsets if o]
    detail = f"{len(offsets)} hunk(s)" + (f", offsets {', '.join(f'{o:+d}' for o in moved)}" if moved else ", exact")
    if change.dirs:
        detail += f"; {creates_dirs_detail(change.dirs)}"
    return Action(str(change.path), "create" if change.action == "create" else "patch", detail)


@dataclass
class Plan:
    """Every write of one apply, checked, with the probe results computed on the planned bytes."""

    changes: list[FileChange]
    probe_memos: dict[str, dict[str, dict]]

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
        stored = iter(state.store_many([c.before for c in self.changes if c.before is not None]))
        return [Write(c.path, c.after, c.mode, next(stored) if c.before is not None else None,
                      package=c.package, module=import_name(c.package, c.module), version=c.version,
                      relpath=c.relpath, action=c.action, code=c.code, dirs=tuple(c.dirs)) for c in self.changes]


def build_plan(todo: list[PatchState]) -> Plan:
    """Plan the writes of the patches in TODO (all assessed `not-applied`); raise if the result
    would not import or a probe would not hold."""
    changes = _collect(todo)
    memos = _check_results(changes, todo)
    return Plan(list(changes.values()) + _registrations(changes, todo), memos)
