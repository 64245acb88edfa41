"""Work out, in memory, the state of each patch against an environment and what applying needs."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ExitCode, PatcherError
from ..fs.fsops import creates_dirs_detail, made_dirs_detail, read_bytes, sha256
from ..patchset.probes import ProbeResult, recall, run_probe
from ..patchset.series import PatchSpec, ProbeSpec
from ..target.discovery import Environment, InstalledPackage, record_digest
from .state import FileRecord, Manifest, RestoreEntry

if TYPE_CHECKING:
    from ..patchset.diffparse import FilePatch
    from ..patchset.hunks import HunkConflict

APPLIED = "applied"
NOT_APPLIED = "not-applied"
DRIFTED = "drifted"
CONFLICT = "conflict"
UNSUPPORTED = "unsupported"
MISSING = "missing"

ENCODING = ("utf-8", "surrogateescape")


@dataclass
class FileState:
    """One file of one patch: where it is, its state, and the bytes before/after this patch."""

    relpath: str
    path: Path | None
    state: str
    detail: str = ""
    creates: bool = False
    current: bytes | None = None
    patched: bytes | None = None
    offsets: list[int] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": str(self.path) if self.path else None, "relpath": self.relpath, "state": self.state,
                "detail": self.detail, "action": "create" if self.creates else "modify",
                "offsets": self.offsets}


@dataclass
class PatchState:
    spec: PatchSpec
    package: InstalledPackage | None
    state: str
    reason: str = ""
    files: list[FileState] = field(default_factory=list)
    probes: list[ProbeResult] = field(default_factory=list)
    strip: int | None = None
    strip_inferred: bool = False
    stale: bool = False
    untested: bool = False
    variants: tuple[PatchSpec, ...] = ()

    @property
    def fit(self) -> str | None:
        """For a patch not applied yet: 'exact', 'offset' or 'conflict'.

        Also given for a patch outside its tested range, so status shows whether it would fit.
        """
        states = {f.state for f in self.files}
        if self.state == UNSUPPORTED and self.files:
            if states == {NOT_APPLIED}:
                return "offset" if any(o for f in self.files for o in f.offsets) else "exact"
            return "conflict" if CONFLICT in states else None
        if self.state == NOT_APPLIED:
            return "offset" if any(o for f in self.files for o in f.offsets) else "exact"
        if self.state == CONFLICT:
            return "conflict"
        return None

    def to_dict(self) -> dict:
        pkg = self.package
        return {
            "id": self.spec.id, "package": self.spec.package,
            "installed_version": pkg.version if pkg else None, "versions": self.spec.tested,
            "file": self.spec.file,
            "variants": [{"file": v.file, "versions": v.tested} for v in self.variants or (self.spec,)],
            "state": self.state, "reason": self.reason, "fit": self.fit, "untested": self.untested,
            "manifest_stale": self.stale, "strip": self.strip, "strip_inferred": self.strip_inferred,
            "files": [f.to_dict() for f in self.files], "probes": [p.to_dict() for p in self.probes],
        }


def decode(data: bytes) -> str:
    return data.decode(*ENCODING)


def encode(text: str) -> bytes:
    return text.encode(*ENCODING)


def target_path(package: InstalledPackage, relpath: str) -> Path:
    """The absolute path of RELPATH, refusing any that leaves the package through a symlink."""
    path = package.import_root / relpath
    module_dir = (package.import_root / package.module).resolve()
    parent = path.parent.resolve()
    inside = parent == module_dir or module_dir in parent.parents
    if not inside or path.is_symlink():
        real = os.path.realpath(path)
        raise PatcherError(ExitCode.ENVIRONMENT,
                           f"refusing {path}: it resolves to {real}, outside package {package.module}",
                           hint="a symlink inside the package points elsewhere; the tool only writes inside it")
    return path


def new_directories(package: InstalledPackage, relpath: str) -> tuple[list[str], str]:
    """The directories of RELPATH (a file a patch creates) missing below the module directory,
    top down, as relpaths; or a reason when one of them is there but is not a directory. A
    symlink there is refused outright (exit 7): the tool creates directories, it never follows one."""
    parts = relpath.split("/")
    for depth in range(2, len(parts)):
        path = package.import_root.joinpath(*parts[:depth])
        try:
            found = os.lstat(path)
        except FileNotFoundError:
            return ["/".join(parts[:d]) for d in range(depth, len(parts))], ""
        except OSError as exc:
            raise PatcherError(ExitCode.ENVIRONMENT, f"cannot inspect {path}: {exc.strerror}") from None
        if stat.S_ISLNK(found.st_mode):
            raise PatcherError(ExitCode.ENVIRONMENT,
                               f"refusing {package.import_root / relpath}: {path} is a symlink, and the "
                               "patch creates a directory there",
                               hint="the tool creates directories only where nothing is; remove the symlink "
                                    "if it does not belong to the package")
        if not stat.S_ISDIR(found.st_mode):
            return [], f"{path} is not a directory; the patch creates {relpath} under it"
    return [], ""


def recorded_path(env: Environment, entry: FileRecord | RestoreEntry) -> Path | None:
    """Where a manifest (or journal) entry's file is in ENV now; None when its package is gone."""
    package = env.package(entry.package)
    if package is None:
        return None
    if entry.action == "register":
        return package.dist_info.parent / entry.relpath if package.dist_info else None
    return target_path(package, entry.relpath)


