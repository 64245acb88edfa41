"""The four operations — status, apply, verify, revert — returning reports; nothing here prints."""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import ExitCode, PatcherError
from ..fs.fsops import Lock, import_root, read_target, sha256, stat_target
from ..fs.safeio import Pins, note_insecure_path, pinned
from ..patchset.series import Choice, PatchSpec, Series, load_series, ranges_text
from ..target.discovery import Environment, discover
from . import revertable
from .assess import (APPLIED, CONFLICT, DRIFTED, MISSING, NOT_APPLIED, UNSUPPORTED, UPSTREAM, Assessor, PatchState,
                     recorded_path)
from .originals import check_originals, revert_problems, unchecked_note
from .report import Action, Report, Target
from .state import FileRecord, Manifest, RestoreEntry, StateDir, import_name

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
                       target.python, target.site, target.allow_user_writable)
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


def _prepare(target: Target) -> tuple[Series, Environment]:
    """The patch set and the environment with the set's packages located."""
    series = load_series(target.patches)
    env = discover(_packages(list(series.patches)), target.python, target.site, target.allow_user_writable)
    return series, env


def _choices(series: Series, env: Environment, only: tuple[str, ...]) -> list[Choice]:
    """One variant choice per selected id.

    The whole set is resolved against the installed versions, so a set with two variants covering
    one installed version is refused (exit 2) whatever --only selects.
    """
    wanted = {p.id for p in series.select(only)}
    versions = {p.package: (env.package(p.package).version if env.package(p.package) else None)
                for p in series.patches}
    return [c for c in series.resolve(list(series.patches), versions) if c.id in wanted]


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


def _reported(report: Report, body: Callable[[], None]) -> Report:
    """REPORT after BODY; a refusal or failure once the environment is known (a held lock, a corrupt
    manifest, an unknown id, an interruption) is the report's error, so every output of the command
    still says which interpreter and state directory it was about."""
    try:
        body()
    except PatcherError as error:
        report.error, report.exit_code = error, error.code
    return report


def _default_selection(series: Series, manifest: Manifest | None, only: tuple[str, ...], report: Report,
                       checks: bool) -> tuple[str, ...]:
    """ONLY, else (when the command CHECKS: verify, status --exit-code) the selection apply recorded
    (`apply --only`), so a health check looks at what was applied; () is the whole set."""
    if only or manifest is None or manifest.selected is None:
        return only
    selected = tuple(i for i in manifest.selected if i in series.ids)
    if not selected:
        return only
    if checks:
        report.notes.append(f"checking the selection recorded at apply (--only): {', '.join(selected)}; "
                            "--only ID checks another patch")
        return selected
    report.notes.append(f"apply was given --only: {', '.join(selected)}; verify and status --exit-code check those")
    return only


def _orphaned_state_note(report: Report, manifest: Manifest) -> None:
    """Name the state kept for packages that are no longer installed (pip uninstall leaves it)."""
    gone = sorted({e.package for e in manifest.files.values()
                   if e.package in report.env.packages and report.env.package(e.package) is None})
    if not gone:
        return
    patches = sorted(i for i, r in manifest.patches.items() if r.package in gone)
    report.notes.append(f"{report.env.state_dir} keeps the originals of {len(patches)} patch(es) "
                        f"({', '.join(patches)}) of {', '.join(gone)}, no longer installed; "
                        "`ernie-patch revert` clears it")


def _overwritten_note(report: Report, state: StateDir) -> None:
    saved = state.overwritten_names()
    if saved:
        report.notes.append(f"{state.overwritten} holds {len(saved)} file(s) `revert --force` saved before "
                            "overwriting them; remove it when they are no longer needed")


def status(target: Target, only: tuple[str, ...] = (), reparse: bool = False, gate: bool = False) -> Report:
    """The state of each patch (ONLY: of these); with GATE (`status --exit-code`) the exit code and
    error of the worst state among the selected ones, for a CI gate."""
    return _look("status", target, only, reparse, gate)


