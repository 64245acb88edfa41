"""The four operations — status, apply, verify, revert — returning reports; nothing here prints."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import ExitCode, PatcherError
from ..fs.fsops import Lock, import_root, read_target, sha256, stat_target
from ..fs.safeio import Pins, note_insecure_path, pinned
from ..patchset.series import Choice, PatchSpec, Series, load_series, ranges_text
from ..target.discovery import Environment, discover
from .assess import APPLIED, CONFLICT, DRIFTED, MISSING, NOT_APPLIED, UNSUPPORTED, Assessor, PatchState, recorded_path
from .originals import check_originals, unchecked_note
from .report import Action, Report, Target
from .state import Manifest, RestoreEntry, StateDir, import_name

if TYPE_CHECKING:  # the write machinery is imported by the commands that write (or recover)
    from ..patchset.probes import ProbeResult
    from ..patchset.series import ProbeSpec
    from ..target.discovery import InstalledPackage
    from .transaction import Locate, Recovery, Write

REFUSALS = ((MISSING, ExitCode.MISSING), (UNSUPPORTED, ExitCode.UNSUPPORTED_VERSION),
            (DRIFTED, ExitCode.DRIFTED), (CONFLICT, ExitCode.CONFLICT))


def _packages(specs: list[PatchSpec]) -> list[tuple[str, str]]:
    return [(s.package, s.module) for s in specs]


def _locator(target: Target) -> Locate:
    """Where a pending journal's files are in the environment this run works on."""
    def locate(entries: list[RestoreEntry]) -> list[Path]:
        env = discover(sorted({(e.package, import_name(e.package, e.module)) for e in entries}),
                       target.python, target.site)
        paths = []
        for entry in entries:
            path = recorded_path(env, entry)
            if path is None:
                raise PatcherError(ExitCode.ENVIRONMENT,
                                   f"pending journal {env.state_dir / 'journal.json'} names {entry.relpath} of "
                                   f"{entry.package}, which is not installed in {env.python}; refusing to recover",
                                   hint=f"install {entry.package} {entry.version} again, or remove the journal")
            paths.append(path)
        return paths
    return locate


@contextmanager
def _state_access(state: StateDir, write: bool, report: Report, target: Target) -> Iterator[Pins]:
    """Lock the state directory; any pending journal is recovered first (needs write access).
    Yields the pins of the run (safeio.pinned): the package directories it enters keep the
    identity they had when it first entered them (planning), and it knows which others can write.

    A run that fails in any way (a refusal, an interruption, an internal error) leaves no lock
    file or empty state directory behind."""
    if not write and not state.exists():
        with pinned() as pins:
            _note_paths(target, report.env)
            yield pins
        return
    try:
        with _locked(state, write, report, target) as pins:
            yield pins
    finally:
        state.close()


@contextmanager
def _locked(state: StateDir, write: bool, report: Report, target: Target) -> Iterator[Pins]:
    """_state_access once the state directory exists or is to be written."""
    needs_recovery = state.has_journal()
    exclusive = write or needs_recovery
    with Lock(state.lock_path, exclusive=exclusive) as lock:
        state.pin(lock.directory)
        if needs_recovery:
            from .transaction import recover

            with pinned():
                _note_recovery(report, recover(state, _locator(target)))
        try:
            with pinned() as pins:
                _note_paths(target, report.env)
                yield pins
        except BaseException:
            if write:
                _tidy(state)  # a refused run (e.g. a malformed patch) leaves no state dir behind
            raise
        if needs_recovery:
            state.remove_if_empty()  # under the lock: a waiting run must never lock a removed lock file


def _note_paths(target: Target, env: Environment) -> None:
    """Name (in the run's pins) a directory through which another user could redirect the site as
    given, the environment's packages directory or a package's import root elsewhere (editable)."""
    roots = {env.state_dir.parent, *(p.import_root for p in env.packages.values() if p is not None)}
    for path in ([target.site] if target.site else []) + sorted(roots):
        note_insecure_path(path)


def _tidy(state: StateDir) -> None:
    """remove_if_empty after a failure: a second error here must not hide the first."""
    try:
        state.remove_if_empty()
    except PatcherError:
        pass


def _load_manifest(state: StateDir, env: Environment, report: Report) -> Manifest | None:
    """The manifest, refused when a stored original is not the installed release's file."""
    manifest = state.manifest()
    if manifest is not None:
        unchecked = check_originals(env, manifest, state, state.manifest_path)
        if unchecked:
            report.notes.append(unchecked_note(unchecked))
    return manifest


def _note_recovery(report: Report, recovery: Recovery | None) -> None:
    if recovery is not None:
        report.notes.append(f"recovered an interrupted {recovery.operation} started {recovery.started}: "
                            f"{len(recovery.restored)} file(s) put back as they were before it")


