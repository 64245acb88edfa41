"""Work out, in memory, the state of each patch against an environment and what applying needs."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from ..errors import ExitCode, PatcherError
from ..fs.fsops import creates_dirs_detail, made_dirs_detail, read_target, sha256, stat_target
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
UPSTREAM = "upstream"  # not needed: the installed release carries an equivalent fix (series key fixed-in)

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
    mode: int | None = None  # the git mode the patch gives the file (100644, 100755), None: unchanged

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
        if self.state == UPSTREAM:  # 'conflict' when inferred from the probes on a release it does not fit
            return "conflict" if states & {CONFLICT, DRIFTED} else None
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


def target_path(package: InstalledPackage, relpath: str, resolved: dict[Path, Path] | None = None) -> Path:
    """The absolute path of RELPATH, refusing any that leaves the package through a symlink. RESOLVED
    keeps the directories already resolved in this run (a release diff has a thousand files in a
    hundred directories)."""
    path = package.import_root / relpath
    try:
        module_dir = _resolved(package.import_root / package.module, resolved)
        parent = _resolved(path.parent, resolved)
    except (OSError, RuntimeError) as exc:  # a symlink loop planted in the package
        raise PatcherError(ExitCode.ENVIRONMENT, f"refusing {path}: {exc}",
                           hint="a symlink inside the package leads nowhere; the tool only writes inside it") from None
    inside = parent == module_dir or str(parent).startswith(f"{module_dir}/")
    if not inside or path.is_symlink():
        real = os.path.realpath(path)
        raise PatcherError(ExitCode.ENVIRONMENT,
                           f"refusing {path}: it resolves to {real}, outside package {package.module}",
                           hint="a symlink inside the package points elsewhere; the tool only writes inside it")
    return path


def _resolved(path: Path, cache: dict[Path, Path] | None) -> Path:
    if cache is None:
        return path.resolve()
    if path not in cache:
        cache[path] = path.resolve()
    return cache[path]


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
        self._bytecode: dict[Path, str] = {}
        self._sources: dict[tuple[str, str], bytes | None] = {}
        self._resolved: dict[Path, Path] = {}
        self._release_checked: dict[tuple[str, str, int], bool] = {}

    def checkpoint(self) -> tuple[dict[Path, bytes | None], set[Path]]:
        """The planned working copies, to try a patch and take it back (rollback) if it is not used."""
        return dict(self.working), set(self._planned)

    def rollback(self, saved: tuple[dict[Path, bytes | None], set[Path]]) -> None:
        self.working, self._planned = dict(saved[0]), set(saved[1])

    def current(self, path: Path, relpath: str) -> bytes | None:
        """The bytes of package file PATH (RELPATH) as planned so far: read once, by descriptor."""
        if path not in self.working:
            self.working[path] = read_target(path, relpath)
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
        recorded = self.manifest.patches.get(spec.id) if self.manifest else None
        unmanaged = recorded is None or recorded.version != package.version
        if unmanaged and spec.fixed_upstream(package.version):
            return PatchState(spec, package, UPSTREAM, stale=recorded is not None,
                              reason=f"not needed: {spec.package} {package.version} carries an equivalent fix "
                                     f"(fixed-in {spec.fixed_in_text})")
        from ..patchset.diffparse import parse_patch  # only a patch not applied as recorded is parsed

        parsed = parse_patch(spec.path.read_bytes(), spec.module, spec.strip, f"patch {spec.id} ({spec.file})")
        result = PatchState(spec, package, NOT_APPLIED, strip=parsed.strip, strip_inferred=parsed.strip_inferred)
        if not spec.covers(package.version):
            result.untested = True
            if not self.allow_untested:
                result.state = UNSUPPORTED
                result.reason = (f"{spec.package} {package.version} is outside the tested range "
                                 f"{spec.tested} of patch {spec.id}")
        files = [state for fp in parsed.files for state in self._files(package, fp, spec, recorded is not None)]
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
        if unmanaged and self._fix_already_released(result):
            result.state = UPSTREAM
            result.reason = _upstream_hint(result)
        return result

    def _fix_already_released(self, result: PatchState) -> bool:
        """Whether a patch that does not fit finds its probes passing on the files as the installed
        release shipped them (RECORD): the release seems to carry the fix already."""
        blocked = {f.state for f in result.files} & {CONFLICT, DRIFTED}
        if result.state not in (CONFLICT, DRIFTED, UNSUPPORTED) or not blocked:
            return False
        if not result.probes or not all(p.passed for p in result.probes):
            return False
        files = [(f.relpath, f.current) for f in result.files if f.current is not None]
        files += [(p.file, self._probe_source(result.package, p.file)) for p in result.spec.probes]
        return all(data is not None and self._released(result.package, relpath, data) for relpath, data in files)

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
            path = target_path(package, relpath, self._resolved)
            entry = self.manifest.files.get(relpath)
            current = self.current(path, relpath)
            digest = sha256(current) if current is not None else None
            if entry is None or spec.id not in entry.patches or digest != entry.after:
                return None
            if self.bytecode_drift(package, relpath, path, entry.after):
                return None  # the full assessment says which bytecode (DRIFTED)
            files.append(FileState(relpath=relpath, path=path, state=APPLIED, creates=entry.action == "create",
                                   current=current, detail=made_dirs_detail(entry.dirs)))
        shown = self.manifest.answer.get("patches", {}).get(spec.id, {})  # the strip level apply read it with
        inferred = spec.strip is None and isinstance(shown.get("strip"), int) and shown.get("strip_inferred") is True
        result = PatchState(spec, package, APPLIED, files=files, strip=shown["strip"] if inferred else spec.strip,
                            strip_inferred=inferred, untested=not spec.covers(package.version))
        memos = {} if self.reparse else recorded.probes
        result.probes = [self._probe(package, p, memos) for p in spec.probes]
        return result

    def bytecode_drift(self, package: InstalledPackage, relpath: str, path: Path, after: str | None) -> str:
        """Why the interpreter would not run PATH (holding AFTER, what apply wrote) as it is: bytecode
        of other code it would load instead (bytecodecheck); '' when there is none. Proven by the
        digest of the code recorded at apply, else (and with --reparse) by compiling the source."""
        if path.suffix != ".py":
            return ""
        if path not in self._bytecode:
            from . import bytecodecheck

            file = [(package.name, package.module, relpath, path)]
            recorded = None if self.reparse or self.manifest is None else \
                bytecodecheck.reference(self.manifest.answer, relpath, after, self.env.magic)
            known = [recorded["raw"]] if recorded else []
            try:
                problems = bytecodecheck.judge(bytecodecheck.facts_for(self.env, file, False, known)[0], str(path),
                                               recorded)
            except bytecodecheck.Unproven:
                problems = bytecodecheck.judge(bytecodecheck.facts_for(self.env, file, True, [])[0], str(path), None)
            self._bytecode[path] = bytecodecheck.remedy(problems) if problems else ""
        return self._bytecode[path]

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
        key = (package.name, relpath, id(data))
        if key not in self._release_checked:
            self._release_checked[key] = self.record_digest(package, relpath) == record_digest(data)
        return self._release_checked[key]

    def _probe_source(self, package: InstalledPackage, relpath: str) -> bytes | None:
        """The file a probe looks at, read once per run (patches chained on one module share it)."""
        key = (package.name, relpath)
        if key not in self._sources:
            self._sources[key] = read_target(package.import_root / relpath, relpath)
        return self._sources[key]

    def _files(self, package: InstalledPackage, fp: FilePatch, spec: PatchSpec, managed: bool) -> list[FileState]:
        """The file states of one file patch: a rename removes its source and creates its target (as
        git apply does it), a copy creates its target from its source."""
        if fp.source is None:
            return [self._file(package, fp, spec, managed)]
        relpath = str(fp.source)
        path = target_path(package, relpath, self._resolved)
        origin = self.current(path, relpath)
        mode = fp.new_mode or _git_mode(stat_target(path, relpath))
        states = []
        if fp.renames:
            states.append(self._file(package, _removal(fp.source), spec, managed))
        states.append(self._file(package, fp, spec, managed, origin=(origin, path), mode=mode))
        return states

    def _file(self, package: InstalledPackage, fp: FilePatch, spec: PatchSpec, managed: bool,
              origin: tuple[bytes | None, Path] | None = None, mode: int | None = None) -> FileState:
        """One file's state; ORIGIN is (bytes, path) of the file a rename or copy makes it from."""
        relpath = str(fp.path)
        path = target_path(package, relpath, self._resolved)
        dirs, blocked = ([], "")
        if fp.creates and path not in self.working and not path.parent.is_dir():
            dirs, blocked = new_directories(package, relpath)
            self.working[path] = None
        current = self.current(path, relpath)
        state = FileState(relpath=relpath, path=path, state=NOT_APPLIED, creates=fp.creates, current=current,
                          dirs=dirs, mode=mode or fp.new_mode)
        if blocked:
            state.state, state.detail = CONFLICT, blocked
            return state
        state.detail = creates_dirs_detail(dirs)
        entry = self.manifest.files.get(relpath) if self.manifest else None
        if managed and entry is not None and spec.id in entry.patches:
            digest = sha256(current) if current is not None else None
            if digest == entry.after:
                drift = self.bytecode_drift(package, relpath, path, entry.after)
                state.state, state.detail = (DRIFTED, drift) if drift else (APPLIED, made_dirs_detail(entry.dirs))
                return state
            if digest != entry.before and self._differs_from_release(package, relpath, current):
                state.state = DRIFTED
                state.detail = f"{path} was changed after apply (sha256 {_short(digest)}, expected {_short(entry.after)})"
                return state
        return self._try_apply(package, fp, state, origin)

    def _try_apply(self, package: InstalledPackage, fp: FilePatch, state: FileState,
                   origin: tuple[bytes | None, Path] | None = None) -> FileState:
        from ..patchset.hunks import HunkConflict

        current = state.current
        if fp.creates:
            if current is not None:
                state.state = DRIFTED
                state.detail = f"{state.path} already exists; the patch creates it"
                return state
            if origin is not None and origin[0] is None:
                state.state = MISSING
                state.detail = f"{origin[1]} does not exist; the patch {'renames' if fp.renames else 'copies'} it"
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
        base = origin[0] if origin is not None else current
        try:
            state.patched, state.offsets = _patched(fp, base)
        except HunkConflict as conflict:
            state.state, state.detail = self._explain_conflict(package, state, conflict)
            return state
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