def _look(command: str, target: Target, only: tuple[str, ...], reparse: bool, gate: bool) -> Report:
    """status and verify: the patches' states; GATE (and verify) defaults to the recorded selection."""
    series, env = _prepare(target)
    report = Report(command, env, series)

    def body() -> None:
        state = StateDir(env.state_dir)
        with _probe_memo_noted(report), _state_access(state, write=False, report=report, target=target) as pins:
            manifest = _load_manifest(state, env, report)
            selected = _default_selection(series, manifest, only, report, checks=gate or command == "verify")
            report.patches = _assess(_choices(series, env, selected), manifest, env, reparse=reparse)
            report.manifest_patches = sorted(manifest.patches) if manifest else []
            _note_user_writable(report, pins)
            if manifest is not None:
                _orphaned_state_note(report, manifest)
            _overwritten_note(report, state)
            problems = revert_problems(env, manifest, state) if manifest else []
        foreign = sorted(set(report.manifest_patches) - {p.id for p in series.patches})
        if foreign:
            report.notes.append(f"the manifest also records patches not in this patch set: {', '.join(foreign)}")
        if problems and command == "verify":  # what would keep revert from running: verify's error, status' note
            raise PatcherError(ExitCode.ENVIRONMENT, problems[0], details=problems[1:],
                               hint=revertable.hint(problems))
        report.notes += problems
        if gate:
            report.error = report.gate_error()
            report.exit_code = report.error.code if report.error else ExitCode.OK

    return _reported(report, body)


VERIFY_HINTS = {
    ExitCode.MISSING: "install the package, or point --python/--site at the environment that has it",
    ExitCode.DRIFTED: "something else changed the file: reinstall the package for pristine files, or "
                      "`ernie-patch revert --force`, then apply again",
    ExitCode.NOT_VERIFIED: "run `ernie-patch apply` (with the same --only, if any), then verify again",
}


def verify(target: Target, only: tuple[str, ...] = (), reparse: bool = False) -> Report:
    """Versions, digests, the bytecode the interpreter would load, probes, and that revert can run
    (every stored original there, every RECORD row apply added). A probe result computed at apply
    is reused only while the file has the very bytes it was computed on; REPARSE evaluates every
    probe again from source, and compares all bytecode with the source compiled."""
    report = _look("verify", target, only, reparse, gate=False)
    if report.error is not None:
        return report
    failing = [(_verify_code(p), p) for p in report.patches]
    for code in (ExitCode.MISSING, ExitCode.DRIFTED, ExitCode.NOT_VERIFIED):
        first = next((p for c, p in failing if c == code), None)
        if first is not None:
            others = [f"{p.spec.id}: {p.reason}" for c, p in failing if c is not None and p is not first and p.reason]
            report.exit_code = code
            report.error = PatcherError(code, f"verify failed: {first.spec.id}: {_verify_why(first)}",
                                        details=others, hint=VERIFY_HINTS[code])
            break
    return report


def _verify_code(patch: PatchState) -> ExitCode | None:
    if patch.state == MISSING:
        return ExitCode.MISSING
    if patch.state == DRIFTED:
        return ExitCode.DRIFTED
    if patch.state not in (APPLIED, UPSTREAM) or not all(p.passed for p in patch.probes):
        return ExitCode.NOT_VERIFIED
    return None


def _verify_why(patch: PatchState) -> str:
    """Why PATCH is not in place, in a few words."""
    failed = [r for r in patch.probes if not r.passed]
    if patch.state == APPLIED and failed:
        return f"probe '{failed[0].probe.describe()}' fails"
    return patch.reason or f"patch is {patch.state}"


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
                   todo: list[PatchState], previous: Manifest | None, only: tuple[str, ...], pins: Pins,
                   allow_user_writable: bool) -> None:
    from .plan import build_plan  # only apply plans writes: status and verify start faster
    from .transaction import commit

    plan = build_plan(todo, compile_later=not report.dry_run)
    report.actions = plan.actions(states)
    report.notes.extend(plan.notes)
    _refuse_user_writable(pins, allow_user_writable)
    report.changed = [p.spec.id for p in todo]
    if report.dry_run:
        return
    manifest = plan.manifest(previous, series, states, todo)
    manifest.selected = _selection(previous, series, only, states)
    _record_strip(manifest, states)
    commit(state, "apply", plan.writes(state), manifest, previous, compiling=plan.compiling)
    report.manifest_patches = sorted(manifest.patches)
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