def _assess(choices: list[Choice], manifest: Manifest | None, env: Environment, allow_untested: bool = False,
            reparse: bool = False) -> list[PatchState]:
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


def _prepare(target: Target, only: tuple[str, ...] = ()) -> tuple[Series, list[Choice], Environment]:
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


@contextmanager
def _probe_memo_noted(report: Report) -> Iterator[None]:
    """REPORT says (once) when the probe memo was not used because its directory is not safely the user's."""
    from .probememo import take_note

    take_note()  # one left by an earlier command of this process is not this one's
    try:
        yield
    finally:
        note = take_note()
        if note is not None:
            report.notes.append(note)


def status(target: Target, only: tuple[str, ...] = (), reparse: bool = False) -> Report:
    series, choices, env = _prepare(target, only)
    report = Report("status", env, series)
    state = StateDir(env.state_dir)
    with _probe_memo_noted(report), _state_access(state, write=False, report=report, target=target) as pins:
        manifest = _load_manifest(state, env, report)
        report.patches = _assess(choices, manifest, env, reparse=reparse)
        report.manifest_patches = sorted(manifest.patches) if manifest else []
        _note_user_writable(report, pins)
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


def _apply_changes(state: StateDir, report: Report, series: Series, states: list[PatchState],
                   todo: list[PatchState], previous: Manifest | None, pins: Pins, allow_user_writable: bool) -> None:
    from .plan import build_plan  # only apply plans writes: status and verify start faster
    from .transaction import commit

    plan = build_plan(todo)
    report.actions = plan.actions(states)
    _refuse_user_writable(pins, allow_user_writable)
    if report.dry_run:
        return
    commit(state, "apply", plan.writes(state), plan.manifest(previous, series, states, todo), previous)
    for patch in todo:
        patch.state, patch.stale = APPLIED, False
        patch.probes = [_probe_written(p, patch.package) for p in patch.spec.probes]
        if patch.strip_inferred:
            report.notes.append(f"{patch.spec.id}: strip level {patch.strip} inferred from its paths")


def _probe_written(probe: ProbeSpec, package: InstalledPackage) -> ProbeResult:
    """PROBE on what apply wrote; a file now out of reach fails the probe (verify will say more): apply
    itself is done, and its exit code says so."""
    from ..patchset.probes import ProbeResult, run_probe

    try:
        return run_probe(probe, read_target(package.import_root / probe.file, probe.file))
    except PatcherError as error:
        return ProbeResult(probe, False, error.reason)


def apply(target: Target, only: tuple[str, ...] = (), dry_run: bool = False, allow_untested: bool = False,
          allow_user_writable: bool = False) -> Report:
    series, choices, env = _prepare(target, only)
    report = Report("apply", env, series, dry_run=dry_run)
    with _probe_memo_noted(report):
        return _apply(report, target, series, choices, env, only, allow_untested, allow_user_writable)


def _apply(report: Report, target: Target, series: Series, choices: list[Choice], env: Environment,
           only: tuple[str, ...], allow_untested: bool, allow_user_writable: bool) -> Report:
    dry_run = report.dry_run
    implied = sorted({c.id for c in choices} - set(only)) if only else []
    if implied:
        report.notes.append(f"also selected, as required: {', '.join(implied)}")
    state = StateDir(env.state_dir)
    with _state_access(state, write=not dry_run, report=report, target=target) as pins:
        previous = _load_manifest(state, env, report)
        report.patches = states = _assess(choices, previous, env, allow_untested)
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
            _apply_changes(state, report, series, states, todo, previous, pins, allow_user_writable)
        except PatcherError as error:
            report.error, report.exit_code = error, error.code
            if not dry_run:
                _tidy(state)  # rolled back: no lock file or empty objects dir left behind
    return report


