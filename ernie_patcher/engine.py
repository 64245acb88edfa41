"""The four operations — status, apply, verify, revert — returning reports; nothing here prints."""
from __future__ import annotations

import copy
import csv
import io
import tokenize
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from . import __version__
from .assess import (APPLIED, CONFLICT, DRIFTED, MISSING, NOT_APPLIED, UNSUPPORTED, Assessor, FileState,
                     PatchState, decode, recorded_path)
from .discovery import Environment, discover, record_digest
from .errors import ExitCode, PatcherError
from .fsops import Lock, read_bytes, sha256
from .probes import memo, probe_key, run_probe
from .series import Choice, PatchSpec, Series, load_series, ranges_text
from .state import FileRecord, Manifest, PatchRecord, StateDir, now
from .transaction import Recovery, Write, commit, recover

REFUSALS = ((MISSING, ExitCode.MISSING), (UNSUPPORTED, ExitCode.UNSUPPORTED_VERSION),
            (DRIFTED, ExitCode.DRIFTED), (CONFLICT, ExitCode.CONFLICT))


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


def _packages(specs: list[PatchSpec]) -> list[tuple[str, str]]:
    return [(s.package, s.module) for s in specs]


@contextmanager
def _state_access(state: StateDir, write: bool, report: Report) -> Iterator[None]:
    """Lock the state directory; any pending journal is recovered first (needs write access)."""
    if not write and not state.exists():
        yield
        return
    needs_recovery = state.journal_path.exists()
    exclusive = write or needs_recovery
    with Lock(state.lock_path, exclusive=exclusive):
        if needs_recovery:
            _note_recovery(report, recover(state))
        try:
            yield
        except PatcherError:
            if write:
                state.remove_if_empty()  # a refused run (e.g. a malformed patch) leaves no state dir behind
            raise
        if needs_recovery:
            state.remove_if_empty()  # under the lock: a waiting run must never lock a removed lock file


def _note_recovery(report: Report, recovery: Recovery | None) -> None:
    if recovery is not None:
        report.notes.append(f"recovered an interrupted {recovery.operation} started {recovery.started}: "
                            f"{len(recovery.restored)} file(s) put back as they were before it")


def _assess(series: Series, choices: list[Choice], target: Target, manifest: Manifest | None,
            env: Environment, allow_untested: bool = False, reparse: bool = False) -> list[PatchState]:
    assessor = Assessor(env, manifest, allow_untested, reparse)
    states = [_assess_choice(assessor, choice) for choice in choices]
    for patch in states:
        recorded = manifest.patches.get(patch.spec.id) if manifest else None
        if patch.state == APPLIED and recorded and recorded.patch_sha256 != patch.spec.digest():
            patch.state = DRIFTED
            patch.reason = (f"patch file {patch.spec.file} changed since it was applied; "
                            "run `ernie-patch revert`, then `ernie-patch apply`")
    return states


def _assess_choice(assessor: Assessor, choice: Choice) -> PatchState:
    """The state of one patch id: the variant whose range covers the installed version; else (several
    variants, none covering it) the first in series order that is in place or would fit -- the one
    --allow-untested applies -- else the first. A variant tried and not used leaves no planned bytes."""
    if choice.chosen is not None or len(choice.variants) == 1:
        state = assessor.assess(choice.chosen or choice.variants[0])
        state.variants = choice.variants
        return state
    saved = assessor.checkpoint()
    for variant in choice.variants:
        state = assessor.assess(variant)
        if state.state in (APPLIED, NOT_APPLIED) or state.fit in ("exact", "offset"):
            break
        assessor.rollback(saved)
    else:
        state = assessor.assess(choice.variants[0])
    if state.state == UNSUPPORTED:
        state.reason = (f"{state.spec.package} {state.package.version} is outside the tested range of every "
                        f"variant of patch {choice.id}: {choice.ranges()}")
    state.variants = choice.variants
    return state


def _prepare(command: str, target: Target, only: tuple[str, ...] = ()) -> tuple[Series, list[Choice], Environment]:
    """The patch set, one variant choice per selected id, and the environment.

    The whole set is resolved against the installed versions, so a set with two variants covering
    one installed version is refused (exit 2) whatever --only selects.
    """
    series = load_series(target.patches)
    wanted = {p.id for p in series.select(only)}
    env = discover(_packages(list(series.patches)), target.python, target.site)
    versions = {p.package: (env.package(p.package).version if env.package(p.package) else None)
                for p in series.patches}
    return series, [c for c in series.resolve(list(series.patches), versions) if c.id in wanted], env