class Assessor:
    """Assesses patches in series order, chaining changes to a file through a working copy."""

    def __init__(self, env: Environment, manifest: Manifest | None, allow_untested: bool = False,
                 reparse: bool = False) -> None:
        self.env = env
        self.manifest = manifest
        self.allow_untested = allow_untested
        self.reparse = reparse
        self.working: dict[Path, bytes | None] = {}
        self._planned: set[Path] = set()
        self._records: dict[str, dict[str, str | None]] = {}

    def checkpoint(self) -> tuple[dict[Path, bytes | None], set[Path]]:
        """The planned working copies, to try a patch and take it back (rollback) if it is not used."""
        return dict(self.working), set(self._planned)

    def rollback(self, saved: tuple[dict[Path, bytes | None], set[Path]]) -> None:
        self.working, self._planned = dict(saved[0]), set(saved[1])

    def current(self, path: Path) -> bytes | None:
        if path not in self.working:
            self.working[path] = read_bytes(path)
        return self.working[path]

    def record_digest(self, package: InstalledPackage, relpath: str) -> str | None:
        if package.name not in self._records:
            self._records[package.name] = package.record()
        return self._records[package.name].get(relpath)

    def assess(self, spec: PatchSpec) -> PatchState:
        package = self.env.package(spec.package)
        if package is None:
            return PatchState(spec, None, MISSING, f"{spec.package} is not installed in {self.env.python}")
        applied = self._applied_as_recorded(spec, package)
        if applied is not None:
            return applied
        from ..patchset.diffparse import parse_patch  # only a patch not applied as recorded is parsed

        parsed = parse_patch(spec.text, spec.module, spec.strip, f"patch {spec.id} ({spec.file})")
        result = PatchState(spec, package, NOT_APPLIED, strip=parsed.strip, strip_inferred=parsed.strip_inferred)
        if not spec.covers(package.version):
            result.untested = True
            if not self.allow_untested:
                result.state = UNSUPPORTED
                result.reason = (f"{spec.package} {package.version} is outside the tested range "
                                 f"{spec.tested} of patch {spec.id}")
        recorded = self.manifest.patches.get(spec.id) if self.manifest else None
        files = [self._file(package, fp, spec, recorded is not None) for fp in parsed.files]
        result.files = files
        if result.state != UNSUPPORTED:
            result.state, reason = _combine(files)
            result.reason = result.reason or reason
        if recorded is not None and result.state != APPLIED:
            result.stale = True
        if recorded is not None and recorded.version != package.version:
            result.stale = True
            if result.state == APPLIED:
                result.state = NOT_APPLIED
            result.reason = f"{spec.package} changed from {recorded.version} to {package.version} since apply"
        result.probes = [self._probe_fresh(package, p) for p in spec.probes]
        return result

    def _applied_as_recorded(self, spec: PatchSpec, package: InstalledPackage) -> PatchState | None:
        """APPLIED without parsing the diff when the manifest says so and every digest agrees.

        Holds only for the same patch bytes, the same package version and every file holding
        exactly what ernie-patch wrote; anything else takes the full path.
        """
        recorded = self.manifest.patches.get(spec.id) if self.manifest else None
        if recorded is None or recorded.version != package.version or recorded.patch_sha256 != spec.digest():
            return None
        files = []
        for relpath in recorded.files:
            path = target_path(package, relpath)
            entry = self.manifest.files.get(relpath)
            current = self.current(path)
            digest = sha256(current) if current is not None else None
            if entry is None or spec.id not in entry.patches or digest != entry.after:
                return None
            files.append(FileState(relpath=relpath, path=path, state=APPLIED, creates=entry.action == "create",
                                   current=current, detail=made_dirs_detail(entry.dirs)))
        result = PatchState(spec, package, APPLIED, files=files, strip=spec.strip,
                            untested=not spec.covers(package.version))
        memos = {} if self.reparse else recorded.probes
        result.probes = [self._probe(package, p, memos) for p in spec.probes]
        return result

    def _probe(self, package: InstalledPackage, probe: ProbeSpec, memos: dict[str, dict]) -> ProbeResult:
        source = self._probe_source(package, probe.file)
        return recall(probe, source, memos) or run_probe(probe, source)

    def _probe_fresh(self, package: InstalledPackage, probe: ProbeSpec) -> ProbeResult:
        """PROBE on the file as it is; on a file the release's RECORD vouches for, the result kept
        from an earlier run on the same bytes (probememo) when there is one."""
        source = self._probe_source(package, probe.file)
        if source is None or self.reparse or not self._released(package, probe.file, source):
            return run_probe(probe, source)
        from .probememo import probe_kept

        return probe_kept(probe, source)

    def _released(self, package: InstalledPackage, relpath: str, data: bytes) -> bool:
        """Whether DATA is the file RELPATH as the installed release shipped it (RECORD)."""
        return self.record_digest(package, relpath) == record_digest(data)

    def _probe_source(self, package: InstalledPackage, relpath: str) -> bytes | None:
        return read_bytes(package.import_root / relpath)

    def _file(self, package: InstalledPackage, fp: FilePatch, spec: PatchSpec, managed: bool) -> FileState:
        relpath = str(fp.path)
        path = target_path(package, relpath)
        dirs, blocked = ([], "")
        if fp.creates and path not in self.working and not path.parent.is_dir():
            dirs, blocked = new_directories(package, relpath)
            self.working[path] = None
        current = self.current(path)
        state = FileState(relpath=relpath, path=path, state=NOT_APPLIED, creates=fp.creates, current=current,
                          dirs=dirs)
        if blocked:
            state.state, state.detail = CONFLICT, blocked
            return state
        state.detail = creates_dirs_detail(dirs)
        entry = self.manifest.files.get(relpath) if self.manifest else None
        if managed and entry is not None and spec.id in entry.patches:
            digest = sha256(current) if current is not None else None
            if digest == entry.after:
                state.state, state.detail = APPLIED, made_dirs_detail(entry.dirs)
                return state
            if digest != entry.before and self._differs_from_release(package, relpath, current):
                state.state = DRIFTED
                state.detail = f"{path} was changed after apply (sha256 {_short(digest)}, expected {_short(entry.after)})"
                return state
        return self._try_apply(package, fp, state)

    def _try_apply(self, package: InstalledPackage, fp: FilePatch, state: FileState) -> FileState:
        from ..patchset.hunks import HunkConflict, apply_hunks

        current = state.current
        if fp.creates:
            if current is not None:
                state.state = DRIFTED
                state.detail = f"{state.path} already exists; the patch creates it"
                return state
        elif current is None:
            state.state = MISSING
            state.detail = f"{state.path} does not exist"
            return state
        elif self._edited_by_someone_else(package, state):
            state.state = DRIFTED
            state.detail = (f"{state.path} differs from the {package.name} {package.version} release (RECORD) "
                            "and ernie-patch did not change it")
            return state
        try:
            text, placements = apply_hunks(decode(current or b""), fp.hunks)
        except HunkConflict as conflict:
            state.state, state.detail = self._explain_conflict(package, state, conflict)
            return state
        state.patched = None if fp.deletes else encode(text)
        state.offsets = [p.offset for p in placements]
        self.working[state.path] = state.patched
        self._planned.add(state.path)
        return state

    def _differs_from_release(self, package: InstalledPackage, relpath: str, data: bytes | None) -> bool:
        """Whether DATA is not what the installed release shipped (unknown without a RECORD entry)."""
        recorded = self.record_digest(package, relpath)
        return recorded is not None and data is not None and recorded != record_digest(data)

    def _edited_by_someone_else(self, package: InstalledPackage, state: FileState) -> bool:
        """Neither as released nor as ernie-patch left it: patching it would bake in unknown edits."""
        if state.path in self._planned:
            return False  # holds an earlier patch of this run
        entry = self.manifest.files.get(state.relpath) if self.manifest else None
        if entry is not None and state.current is not None and sha256(state.current) == entry.after:
            return False
        return self._differs_from_release(package, state.relpath, state.current)

    def _explain_conflict(self, package: InstalledPackage, state: FileState, conflict: HunkConflict) -> tuple[str, str]:
        where = f"{state.path}: {conflict.failure.reason}"
        recorded = self.record_digest(package, state.relpath)
        if recorded is not None and recorded != record_digest(state.current or b""):
            return DRIFTED, f"{where}; the file differs from the {package.name} {package.version} release (RECORD)"
        return CONFLICT, where


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "absent"


_PRECEDENCE = (MISSING, DRIFTED, CONFLICT, NOT_APPLIED, APPLIED)


def _combine(files: list[FileState]) -> tuple[str, str]:
    states = {f.state for f in files}
    if states == {APPLIED}:
        return APPLIED, ""
    if APPLIED in states and states <= {APPLIED, NOT_APPLIED}:
        first = next(f for f in files if f.state == NOT_APPLIED)
        return DRIFTED, f"partly applied: {first.path} is not patched"
    for state in _PRECEDENCE:
        for f in files:
            if f.state == state:
                return state, f.detail
    return NOT_APPLIED, ""
