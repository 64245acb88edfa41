"""All-or-nothing writes across files: a journal first, then atomic replaces, then the manifest.

A run that fails or is killed at any point leaves a journal naming the bytes every file had
before it started (kept in the object store); the failing run, or else the next run, puts them
back and restores the previous manifest before doing anything else: an interrupted operation is
undone, never half-done.
"""
from __future__ import annotations

import os
import signal
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import ExitCode, PatcherError
from ..fs.fsops import (StagedFile, chmod_target, discard, fsync_entries, fsync_staged, import_root, install, put,
                        read_target, remove, remove_bytecode, remove_empty_dirs, remove_temp_files, sha256, stage,
                        stat_target, sync_directories)
from .interrupts import Interrupted, signals_as_errors

if TYPE_CHECKING:
    from .plan import CompileCheck
from .state import Journal, Manifest, RestoreEntry, StateDir

KILL_ENV = "ERNIE_PATCHER_TEST_KILL_AT"
PAUSE_ENV = "ERNIE_PATCHER_TEST_PAUSE_AT"

Locate = Callable[[list[RestoreEntry]], list[Path]]


def checkpoint(name: str) -> None:
    """Test hooks, used only by the test suite, at checkpoint NAME (journal-written,
    file-N-written, manifest-written, journal-removed; restore-N and restored-manifest-written
    inside a recovery or rollback):
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
    emptied: dict[str, int] = field(default_factory=dict)
    restore_mode: int | None = None
    chmod_only: bool = False

    def journal_entry(self) -> RestoreEntry:
        written = sha256(self.data) if self.data is not None else None
        mode = self.mode if self.restore_mode is None else self.restore_mode
        return RestoreEntry(package=self.package, module=self.module, version=self.version, relpath=self.relpath,
                            action=self.action, digest=self.restore, written=written, mode=mode,
                            dirs=list(self.dirs), emptied=dict(self.emptied))


def made_dirs(dirs: list[str] | tuple[str, ...], emptied: dict[str, int]) -> dict[str, int | None]:
    """The directories to make before a file is written: DIRS with their parent's mode (None),
    EMPTIED with their own (safeio.open_tree)."""
    return {**{d: None for d in dirs}, **emptied}


@dataclass
class Recovery:
    operation: str
    started: str
    restored: list[str] = field(default_factory=list)


def _put(state: StateDir, path: Path, entry: RestoreEntry) -> bool:
    """Put ENTRY's stored original at PATH (remove the file when it had none); False when it already
    holds that. Every directory is reached from the import root by descriptor: one moved or
    replaced since this run entered it refuses (the journal stays for the run after it is back)."""
    if entry.digest is None:
        return remove(path, entry.relpath, undo=True)
    found = stat_target(path, entry.relpath)
    if found is not None and stat.S_ISREG(found.st_mode):
        current = read_target(path, entry.relpath)
        if current is not None and sha256(current) == entry.digest:
            if found.st_mode & 0o7777 == entry.mode:
                return False
            chmod_target(path, entry.relpath, entry.mode)
            return True
    put(path, entry.relpath, state.fetch(entry.digest), entry.mode, made_dirs(entry.dirs, entry.emptied),
        replace_any=True)
    return True


def _parent_dir(relpath: str) -> str:
    return relpath.rpartition("/")[0]


def _remove_created_dirs(files: list[tuple[Path, str, list[str] | tuple[str, ...], dict[str, int]]]
                         ) -> set[tuple[Path, str]]:
    """The directories apply created for FILES (path, relpath, dirs, emptied), and those a patch
    emptied, removed when empty, deepest first; returns the parents of those removed (import root,
    relpath), to fsync."""
    by_root: dict[Path, tuple[set[str], set[str]]] = {}
    for path, relpath, dirs, emptied in files:
        if dirs or emptied:
            created, released = by_root.setdefault(import_root(path, relpath), (set(), set()))
            created.update(dirs)
            released.update(emptied)
    parents: set[tuple[Path, str]] = set()
    for root, (created, released) in by_root.items():
        parents |= {(root, _parent_dir(str(p.relative_to(root)))) for p in remove_empty_dirs(root, created, released)}
    return parents


def _referenced(manifest: Manifest | None) -> set[str]:
    if manifest is None:
        return set()
    return {f.before for f in manifest.files.values() if f.before}


def _digest(path: Path, relpath: str) -> str | None:
    data = read_target(path, relpath)
    return sha256(data) if data is not None else None


def _check_matches(state: StateDir, journal: Journal, paths: list[Path]) -> None:
    """Refuse a journal whose files hold neither what they are to be put back to nor what the
    interrupted run was writing: it was not written for this environment (or someone changed them)."""
    for entry, path in zip(journal.restore, paths):
        if entry.digest is not None:
            state.fetch(entry.digest)  # every stored original is there before anything is written
        found = _digest(path, entry.relpath)
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


def _restore(state: StateDir, journal: Journal, paths: list[Path], manifest: Manifest | None,
             begun: set[int] | None = None) -> Recovery:
    """Put back every file of JOURNAL (at PATHS), the previous MANIFEST, then drop the journal.
    BEGUN (a rollback in the failing run itself): the indexes of the files that run began to
    write; the others it never wrote are left as they are, whatever happened to them meanwhile.

    Bytecode is removed only of files put back here: a file the interrupted run never wrote is
    left alone, __pycache__ included (it may be unwritable, and its cache is not stale). The
    directories apply created for files now absent are removed when empty, after every file."""
    report = Recovery(operation=journal.operation, started=journal.started)
    for number, (entry, path) in enumerate(zip(journal.restore, paths), start=1):
        if begun is not None and number - 1 not in begun:
            continue
        if _put(state, path, entry):
            report.restored.append(str(path))
            if entry.digest is not None:
                remove_bytecode(path, entry.relpath)
        if entry.digest is not None:
            remove_temp_files(path, entry.relpath)
        checkpoint(f"restore-{number}")
    _remove_created_dirs([(path, entry.relpath, entry.dirs, entry.emptied)
                          for entry, path in zip(journal.restore, paths) if entry.digest is None])
    state.write_manifest(manifest)
    checkpoint("restored-manifest-written")
    state.remove(state.journal_path)
    state.drop_objects(_referenced(manifest))
    return report


def commit(state: StateDir, operation: str, writes: list[Write], manifest: Manifest | None,
           previous: Manifest | None, compiling: CompileCheck | None = None) -> None:
    """Write everything, journaled; on failure undo it, leaving the files and PREVIOUS manifest.

    SIGINT and SIGTERM during the writes are failures like any other: the files written so far are
    put back before the process exits. A second signal during that rollback stops it and leaves the
    journal, which the next run finishes. COMPILING is apply's compile check still running (in a
    thread): it is finished once every new file is staged, before anything is renamed in place, and
    gives the new bytecode; a file that would not compile then fails the commit like any error.
    """
    if compiling is None:
        writes = _with_bytecode(writes)
    journal = Journal(operation=operation, restore=[w.journal_entry() for w in writes],
                      manifest=previous.to_json() if previous else None)
    with signals_as_errors():
        state.check_in_place()
        state.write_json(state.journal_path, journal.to_json())
        checkpoint("journal-written")
        begun: set[int] = set()
        try:
            _write_all(state, writes, manifest, begun, compiling)
        except Exception as error:
            _roll_back(state, journal, writes, previous, begun,
                       error if isinstance(error, PatcherError) else None)
            raise
    state.drop_objects(_referenced(manifest))


def _bytecode_flags(write: Write) -> int | None:
    """The invalidation mode of WRITE's new bytecode: its release's (for a file in directories apply
    makes, that of the directory they are made in); None: it gets none."""
    from ..fs import bytecode

    if write.data is None or write.chmod_only:
        return None
    made = sorted(made_dirs(write.dirs, write.emptied), key=len)
    beside = (import_root(write.path, write.relpath) / made[0]).parent if made else None
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
               begun: set[int], error: PatcherError | None) -> None:
    """Put back what was written (BEGUN: the indexes of the writes begun); ERROR (None for an
    unexpected exception) is told what happened."""
    try:
        _restore(state, journal, [w.path for w in writes], previous, begun)
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


def _write_all(state: StateDir, writes: list[Write], manifest: Manifest | None, begun: set[int],
               compiling: CompileCheck | None = None) -> None:
    """Every file, then the manifest. New contents are first staged in temp files beside their
    targets and fsynced together (one journal commit, not one per file); then each is renamed in
    place, its stale bytecode removed and fresh bytecode written; every directory touched is
    fsynced once before the manifest says the files are in place. Every file and directory is
    reached from its import root by descriptor, never by path (fsops). BEGUN collects the index of
    each write as it begins, for the rollback."""
    from ..fs import bytecode

    staged: dict[int, StagedFile] = {}
    try:
        for index, write in enumerate(writes):
            if write.data is not None and not write.chmod_only:
                staged[index] = stage(write.path, write.relpath, write.data, write.mode,
                                      made_dirs(write.dirs, write.emptied))
        fsync_staged(list(staged.values()))
        if compiling is not None:
            code = compiling.finish(manifest)
            writes = [replace(w, code=code[w.path]) if w.path in code else w for w in writes]
        touched: set[tuple[Path, str]] = set()
        compiled: list[tuple[Path, str]] = []
        for number, write in enumerate(writes, start=1):
            flags = _bytecode_flags(write)
            root, directory = import_root(write.path, write.relpath), _parent_dir(write.relpath)
            begun.add(number - 1)
            if write.data is None:
                remove(write.path, write.relpath, sync_dir=False)
            elif write.chmod_only:
                chmod_target(write.path, write.relpath, write.mode)
            else:
                install(staged.pop(number - 1), sync_dir=False, drop_bytecode=True)
            touched |= {(root, directory), (root, "/".join(filter(None, [directory, "__pycache__"])))}
            touched |= {(root, _parent_dir(d)) for d in [*write.dirs, *write.emptied]}
            if flags is not None:
                compiled += filter(None, [bytecode.write(write.path, write.relpath, write.data, write.code, flags,
                                                         create_cache=bool(write.dirs or write.emptied))])
            checkpoint(f"file-{number}-written")
        touched |= _remove_created_dirs([(w.path, w.relpath, w.dirs, w.emptied) for w in writes if w.data is None])
    finally:
        discard(staged.values())
    fsync_entries(compiled)
    sync_directories(touched)
    state.check_in_place()
    state.write_manifest(manifest)
    checkpoint("manifest-written")
    state.remove(state.journal_path)
    checkpoint("journal-removed")