def _selection(previous: Manifest | None, series: Series, only: tuple[str, ...],
               states: list[PatchState]) -> list[str] | None:
    """What the manifest records as asked for: None for the whole set (apply without --only, or a whole
    set applied before), else the ids --only selected (with what they require) and those selected before."""
    if not only or (previous is not None and previous.patches and previous.selected is None):
        return None
    chosen = {p.spec.id for p in states} | set(previous.selected if previous and previous.selected else ())
    return [i for i in series.ids if i in chosen] + sorted(chosen - set(series.ids))


def _record_strip(manifest: Manifest, states: list[PatchState]) -> None:
    """The strip level each applied patch was read with, so status shows an inferred one after apply too."""
    shown = manifest.answer.get("patches", {})
    for patch in states:
        if patch.spec.id in shown and patch.strip is not None:
            shown[patch.spec.id]["strip"] = patch.strip
            shown[patch.spec.id]["strip_inferred"] = patch.strip_inferred


def apply(target: Target, only: tuple[str, ...] = (), dry_run: bool = False, allow_untested: bool = False,
          allow_user_writable: bool = False) -> Report:
    target = _allowing(target, allow_user_writable)
    series, env = _prepare(target)
    report = Report("apply", env, series, dry_run=dry_run)
    with _probe_memo_noted(report):
        return _reported(report, lambda: _apply(report, target, series, only, allow_untested,
                                                target.allow_user_writable))


def _allowing(target: Target, allow_user_writable: bool) -> Target:
    """TARGET, with --allow-user-writable also for its interpreter when ALLOW_USER_WRITABLE: one
    option trusts the users who can write the environment, its directories and its interpreter."""
    import dataclasses

    return dataclasses.replace(target, allow_user_writable=True) if allow_user_writable else target


def _apply(report: Report, target: Target, series: Series, only: tuple[str, ...], allow_untested: bool,
           allow_user_writable: bool) -> None:
    dry_run = report.dry_run
    choices = _choices(series, report.env, only)
    implied = sorted({c.id for c in choices} - set(only)) if only else []
    if implied:
        report.notes.append(f"also selected, as required: {', '.join(implied)}")
    state = StateDir(report.env.state_dir)
    with _state_access(state, write=not dry_run, report=report, target=target) as pins:
        previous = _load_manifest(state, report.env, report)
        report.manifest_patches = sorted(previous.patches) if previous else []
        report.patches = states = _assess(choices, previous, report.env, allow_untested)
        for patch in states:
            if patch.untested and allow_untested:
                report.notes.append(_untested_note(patch))
            if patch.state == UPSTREAM:
                report.notes.append(f"{patch.spec.id}: skipped, {patch.reason}")
        refusal = _refusal(states)
        if refusal:
            report.error, report.exit_code = refusal, refusal.code
        todo = [p for p in states if p.state == NOT_APPLIED]
        if not todo and not refusal:
            upstream = " or fixed upstream" if any(p.state == UPSTREAM for p in states) else ""
            report.notes.append(f"nothing to do: every selected patch is already applied{upstream}")
        if refusal or not todo:
            if not dry_run:
                state.remove_if_empty()
            return
        try:
            _apply_changes(state, report, series, states, todo, previous, only, pins, allow_user_writable)
        except PatcherError as error:
            report.error, report.exit_code = error, error.code
            report.changed = []
            if not dry_run:
                _tidy(state)  # rolled back: no lock file or empty objects dir left behind