def status(target: Target, only: tuple[str, ...] = (), reparse: bool = False) -> Report:
    series, choices, env = _prepare("status", target, only)
    report = Report("status", env, series)
    state = StateDir(env.state_dir)
    with _state_access(state, write=False, report=report):
        manifest = state.manifest()
        report.patches = _assess(series, choices, target, manifest, env, reparse=reparse)
        report.manifest_patches = sorted(manifest.patches) if manifest else []
    foreign = sorted(set(report.manifest_patches) - {p.id for p in series.patches})
    if foreign:
        report.notes.append(f"the manifest also records patches not in this patch set: {', '.join(foreign)}")
    return report


def verify(target: Target, only: tuple[str, ...] = (), reparse: bool = False) -> Report:
    """Versions, digests and probes. A probe result computed at apply is reused only while the file
    has the very bytes it was computed on; REPARSE evaluates every probe again from source."""
    report = status(target, only, reparse)
    report.command = "verify"
    codes = set()
    for patch in report.patches:
        if patch.state == MISSING:
            codes.add(ExitCode.MISSING)
        elif patch.state == DRIFTED:
            codes.add(ExitCode.DRIFTED)
        elif patch.state != APPLIED or not all(p.passed for p in patch.probes):
            codes.add(ExitCode.NOT_VERIFIED)
    for code in (ExitCode.MISSING, ExitCode.DRIFTED, ExitCode.NOT_VERIFIED):
        if code in codes:
            report.exit_code = code
            break
    return report


def _untested_note(patch: PatchState) -> str:
    where = f"{patch.spec.id}: {patch.spec.package} {patch.package.version} is outside"
    if len(patch.variants) < 2:
        return f"{where} {patch.spec.tested}; trying anyway (--allow-untested)"
    return (f"{where} the tested range of every variant ({ranges_text(patch.variants)}); trying variant "
            f"{patch.spec.file} ({patch.spec.tested}), the first that fits (--allow-untested)")


def _refusal(states: list[PatchState]) -> PatcherError | None:
    for state_name, code in REFUSALS:
        failing = [p for p in states if p.state == state_name]
        if failing:
            first = failing[0]
            details = [f"{p.spec.id}: {p.reason}" for p in failing]
            hints = {
                ExitCode.MISSING: "install the package (or point --python/--site at the environment that has it)",
                ExitCode.UNSUPPORTED_VERSION: "install a version in range, bring a patch set for yours "
                                              "(--patches DIR), or try anyway with --allow-untested",
                ExitCode.DRIFTED: "the file was changed by something else; reinstall the package to get "
                                  "pristine files, or revert --force if ernie-patch applied it",
                ExitCode.CONFLICT: "this patch set does not fit the installed release; use a patch set "
                                   "written for it (--patches DIR)",
            }
            return PatcherError(code, f"{first.spec.id}: {first.reason}", details=details[1:] if len(details) > 1 else [],
                                hint=hints[code])
    return None


@dataclass
class _Change:
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


def _collect_changes(todo: list[PatchState]) -> dict[Path, _Change]:
    changes: dict[Path, _Change] = {}
    for patch in todo:
        for file in patch.files:
            if file.state != NOT_APPLIED:
                continue
            change = changes.get(file.path)
            if change is None:
                mode = file.path.stat().st_mode & 0o7777 if file.current is not None else _new_file_mode(file.path)
                change = _Change(file.path, file.relpath, patch.spec.package, patch.package.version,
                                 "create" if file.creates else "modify", file.current, file.patched, mode,
                                 module=patch.spec.module)
                changes[file.path] = change
            change.after = file.patched
            change.patches.append(patch.spec.id)
    return changes


def _new_file_mode(path: Path) -> int:
    siblings = [p for p in path.parent.glob("*.py") if p.is_file()]
    return siblings[0].stat().st_mode & 0o7777 if siblings else 0o644


def _check_source(data: bytes, path: Path) -> None:
    """Raise SyntaxError/ValueError unless DATA imports as Python source: compile() alone accepts
    bytes the import system refuses (e.g. latin-1 in a comment of a file without a coding line)."""
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    try:
        data.decode(encoding)
    except (UnicodeDecodeError, LookupError) as exc:
        raise ValueError(f"not valid {encoding} ({exc})") from None
    compile(data, str(path), "exec", dont_inherit=True)