def _revert_writes(state: StateDir, manifest: Manifest, force: bool,
                   report: Report) -> tuple[list[Write], list[str], list[tuple[bytes, int]]]:
    """What revert would write, the files drifted since apply, and what the files to restore hold now
    (for the object store, before the transaction); with --dry-run nothing is saved on the way."""
    from .transaction import Write

    writes: list[Write] = []
    drifted: list[str] = []
    kept: list[tuple[bytes, int]] = []  # what the files hold now (and their mode), stored before the transaction
    for entry in manifest.files.values():
        path = recorded_path(report.env, entry)
        if path is None:
            report.notes.append(f"{entry.package} is no longer installed: nothing to restore for {entry.relpath}")
            continue
        current = read_target(path, entry.relpath)
        digest = sha256(current) if current is not None else None
        if digest == entry.before and not entry.dirs:
            report.notes.append(f"{path} already holds its original bytes")
            continue
        original = state.fetch(entry.before) if entry.before is not None else None
        if digest != entry.after and digest != entry.before:
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
        restore = digest if current is not None and not report.dry_run else None
        if restore is not None:
            kept.append((current, entry.mode))
        writes.append(Write(path, original, entry.mode, restore, package=entry.package,
                            module=import_name(entry.package, entry.module), version=entry.version,
                            relpath=entry.relpath, action=entry.action, dirs=tuple(entry.dirs)))
        what = "remove" if original is None else ("unregister" if entry.action == "register" else "restore")
        detail = "byte-exact original" if original is not None else "created by apply"
        if entry.dirs:
            detail += (f"{' (already gone)' if current is None else ''}; and, when empty, the director"
                       f"{'ies' if len(entry.dirs) > 1 else 'y'} apply created: {', '.join(entry.dirs)}")
        report.actions.append(Action(str(path), what, detail))
    return writes, drifted, kept


def revert(target: Target, dry_run: bool = False, force: bool = False, allow_user_writable: bool = False) -> Report:
    env = discover([], target.python, target.site)
    report = Report("revert", env, None, dry_run=dry_run)
    state = StateDir(env.state_dir)
    if not state.exists():
        report.notes.append("nothing to do: no patches applied by ernie-patch in this environment")
        return report
    with _state_access(state, write=not dry_run, report=report, target=target) as pins:
        manifest = state.manifest()
        if manifest is None:
            report.notes.append("nothing to do: no patches applied by ernie-patch in this environment")
            if not dry_run:
                state.remove_if_empty()
            return report
        report.manifest_patches = sorted(manifest.patches)
        packages = sorted({(e.package, import_name(e.package, e.module)) for e in manifest.files.values()})
        report.env = discover(packages, target.python, target.site)
        _note_paths(target, report.env)
        _enter_directories(report.env, manifest)
        _refuse_user_writable(pins, allow_user_writable)  # before anything is saved or dropped
        unchecked = check_originals(report.env, manifest, state, state.manifest_path)
        if unchecked:
            report.notes.append(unchecked_note(unchecked))
        writes, drifted, kept = _revert_writes(state, manifest, force, report)
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
        from .transaction import commit

        if kept:
            state.store_many([data for data, _ in kept], [mode for _, mode in kept])

        commit(state, "revert", writes, None, manifest)
        state.remove_if_empty()
    _note_kept_directories(report, writes)
    return report


def _note_kept_directories(report: Report, writes: list[Write]) -> None:
    """Directories apply created that revert left because they are not empty (files added since)."""
    kept = sorted({str(import_root(w.path, w.relpath) / d) for w in writes for d in w.dirs
                   if os.path.lexists(import_root(w.path, w.relpath) / d)})
    if kept:
        report.notes.append(f"kept {len(kept)} director{'ies' if len(kept) > 1 else 'y'} apply created, as they "
                            f"are not empty (files ernie-patch did not create): {', '.join(kept)}")


def _enter_directories(env: Environment, manifest: Manifest) -> None:
    """Enter (and so pin, and learn who can write) the directory of every file the manifest names."""
    for entry in manifest.files.values():
        path = recorded_path(env, entry)
        if path is not None:
            stat_target(path, entry.relpath)


def _writable_directories(pins: Pins, limit: int = 3) -> str:
    found = sorted(pins.user_writable.items())
    listed = ", ".join(f"{path} ({why})" for path, why in found[:limit])
    return listed + (f" and {len(found) - limit} more" if len(found) > limit else "")


def _note_user_writable(report: Report, pins: Pins) -> None:
    """Name the package directories another user than root (or the one running ernie-patch) can write."""
    if pins.user_writable:
        report.notes.append(f"package directories another user can write: {_writable_directories(pins)}; "
                            "as root, apply and revert refuse to write there without --allow-user-writable")


def _refuse_user_writable(pins: Pins, allowed: bool) -> None:
    """As rpm does, root does not write in package directories another user can change (that user could
    swap what root writes), unless the operator says that user is trusted (ALLOWED)."""
    if os.geteuid() != 0 or allowed or not pins.user_writable:
        return
    (first, why), *rest = sorted(pins.user_writable.items())
    raise PatcherError(ExitCode.ENVIRONMENT, f"refusing to write as root in {first}: it is {why}, so another "
                       "user could swap what root writes there",
                       details=[f"also {path} ({reason})" for path, reason in rest[:10]],
                       hint="make the package directories root's and not group- or world-writable (chown root, "
                            "chmod go-w), or pass --allow-user-writable if every user who can write them is trusted")