def _revert_writes(state: StateDir, entries: list[FileRecord], force: bool,
                   report: Report) -> tuple[list[Write], list[str], list[tuple[bytes, int]]]:
    """What revert would write for ENTRIES, the files drifted since apply, and what the files to
    restore hold now (with their mode, for the object store before the transaction); with
    --dry-run nothing is saved on the way."""
    from .transaction import Write

    writes: list[Write] = []
    drifted: list[str] = []
    kept: list[tuple[bytes, int]] = []
    gone: dict[str, int] = {}
    for entry in entries:
        path = recorded_path(report.env, entry)
        if path is None:
            gone[entry.package] = gone.get(entry.package, 0) + 1
            continue
        current = read_target(path, entry.relpath)
        digest = sha256(current) if current is not None else None
        mode = _mode_now(path, entry.relpath) if current is not None else None
        chmod_only = digest == entry.before and current is not None and mode != entry.mode \
            and entry.after_mode is not None
        if digest == entry.before and not entry.dirs and not chmod_only:
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
                report.notes.append(f"--force: {path} had been edited after apply; the copies revert --force keeps "
                                    f"stay in {state.overwritten} (remove it when they are no longer needed); its "
                                    f"bytes were saved to {saved}")
            elif current is not None:
                report.notes.append(f"--force would overwrite {path}, edited after apply (a copy would be kept in "
                                    f"{state.overwritten})")
        restore = digest if current is not None and not report.dry_run else None
        if restore is not None:
            kept.append((current, entry.mode))
        writes.append(Write(path, original, entry.mode, restore, package=entry.package,
                            module=import_name(entry.package, entry.module), version=entry.version,
                            relpath=entry.relpath, action=entry.action, dirs=tuple(entry.dirs),
                            emptied=dict(entry.emptied), restore_mode=mode, chmod_only=chmod_only))
        what = "remove" if original is None else ("unregister" if entry.action == "register" else "restore")
        detail = "byte-exact original" if original is not None else "created by apply"
        if chmod_only:
            detail = f"mode {entry.mode:o} (apply set {mode:o})"
        if entry.emptied:
            detail += (f"; in the director{'ies' if len(entry.emptied) > 1 else 'y'} apply removed, made again: "
                       f"{', '.join(sorted(entry.emptied))}")
        if entry.dirs:
            detail += (f"{' (already gone)' if current is None else ''}; and, when empty, the director"
                       f"{'ies' if len(entry.dirs) > 1 else 'y'} apply created: {', '.join(entry.dirs)}")
        report.actions.append(Action(str(path), what, detail))
    for package, count in sorted(gone.items()):
        report.notes.append(f"{package} is no longer installed: nothing to restore for its {count} recorded "
                            f"file(s); the state kept for them is {'listed' if report.dry_run else 'removed'}")
    return writes, drifted, kept


def _mode_now(path: Path, relpath: str) -> int | None:
    found = stat_target(path, relpath)
    return found.st_mode & 0o7777 if found is not None else None


def _revert_selection(manifest: Manifest, only: tuple[str, ...]) -> set[str]:
    """The applied patches `revert --only ONLY` takes out: ONLY and every applied patch that requires
    one of them (as recorded at apply), so no applied patch is left without what it requires."""
    known = set(manifest.answer.get("ids") or ()) | set(manifest.patches)
    unknown = [i for i in only if i not in known]
    if unknown:
        from difflib import get_close_matches

        close = get_close_matches(unknown[0], sorted(known), n=1)
        raise PatcherError(ExitCode.USAGE, f"unknown patch id '{unknown[0]}'"
                           + (f" (did you mean '{close[0]}'?)" if close else ""),
                           hint=f"applied here: {', '.join(sorted(manifest.patches)) or 'none'}")
    shown = manifest.answer.get("patches") or {}
    requires = {i: shown.get(i, {}).get("requires") for i in manifest.patches}
    unknown_requires = sorted(i for i, r in requires.items() if not isinstance(r, list))
    if unknown_requires:
        raise PatcherError(ExitCode.USAGE, f"cannot revert only some patches: the manifest does not record what "
                           f"{', '.join(unknown_requires)} require(s) (written by an older ernie-patcher)",
                           hint="revert without --only takes every patch out")
    chosen = {i for i in only if i in manifest.patches}
    grown = True
    while grown:
        extra = {i for i, needs in requires.items() if i not in chosen and chosen & set(needs)}
        chosen |= extra
        grown = bool(extra)
    return chosen