def _check_results(changes: dict[Path, _Change], todo: list[PatchState]) -> dict[str, dict[str, dict]]:
    """Refuse before writing when a patched file would not compile or a probe would not pass.

    Returns each patch's probe results on the planned bytes, kept in the manifest for verify.
    """
    for change in changes.values():
        if change.after is not None and change.path.suffix == ".py":
            try:
                _check_source(change.after, change.path)
            except (SyntaxError, ValueError) as exc:
                raise PatcherError(ExitCode.CONFLICT, f"patched {change.path} would not compile: {exc}",
                                   hint="the patch set is broken for this release; nothing was written")
    planned = {c.relpath: c.after for c in changes.values()}
    memos: dict[str, dict[str, dict]] = {}
    for patch in todo:
        memos[patch.spec.id] = {}
        for probe in patch.spec.probes:
            source = planned[probe.file] if probe.file in planned else read_bytes(patch.package.import_root / probe.file)
            result = run_probe(probe, source)
            if not result.passed:
                raise PatcherError(ExitCode.CONFLICT,
                                   f"{patch.spec.id}: probe '{probe.describe()}' would fail after applying "
                                   f"({result.detail})", hint="the patch and its probes disagree; nothing was written")
            memos[patch.spec.id][probe_key(probe)] = memo(result, source)
    return memos


def _record_line(relpath: str, data: bytes) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow([relpath, record_digest(data), len(data)])
    return out.getvalue()


def _registrations(changes: dict[Path, _Change], todo: list[PatchState]) -> list[_Change]:
    """RECORD edits so `pip uninstall` also removes the files the patches create."""
    packages = {p.spec.package: p.package for p in todo}
    extra: list[_Change] = []
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
        extra.append(_Change(record, f"{package.dist_info.name}/RECORD", package_name, package.version,
                             "register", before, text.encode("utf-8", "surrogateescape"),
                             record.stat().st_mode & 0o7777, sorted({p for c in created for p in c.patches}),
                             module=package.module))
    return extra


def _updated_manifest(previous: Manifest | None, series: Series, states: list[PatchState],
                      todo: list[PatchState], changes: list[_Change], probe_memos: dict[str, dict[str, dict]]) -> Manifest:
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
                               mode=change.mode, module=change.module)
            manifest.files[change.relpath] = entry
        entry.after = sha256(change.after) if change.after is not None else None
        entry.patches = sorted(set(entry.patches) | set(change.patches))
    for patch in todo:
        manifest.patches[patch.spec.id] = PatchRecord(
            package=patch.spec.package, version=patch.package.version, patch_sha256=patch.spec.digest(),
            files=[f.relpath for f in patch.files], offsets=[o for f in patch.files for o in f.offsets],
            applied_at=now(), probes=probe_memos.get(patch.spec.id, {}))
    manifest.series, manifest.patch_dir, manifest.tool_version = series.name, str(series.directory), __version__
    return manifest


def _describe_change(change: _Change, states: list[PatchState]) -> Action:
    if change.action == "register":
        return Action(str(change.path), "register", "lists the created file(s) for pip uninstall")
    offsets = [o for p in states for f in p.files if f.path == change.path for o in f.offsets]
    moved = [o for o in offsets if o]
    detail = f"{len(offsets)} hunk(s)" + (f", offsets {', '.join(f'{o:+d}' for o in moved)}" if moved else ", exact")
    return Action(str(change.path), "create" if change.action == "create" else "patch", detail)


def _apply_changes(state: StateDir, report: Report, series: Series, states: list[PatchState],
                   todo: list[PatchState], previous: Manifest | None) -> None:
    changes = _collect_changes(todo)
    probe_memos = _check_results(changes, todo)
    all_changes = list(changes.values()) + _registrations(changes, todo)
    report.actions = [_describe_change(c, states) for c in all_changes]
    if report.dry_run:
        return
    manifest = _updated_manifest(previous, series, states, todo, all_changes, probe_memos)
    writes = [Write(c.path, c.after, c.mode, state.store(c.before) if c.before is not None else None)
              for c in all_changes]
    commit(state, "apply", writes, manifest, previous)
    for patch in todo:
        patch.state, patch.stale = APPLIED, False
        patch.probes = [run_probe(p, read_bytes(patch.package.import_root / p.file)) for p in patch.spec.probes]
        if patch.strip_inferred:
            report.notes.append(f"{patch.spec.id}: strip level {patch.strip} inferred from its paths")


