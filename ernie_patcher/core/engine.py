"""The four operations — status, apply, verify, revert — returning reports; nothing here prints."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import ExitCode, PatcherError
from ..fs.fsops import Lock, import_root, read_bytes, sha256
from ..patchset.series import Choice, PatchSpec, Series, load_series, ranges_text
from ..target.discovery import Environment, discover
from .assess import APPLIED, CONFLICT, DRIFTED, MISSING, NOT_APPLIED, UNSUPPORTED, Assessor, PatchState, recorded_path
from .originals import check_originals, unchecked_note
from .report import Action, Report, Target
from .state import Manifest, RestoreEntry, StateDir, import_name

if TYPE_CHECKING:  # the write machinery is imported by the commands that write (or recover)
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
def _state_access(state: StateDir, write: bool, report: Report, target: Target) -> Iterator[None]:
    """Lock the state directory; any pending journal is recovered first (needs write access).

    A run that fails in any way (a refusal, an interruption, an internal error) leaves no lock
    file or empty state directory behind."""
    if not write and not state.exists():
        yield
        return
    needs_recovery = state.has_journal()
    exclusive = write or needs_recovery
    with Lock(state.lock_path, exclusive=exclusive):
        if needs_recovery:
            from .transaction import recover

            _note_recovery(report, recover(state, _locator(target)))
        try:
            yield
        except BaseException:
            if write:
                _tidy(state)  # a refused run (e.g. a malformed patch) leaves no state dir behind
            raise
        if needs_recovery:
            state.remove_if_empty()  # under the lock: a waiting run must never lock a removed lock file


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


def status(target: Target, only: tuple[str, ...] = (), reparse: bool = False) -> Report:
    series, choices, env = _prepare(target, only)
    report = Report("status", env, series)
    state = StateDir(env.state_dir)
    with _state_access(state, write=False, report=report, target=target):
        manifest = _load_manifest(state, env, report)
        report.patches = _assess(choices, manifest, env, reparse=reparse)
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


def _apply_changes(state: StateDir, report: Report, series: Series, states: list[PatchState],
                   todo: list[PatchState], previous: Manifest | None) -> None:
    from ..patchset.probes import run_probe
    from .plan import build_plan  # only apply plans writes: status and verify start faster
    from .transaction import commit

    plan = build_plan(todo)
    report.actions = plan.actions(states)
    if report.dry_run:
        return
    commit(state, "apply", plan.writes(state), plan.manifest(previous, series, states, todo), previous)
    for patch in todo:
        patch.state, patch.stale = APPLIED, False
        patch.probes = [run_probe(p, read_bytes(patch.package.import_root / p.file)) for p in patch.spec.probes]
        if patch.strip_inferred:
            report.notes.append(f"{patch.spec.id}: strip level {patch.strip} inferred from its paths")


def apply(target: Target, only: tuple[str, ...] = (), dry_run: bool = False, allow_untested: bool = False) -> Report:
    series, choices, env = _prepare(target, only)
    report = Report("apply", env, series, dry_run=dry_run)
    implied = sorted({c.id for c in choices} - set(only)) if only else []
    if implied:
        report.notes.append(f"also selected, as required: {', '.join(implied)}")
    state = StateDir(env.state_dir)
    with _state_access(state, write=not dry_run, report=report, target=target):
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
            _apply_changes(state, report, series, states, todo, previous)
        except PatcherError as error:
            report.error, report.exit_code = error, error.code
            if not dry_run:
                _tidy(state)  # rolled back: no lock file or empty objects dir left behind
    return report


def _revert_writes(state: StateDir, manifest: Manifest, force: bool, report: Report) -> tuple[list[Write], list[str]]:
    """What revert would write; with --dry-run nothing is stored or saved on the way."""
    from .transaction import Write

    writes: list[Write] = []
    drifted: list[str] = []
    kept: list[bytes] = []  # what the files hold now, stored (once each) before the transaction
    for entry in manifest.files.values():
        path = recorded_path(report.env, entry)
        if path is None:
            report.notes.append(f"{entry.package} is no longer installed: nothing to restore for {entry.relpath}")
            continue
        current = read_bytes(path)
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
            kept.append(current)
        writes.append(Write(path, original, entry.mode, restore, package=entry.package,
                            module=import_name(entry.package, entry.module), version=entry.version,
                            relpath=entry.relpath, action=entry.action, dirs=tuple(entry.dirs)))
        what = "remove" if original is None else ("unregister" if entry.action == "register" else "restore")
        detail = "byte-exact original" if original is not None else "created by apply"
        if entry.dirs:
            detail += (f"{' (already gone)' if current is None else ''}; and, when empty, the director"
                       f"{'ies' if len(entry.dirs) > 1 else 'y'} apply created: {', '.join(entry.dirs)}")
        report.actions.append(Action(str(path), what, detail))
    if kept and not drifted:
        state.store_many(kept)
    return writes, drifted


def revert(target: Target, dry_run: bool = False, force: bool = False) -> Report:
    env = discover([], target.python, target.site)
    report = Report("revert", env, None, dry_run=dry_run)
    state = StateDir(env.state_dir)
    if not state.exists():
        report.notes.append("nothing to do: no patches applied by ernie-patch in this environment")
        return report
    with _state_access(state, write=not dry_run, report=report, target=target):
        manifest = state.manifest()
        if manifest is None:
            report.notes.append("nothing to do: no patches applied by ernie-patch in this environment")
            if not dry_run:
                state.remove_if_empty()
            return report
        report.manifest_patches = sorted(manifest.patches)
        packages = sorted({(e.package, import_name(e.package, e.module)) for e in manifest.files.values()})
        report.env = discover(packages, target.python, target.site)
        unchecked = check_originals(report.env, manifest, state, state.manifest_path)
        if unchecked:
            report.notes.append(unchecked_note(unchecked))
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
        from .transaction import commit

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
