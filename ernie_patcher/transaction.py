"""All-or-nothing writes across files: a journal first, then atomic replaces, then the manifest.

A run that fails or is killed at any point leaves a journal naming the bytes every file had
before it started (kept in the object store); the failing run, or else the next run, puts them
back and restores the previous manifest before doing anything else: an interrupted operation is
undone, never half-done.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PatcherError
from .fsops import atomic_write, read_bytes, remove_bytecode, remove_file, remove_temp_files, sha256
from .state import Journal, Manifest, RestoreEntry, StateDir

KILL_ENV = "ERNIE_PATCHER_TEST_KILL_AT"
PAUSE_ENV = "ERNIE_PATCHER_TEST_PAUSE_AT"


def checkpoint(name: str) -> None:
    """Test hooks, used only by the test suite, at checkpoint NAME (journal-written,
    file-N-written, manifest-written, journal-removed; restore-N inside a recovery):
    ERNIE_PATCHER_TEST_KILL_AT=NAME SIGKILLs this process there, ERNIE_PATCHER_TEST_PAUSE_AT=NAME
    SIGSTOPs it there (holding the lock) until the test sends SIGCONT.
    """
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(PAUSE_ENV) == name:
        os.kill(os.getpid(), signal.SIGSTOP)


@dataclass(frozen=True)
class Write:
    """Put DATA at PATH (None: remove it); RESTORE is the stored digest of what PATH holds now."""

    path: Path
    data: bytes | None
    mode: int
    restore: str | None


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


def _referenced(manifest: Manifest | None) -> set[str]:
    if manifest is None:
        return set()
    return {f.before for f in manifest.files.values() if f.before}


def recover(state: StateDir) -> Recovery | None:
    """Finish or undo an interrupted run from its journal; None when there was nothing to do."""
    journal = state.journal()
    if journal is None:
        return None
    report = Recovery(operation=journal.operation, started=journal.started)
    manifest = Manifest.from_json(journal.manifest, state.journal_path) if journal.manifest else None
    for number, entry in enumerate(journal.restore, start=1):
        path = Path(entry.path)
        if _put(state, path, entry.digest, entry.mode):
            report.restored.append(entry.path)
        remove_bytecode(path)
        remove_temp_files(path)
        checkpoint(f"restore-{number}")
    state.write_manifest(manifest)
    remove_file(state.journal_path)
    state.drop_objects(_referenced(manifest))
    return report


def commit(state: StateDir, operation: str, writes: list[Write], manifest: Manifest | None,
           previous: Manifest | None) -> None:
    """Write everything, journaled; on failure undo it, leaving the files and PREVIOUS manifest."""
    journal = Journal(
        operation=operation,
        restore=[RestoreEntry(path=str(w.path), digest=w.restore, mode=w.mode) for w in writes],
        manifest=previous.to_json() if previous else None,
    )
    state.write_json(state.journal_path, journal.to_json())
    checkpoint("journal-written")
    try:
        _write_all(state, writes, manifest)
    except PatcherError as error:
        try:
            recover(state)
        except PatcherError as second:
            error.details.append(f"rollback incomplete ({second.reason}); the next run finishes it")
        else:
            error.details.append("nothing was changed: every file written so far was put back")
        raise
    state.drop_objects(_referenced(manifest))


def _write_all(state: StateDir, writes: list[Write], manifest: Manifest | None) -> None:
    for number, write in enumerate(writes, start=1):
        if write.data is None:
            remove_file(write.path)
        else:
            atomic_write(write.path, write.data, mode=write.mode)
        remove_bytecode(write.path)
        checkpoint(f"file-{number}-written")
    state.write_manifest(manifest)
    checkpoint("manifest-written")
    remove_file(state.journal_path)
    checkpoint("journal-removed")