def apply(target: Target, only: tuple[str, ...] = (), dry_run: bool = False, allow_untested: bool = False) -> Report:
    series, choices, env = _prepare("apply", target, only)
    report = Report("apply", env, series, dry_run=dry_run)
    implied = sorted({c.id for c in choices} - set(only)) if only else []
    if implied:
        report.notes.append(f"also selected, as required: {', '.join(implied)}")
    state = StateDir(env.state_dir)
    with _state_access(state, write=not dry_run, report=report):
        previous = state.manifest()
        report.patches = states = _assess(series, choices, target, previous, env, allow_untested)
        for patch in states:
            if patch.untested and allow_untested:
                report.notes.append(_untested_note(patch))
        refusal = _refusal(states)
        if refusal:
            report.error, report.exit_code = refusal, refusal.code
        todo = [p for p in states if p.state == NOT_APPLIED]
        if not todo and not refusal:
            report.notes.append("nothing to do: every selected patch is already applied")
        if refusal or not todo:
            if not dry_run:
                state.remove_if_empty()
            return report
        try:
            _apply_changes(state, report, series, states, todo, previous)
        except PatcherError as error:
            report.error, report.exit_code = error, error.code
            if not dry_run:
                state.remove_if_empty()  # rolled back: no lock file or empty objects dir left behind
    return report


def _revert_writes(state: StateDir, manifest: Manifest, force: bool, report: Report) -> tuple[list[Write], list[str]]:
    """What revert would write; with --dry-run nothing is stored or saved on the way."""
    writes: list[Write] = []
    drifted: list[str] = []
    for entry in manifest.files.values():
        path = recorded_path(report.env, entry)
        if path is None:
            report.notes.append(f"{entry.package} is no longer installed: nothing to restore for {entry.relpath}")
            continue
        current = read_bytes(path)
        digest = sha256(current) if current is not None else None
        if digest == entry.before:
            report.notes.append(f"{path} already holds its original bytes")
            continue
        original = state.fetch(entry.before) if entry.before is not None else None
        if digest != entry.after:
            if entry.action == "register":
                report.notes.append(f"{path} was rewritten since apply (package reinstalled?); left as is")
                continue
            if not force:
                drifted.append(f"{path} (sha256 {digest[:12] if digest else 'absent'}, "
                               f"ernie-patch wrote {entry.after[:12] if entry.after else 'nothing'})")
                continue
            if current is not None and not report.dry_run:
                saved = state.save_overwritten(path, current)
                report.notes.append(f"--force: {path} had been edited after apply; its bytes were saved to {saved}")
            elif current is not None:
                report.notes.append(f"--force would overwrite {path}, edited after apply (a copy would be kept)")
        restore = state.store(current) if current is not None and not report.dry_run else None
        writes.append(Write(path, original, entry.mode, restore))
        what = "remove" if original is None else ("unregister" if entry.action == "register" else "restore")
        report.actions.append(Action(str(path), what, "byte-exact original" if original is not None else
                                     "created by apply"))
    return writes, drifted


def revert(target: Target, dry_run: bool = False, force: bool = False) -> Report:
    env = discover([], target.python, target.site)
    report = Report("revert", env, None, dry_run=dry_run)
    state = StateDir(env.state_dir)
    if not state.exists():
        report.notes.append("nothing to do: no patches applied by ernie-patch in this environment")
        return report
    with _state_access(state, write=not dry_run, report=report):
        manifest = state.manifest()
        if manifest is None:
            report.notes.append("nothing to do: no patches applied by ernie-patch in this environment")
            if not dry_run:
                state.remove_if_empty()
            return report
        report.manifest_patches = sorted(manifest.patches)
        packages = sorted({(e.package, e.module or e.package.replace("-", "_")) for e in manifest.files.values()})
        report.env = discover(packages, target.python, target.site)
        writes, drifted = _revert_writes(state, manifest, force, report)
        if drifted:
            state.drop_objects({e.before for e in manifest.files.values() if e.before})  # refused: keep none
            report.actions = []
            others = f" and {len(drifted) - 1} other file(s)" if len(drifted) > 1 else ""
            report.error = PatcherError(ExitCode.DRIFTED, f"{drifted[0]}{others} changed since apply; not reverting",
                                        details=drifted[1:], hint="revert --force restores the originals and keeps "
                                        "a copy of the edited files")
            report.exit_code = ExitCode.DRIFTED
            return report
        if dry_run:
            return report
        commit(state, "revert", writes, None, manifest)
        state.remove_if_empty()
    return report
