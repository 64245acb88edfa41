"""All-or-nothing writes across files: a journal first, then atomic replaces, then the manifest.

A run that fails or is killed at any point leaves a journal naming the bytes every file had
before it started (kept in the object store); the failing run, or else the next run, puts them
back and restores the previous manifest before doing anything else: an interrupted operation is
undone, never half-done.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import ExitCode, PatcherError
from ..fs.fsops import (atomic_write, discard, fsync_files, import_root, install, install_below, read_bytes,
                        remove_below, remove_bytecode, remove_empty_dirs, remove_file, remove_temp_files, sha256, stage,
                        stage_below, sync_dirs)
from .interrupts import Interrupted, signals_as_errors
from .state import Journal, Manifest, RestoreEntry, StateDir

KILL_ENV = "ERNIE_PATCHER_TEST_KILL_AT"
PAUSE_ENV = "ERNIE_PATCHER_TEST_PAUSE_AT"

Locate = Callable[[list[RestoreEntry]], list[Path]]


def checkpoint(name: str) -> None:
    """Test hooks, used only by the test suite, at checkpoint NAME (journal-written,
    file-N-written, manifest-written, journal-removed; restore-N inside a recovery):
    ERNIE_PATCHER_TEST_KILL_AT=NAME SIGKILLs this process there, ERNIE_PATCHER_TEST_PAUSE_AT=NAME
    (or a comma-separated list of names) SIGSTOPs it there (holding the lock) until the test
    sends SIGCONT.
    """
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if name in os.environ.get(PAUSE_ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGSTOP)


@dataclass(frozen=True)
class Write:
    """Put DATA at PATH (None: remove it); RESTORE is the stored digest of what PATH holds now.

    PACKAGE, MODULE, VERSION, RELPATH and ACTION name the file for the journal, as the manifest does.
    CODE is DATA compiled and marshalled (apply's compile check), reused as its new bytecode; None
    compiles it then. DIRS are the directories (relpaths) apply creates for the file: made before
    DATA is written through them (never following a symlink), removed when empty after the file
    is removed.
    """

    path: Path
    data: bytes | None
    mode: int
    restore: str | None
    package: str
    module: str
    version: str
    relpath: str
    action: str
    code: bytes | None = None
    dirs: tuple[str, ...] = ()

    def journal_entry(self) -> RestoreEntry:
        written = sha256(self.data) if self.data is not None else None
        return RestoreEntry(package=self.package, module=self.module, version=self.version, relpath=self.relpath,
                            action=self.action, digest=self.restore, written=written, mode=self.mode,
                            dirs=list(self.dirs))


@dataclass
class Recovery:
    operation: str
    started: str
    restored: list[str] = field(default_factory=list)


def _put(state: StateDir, path: Path, digest: str | None, mode: int) -> bool:
    current = read_bytes(path)
    if digest is None:
        if current is None:
            return False
        remove_file(path)
        return True
    if current is not None and sha256(current) == digest:
        return False
    atomic_write(path, state.fetch(digest), mode=mode)
    return True


def _put_entry(state: StateDir, path: Path, entry: RestoreEntry) -> bool:
    """_put of ENTRY at PATH. A file in directories apply created is removed through them without
    following a symlink (one planted there since leads to nothing ernie-patch wrote), and put
    back after the directories are made again."""
    if entry.dirs and entry.digest is None:
        return remove_below(path, entry.relpath, undo=True)
    if entry.dirs:
        current = read_bytes(path)
        if current is not None and sha256(current) == entry.digest:
            return False
        temp = stage_below(path, entry.relpath, state.fetch(entry.digest), entry.mode, entry.dirs)
        install_below(temp, path, entry.relpath)
        return True
    return _put(state, path, entry.digest, entry.mode)


def _remove_created_dirs(files: list[tuple[Path, str, list[str] | tuple[str, ...]]]) -> set[Path]:
    """The directories apply created for FILES (path, relpath, dirs), removed when empty, deepest
    first; returns the parents of those removed (to fsync)."""
    by_root: dict[Path, set[str]] = {}
    for path, relpath, dirs in files:
        if dirs:
            by_root.setdefault(import_root(path, relpath), set()).update(dirs)
    removed: list[Path] = []
    for root, dirs in by_root.items():
        removed += remove_empty_dirs(root, dirs)
    return {p.parent for p in removed}


def _referenced(manifest: Manifest | None) -> set[str]:
    if manifest is None:
        return set()
    return {f.before for f in manifest.files.values() if f.before}


def _digest(path: Path) -> str | None:
    data = read_bytes(path)
    return sha256(data) if data is not None else None


def _check_matches(state: StateDir, journal: Journal, paths: list[Path]) -> None:
    """Refuse a journal whose files hold neither what they are to be put back to nor what the
    interrupted run was writing: it was not written for this environment (or someone changed them)."""
    for entry, path in zip(journal.restore, paths):
        if entry.digest is not None:
            state.fetch(entry.digest)  # every stored original is there before anything is written
        found = _digest(path)
        if found not in (entry.digest, entry.written):
            raise PatcherError(
                ExitCode.ENVIRONMENT,
                f"pending journal {state.journal_path} does not match this environment: {path} holds "
                f"{found[:12] if found else 'nothing'}, neither its original nor what the interrupted "
                f"{journal.operation} wrote; refusing to recover",
                hint=f"was the environment copied or changed by hand? inspect {path}; reinstall "
                     f"{entry.package} for pristine files, then remove {state.journal_path}")


def recover(state: StateDir, locate: Locate) -> Recovery | None:
    """Finish or undo an interrupted run from its journal; None when there was nothing to do.

    Each journal entry is found in this environment through LOCATE (package + relpath), and all of
    them are checked before anything is written.
    """
    journal = state.journal()
    if journal is None:
        return None
    manifest = Manifest.from_json(journal.manifest, state.journal_path) if journal.manifest else None
    paths = locate(journal.restore)
    _check_matches(state, journal, paths)
    return _restore(state, journal, paths, manifest)


def _restore(state: StateDir, journal: Journal, paths: list[Path], manifest: Manifest | None) -> Recovery:
    """Put back every file of JOURNAL (at PATHS), the previous MANIFEST, then drop the journal.

    Bytecode is removed only of files put back here: a file the interrupted run never wrote is
    left alone, __pycache__ included (it may be unwritable, and its cache is not stale). The
    directories apply created for files now absent are removed when empty, after every file."""
    report = Recovery(operation=journal.operation, started=journal.started)
    for number, (entry, path) in enumerate(zip(journal.restore, paths), start=1):
        if _put_entry(state, path, entry):
            report.restored.append(str(path))
            if not entry.dirs:  # below directories apply made, _put_entry reaches them no-follow itself
                remove_bytecode(path)
        if not entry.dirs:
            remove_temp_files(path)
        checkpoint(f"restore-{number}")
    _remove_created_dirs([(path, entry.relpath, entry.dirs) for entry, path in zip(journal.restore, paths)
                          if entry.digest is None])
    state.write_manifest(manifest)
    state.remove(state.journal_path)
    state.drop_objects(_referenced(manifest))
    return report


def commit(state: StateDir, operation: str, writes: list[Write], manifest: Manifest | None,
           previous: Manifest | None) -> None:
    """Write everything, journaled; on failure undo it, leaving the files and PREVIOUS manifest.

    SIGINT and SIGTERM during the writes are failures like any other: the files written so far are
    put back before the process exits. A second signal during that rollback stops it and leaves the
    journal, which the next run finishes.
    """
    writes = _with_bytecode(writes)
    journal = Journal(operation=operation, restore=[w.journal_entry() for w in writes],
                      manifest=previous.to_json() if previous else None)
    with signals_as_errors():
        state.write_json(state.journal_path, journal.to_json())
        checkpoint("journal-written")
        try:
            _write_all(state, writes, manifest)
        except Exception as error:
            _roll_back(state, journal, writes, previous, error if isinstance(error, PatcherError) else None)
            raise
    state.drop_objects(_referenced(manifest))


def _bytecode_flags(write: Write) -> int | None:
    """The invalidation mode of WRITE's new bytecode: its release's (for a file in directories apply
    makes, that of the directory they are made in); None: it gets none."""
    from ..fs import bytecode

    if write.data is None:
        return None
    beside = (import_root(write.path, write.relpath) / write.dirs[0]).parent if write.dirs else None
    return bytecode.release_flags(write.path, beside)


def _with_bytecode(writes: list[Write]) -> list[Write]:
    """WRITES with the new bytecode of every Python file whose release keeps bytecode compiled, all
    at once before anything is written (compilepool); one that does not compile gets none later."""
    from ..fs.compilepool import compile_many

    todo = [index for index, write in enumerate(writes) if write.code is None and _bytecode_flags(write) is not None]
    compiled = list(writes)
    for index, result in zip(todo, compile_many([(writes[i].path, writes[i].data or b"") for i in todo])):
        if isinstance(result, bytes):
            compiled[index] = replace(writes[index], code=result)
    return compiled


def _roll_back(state: StateDir, journal: Journal, writes: list[Write], previous: Manifest | None,
               error: PatcherError | None) -> None:
    """Put back what was written; ERROR (None for an unexpected exception) is told what happened."""
    try:
        _restore(state, journal, [w.path for w in writes], previous)
    except Exception as second:
        if error is None:
            return
        reason = second.reason if isinstance(second, PatcherError) else f"{type(second).__name__}: {second}"
        error.details.append(f"rollback stopped ({reason}); the journal {state.journal_path} is left "
                             "and the next ernie-patch run finishes it")
        if isinstance(error, Interrupted):
            error.reason += (f" during {journal.operation}; interrupted again while putting files back: "
                             "the journal is left for the next run")
    else:
        if error is None:
            return
        error.details.append("nothing was changed: every file written so far was put back")
        if isinstance(error, Interrupted):
            error.reason += f" during {journal.operation}; every file written so far was put back"


def _write_all(state: StateDir, writes: list[Write], manifest: Manifest | None) -> None:
    """Every file, then the manifest. New contents are first staged in temp files beside their
    targets and fsynced together (one journal commit, not one per file); then each is renamed in
    place, its stale bytecode removed and fresh bytecode written; every directory touched is
    fsynced once before the manifest says the files are in place."""
    from ..fs import bytecode

    staged: dict[int, str] = {}
    try:
        for index, write in enumerate(writes):
            if write.data is not None:
                staged[index] = (stage_below(write.path, write.relpath, write.data, write.mode, write.dirs)
                                 if write.dirs else stage(write.path, write.data, mode=write.mode, sync=False))
        fsync_files(staged.values())
        touched: set[Path] = set()
        compiled: list[Path] = []
        for number, write in enumerate(writes, start=1):
            flags = _bytecode_flags(write)
            if write.data is None and write.dirs:
                remove_below(write.path, write.relpath)
            elif write.data is None:
                remove_file(write.path, sync_dir=False)
            elif write.dirs:
                install_below(staged.pop(number - 1), write.path, write.relpath)
                touched.update((import_root(write.path, write.relpath) / d).parent for d in write.dirs)
            else:
                install(staged.pop(number - 1), write.path, sync_dir=False)
            touched.add(write.path.parent)
            # below directories apply made, bytecode is reached through them (no-follow), never by path
            if (not write.dirs and remove_bytecode(write.path, sync_dir=False)) or flags is not None:
                touched.add(write.path.parent / "__pycache__")
            if flags is not None:
                compiled += filter(None, [bytecode.write(write.path, write.data, write.code, flags,
                                                         below=write.relpath if write.dirs else None)])
            checkpoint(f"file-{number}-written")
        touched |= _remove_created_dirs([(w.path, w.relpath, w.dirs) for w in writes if w.data is None])
    finally:
        discard(staged.values())
    fsync_files(compiled)
    sync_dirs(touched)
    state.write_manifest(manifest)
    checkpoint("manifest-written")
    state.remove(state.journal_path)
    checkpoint("journal-removed")