def _revert_entries(manifest: Manifest, chosen: set[str]) -> list[FileRecord]:
    """The files of the CHOSEN patches; refused when another applied patch changed one of them too."""
    entries = []
    for entry in manifest.files.values():
        touched = set(entry.patches) & chosen
        if not touched:
            continue
        others = sorted(set(entry.patches) - chosen)
        if others:
            raise PatcherError(ExitCode.USAGE, f"cannot revert {', '.join(sorted(touched))} alone: {entry.relpath} "
                               f"is also changed by {', '.join(others)}",
                               hint=f"add --only {' --only '.join(others)}, or revert without --only")
        entries.append(entry)
    return entries


def _remaining(manifest: Manifest, chosen: set[str]) -> Manifest | None:
    """The manifest after the CHOSEN patches are reverted; None when nothing stays applied."""
    if chosen >= set(manifest.patches):
        return None
    left = copy.deepcopy(manifest)
    for patch_id in chosen:
        left.patches.pop(patch_id, None)
        left.answer.get("patches", {}).pop(patch_id, None)
    left.files = {k: e for k, e in left.files.items() if not set(e.patches) & chosen}
    order = list(manifest.selected or manifest.answer.get("ids") or [])  # the series order, when recorded
    left.selected = [i for i in order if i in left.patches] + sorted(set(left.patches) - set(order))
    return left


def revert(target: Target, dry_run: bool = False, force: bool = False, only: tuple[str, ...] = (),
           allow_user_writable: bool = False) -> Report:
    target = _allowing(target, allow_user_writable)
    env = discover([], target.python, target.site, target.allow_user_writable)
    report = Report("revert", env, None, dry_run=dry_run)
    return _reported(report, lambda: _revert(report, target, force, only, target.allow_user_writable))


def _revert(report: Report, target: Target, force: bool, only: tuple[str, ...], allow_user_writable: bool) -> None:
    dry_run = report.dry_run
    state = StateDir(report.env.state_dir)
    if not state.exists():
        report.notes.append("nothing to do: no patches applied by ernie-patch in this environment")
        return
    with _state_access(state, write=not dry_run, report=report, target=target) as pins:
        manifest = state.manifest()
        if manifest is None:
            report.notes.append("nothing to do: no patches applied by ernie-patch in this environment")
            _overwritten_note(report, state)
            if not dry_run:
                state.remove_if_empty()
            return
        report.manifest_patches = sorted(manifest.patches)
        chosen = _revert_selection(manifest, only) if only else set(manifest.patches)
        if not chosen:
            report.notes.append(f"nothing to do: {', '.join(only)} not applied by ernie-patch in this environment")
            return
        implied = sorted(chosen - set(only)) if only else []
        if implied:
            report.notes.append(f"also reverted, as they require it: {', '.join(implied)}")
        entries = _revert_entries(manifest, chosen)
        packages = sorted({(e.package, import_name(e.package, e.module)) for e in manifest.files.values()})
        report.env = discover(packages, target.python, target.site, target.allow_user_writable)
        _note_paths(target, report.env)
        _enter_directories(report.env, manifest)
        _refuse_user_writable(pins, allow_user_writable)  # before anything is saved or dropped
        unchecked = check_originals(report.env, manifest, state, state.manifest_path)
        if unchecked:
            report.notes.append(unchecked_note(unchecked))
        writes, drifted, kept = _revert_writes(state, entries, force, report)
        if drifted:
            state.drop_objects({e.before for e in manifest.files.values() if e.before})  # refused: keep none
            report.actions = []
            others = f" and {len(drifted) - 1} other file(s)" if len(drifted) > 1 else ""
            report.error = PatcherError(ExitCode.DRIFTED, f"{drifted[0]}{others} changed since apply; not reverting",
                                        details=drifted[1:], hint="revert --force restores the originals and keeps "
                                        f"a copy of the edited files in {state.overwritten}")
            report.exit_code = ExitCode.DRIFTED
            return
        report.changed = [i for i in manifest.patches if i in chosen]
        if dry_run:
            return
        from .transaction import commit

        if kept:
            state.store_many([data for data, _ in kept], [mode for _, mode in kept])
        left = _remaining(manifest, chosen)
        commit(state, "revert", writes, left, manifest)
        report.manifest_patches = sorted(left.patches) if left else []
        state.remove_if_empty()
        _overwritten_note(report, state)
    _note_kept_directories(report, writes)


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