def _upstream_hint(result: PatchState) -> str:
    """Why a patch that does not fit is taken as fixed upstream, and the series key to say so."""
    spec, version = result.spec, result.package.version
    also = " (and take it out of 'versions')" if spec.covers(version) else ""
    return (f"not needed, it seems: the patch does not fit {spec.package} {version}, but its {len(result.probes)} "
            f"probe(s) already pass on the files as released; set fixed-in = \">={version}\" for {spec.id} in "
            f"series.toml{also}")


def _removal(path: PurePosixPath) -> FilePatch:
    """The removal of a rename's source: whatever it holds (the target gets its bytes)."""
    from ..patchset.diffparse import FilePatch

    return FilePatch(path=path, hunks=(), deletes=True, renames=True)


def _git_mode(found: os.stat_result | None) -> int:
    """The git mode of a file as it is: executable when its owner may run it, as git sees it."""
    return 0o100755 if found is not None and found.st_mode & 0o100 else 0o100644


def _patched(fp: FilePatch, base: bytes | None) -> tuple[bytes | None, list[int]]:
    """BASE (the file's bytes, or its rename/copy source's) with FP applied, and where each hunk
    matched; None: the file is removed. Raise HunkConflict."""
    from ..patchset.hunks import HunkConflict, HunkFailure, apply_binary, apply_hunks

    if fp.binary is not None:
        return apply_binary(None if fp.creates and fp.source is None else base, fp.binary), []
    if fp.creates and fp.source is None:
        if not fp.hunks:
            return b"", []
        if len(fp.hunks) == 1 and fp.hunks[0].added() is not None:
            return fp.hunks[0].added(), [0]
    if not fp.hunks:
        if fp.deletes and not fp.renames and base:
            raise HunkConflict(HunkFailure(0, 1, f"the patch deletes it as an empty file, but it holds {len(base)} bytes"))
        return (None if fp.deletes else base), []
    text, placements = apply_hunks(decode(base or b""), fp.hunks)
    if fp.deletes:
        if text:
            raise HunkConflict(HunkFailure(0, 1, f"the patch deletes it, but {len(encode(text))} bytes would be left"))
        return None, [p.offset for p in placements]
    return encode(text), [p.offset for p in placements]


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
