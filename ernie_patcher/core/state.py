"""What the tool keeps beside the environment: manifest, journal and the stored original bytes.

Directories apply creates (for a file of a patch in a subpackage the release does not have) are
recorded, not derived: each created file's record (and its journal entry) lists the directories
that were missing at planning time (`dirs`). Deriving them -- e.g. "a directory no RECORD row of
the release lies under" -- would take for the tool's own a directory that existed before apply
but that no RECORD lists: an empty or data directory, a namespace directory another
distribution's files share, any directory of an editable install (no RECORD). Revert would then
remove a directory the user had. Recorded directories are checked instead: each must lie below
the module directory and above its file, and none may hold a row of the release's RECORD
(originals.check_originals), so a forged manifest cannot name a release directory either; and
only an empty directory is ever removed. Manifest schema 2 adds `dirs`; schema 1 manifests (no
directory created) are still read, and an older tool refuses schema 2 by its number.

Directories a patch empties (every file in them deleted or renamed away) are removed by apply
and recorded likewise on each removed file's record (`emptied`: relpath -> mode), so revert, a
rollback or a recovery makes them again, with their mode, before the file is put back. A file
whose mode a patch changes (git's `old mode`/`new mode`, or a new executable file) records the
mode apply gave it (`after_mode`; `mode` stays the one to restore). Manifest schema 3 adds both,
journal schema 4 adds `emptied`; older ones are still read.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .. import __version__
from ..errors import ExitCode, PatcherError
from ..fs.fsops import sha256
from ..fs.safeio import MAX_JSON, MAX_OBJECT, SafeDir
from .manifestrules import TOOL, dirs_ok, emptied_ok, field_ok, manifest_problem

MANIFEST_SCHEMA = 3
JOURNAL_SCHEMA = 4
JOURNAL_READABLE = (2, 3, 4)  # 2: before `dirs`; 3: before `emptied`


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class FileRecord:
    """One file the tool changed. `before`/`after` are sha256 hex digests, None = absent.

    The file is found again through its package (`relpath` under the import root, or under the
    dist-info's parent for RECORD), never through `path`, which only says where it was at apply:
    an environment copied or moved elsewhere must never make revert write to the old place.
    """

    path: str
    package: str
    version: str
    relpath: str
    action: str
    before: str | None
    after: str | None
    mode: int
    patches: list[str] = field(default_factory=list)
    module: str = ""
    dirs: list[str] = field(default_factory=list)
    emptied: dict[str, int] = field(default_factory=dict)
    after_mode: int | None = None


def _fields_of(record: object) -> dict:
    """A record's fields for JSON: dataclasses.asdict deep-copies every list and dict (a second per
    1 600-file manifest); the encoder only reads them."""
    return dict(vars(record))


def import_name(package: str, module: str) -> str:
    """The import name of PACKAGE: MODULE as recorded, else the distribution name with '-' as '_'
    (manifests written before the module was recorded)."""
    return module or package.replace("-", "_")


@dataclass
class PatchRecord:
    package: str
    version: str
    patch_sha256: str
    files: list[str]
    offsets: list[int]
    applied_at: str
    probes: dict[str, dict] = field(default_factory=dict)


@dataclass
class Manifest:
    """What apply did. ANSWER is what `verify`/`status` report for the applied patches, recorded by
    apply (plan.answer) so the fast path (fastpath.py) can report without the series parser; it
    is used only while the series file and every digest are as recorded.

    SELECTED is what apply was asked for: None for the whole set, else the ids `apply --only`
    selected (with what they require), added up over applies, less what `revert --only` took out.
    verify, status and revert default to it. Older tools ignore the key (and check the whole set).
    """

    series: str
    patch_dir: str
    patches: dict[str, PatchRecord] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)
    tool_version: str = __version__
    updated: str = field(default_factory=now)
    answer: dict = field(default_factory=dict)
    selected: list[str] | None = None

    def to_json(self) -> dict:
        return {"schema": MANIFEST_SCHEMA, "tool": TOOL, "tool_version": self.tool_version,
                "updated": self.updated, "series": self.series, "patch_dir": self.patch_dir,
                "patches": {k: _fields_of(v) for k, v in self.patches.items()},
                "files": {k: _fields_of(v) for k, v in self.files.items()}, "answer": self.answer,
                "selected": self.selected}

    @classmethod
    def from_json(cls, data: object, where: Path) -> "Manifest":
        problem = manifest_problem(data)  # the fast path checks a manifest by the same rules
        if problem:
            raise corrupt(where, problem)
        assert isinstance(data, dict)
        return cls(series=str(data["series"]), patch_dir=str(data["patch_dir"]),
                   patches={k: PatchRecord(**v) for k, v in data["patches"].items()},
                   files={k: FileRecord(**v) for k, v in data["files"].items()},
                   tool_version=str(data["tool_version"]), updated=str(data["updated"]),
                   answer=data.get("answer") if isinstance(data.get("answer"), dict) else {},
                   selected=data.get("selected"))


@dataclass
class RestoreEntry:
    """Recovery puts DIGEST's stored bytes in one file (or removes it when DIGEST is None).

    The file is named like a manifest entry, by package and relpath, and found again in the
    environment the recovery runs on (never through an absolute path of the interrupted run: a
    copy of a half-patched environment must be recovered where it is). WRITTEN is what the
    interrupted run was putting there: any other content means the journal is not about this
    environment, and recovery refuses. DIRS are the directories (relpaths under the import root)
    apply created for the file: made again when the file is put back, removed when empty once it
    is removed. EMPTIED are the directories (relpath -> mode) the write removes once empty after
    removing the file, or makes (with that mode) before putting it back: made again with their mode
    when the file is put back, removed when empty once it is removed.
    """

    package: str
    module: str
    version: str
    relpath: str
    action: str
    digest: str | None
    written: str | None
    mode: int
    dirs: list[str] = field(default_factory=list)
    emptied: dict[str, int] = field(default_factory=dict)


@dataclass
class Journal:
    operation: str
    restore: list[RestoreEntry]
    manifest: dict | None
    started: str = field(default_factory=now)

    def to_json(self) -> dict:
        return {"schema": JOURNAL_SCHEMA, "tool": TOOL, "operation": self.operation,
                "started": self.started, "restore": [_fields_of(e) for e in self.restore],
                "manifest": self.manifest}

    @classmethod
    def from_json(cls, data: object, where: Path) -> "Journal":
        if not isinstance(data, dict) or data.get("tool") != TOOL or data.get("schema") not in JOURNAL_READABLE:
            raise corrupt(where, "not an ernie-patcher journal of a known schema")
        try:
            journal = cls(operation=str(data["operation"]), started=str(data["started"]),
                          restore=[RestoreEntry(**e) for e in data["restore"]], manifest=data["manifest"])
        except (KeyError, TypeError) as exc:
            raise corrupt(where, f"missing or malformed field ({exc})") from None
        if journal.manifest is not None and not isinstance(journal.manifest, dict):
            raise corrupt(where, "field 'manifest' is not an object")
        for entry in journal.restore:
            _check_fields(entry, where)
        return journal


def _check_fields(record: object, where: Path) -> None:
    """Refuse a record whose fields have the wrong types, so a damaged file cannot steer a write."""
    for item in fields(record):
        value = getattr(record, item.name)
        if not field_ok(item.name, item.type, value):
            raise corrupt(where, f"field {item.name!r} of {type(record).__name__} has a bad value {value!r:.60}")
    dirs = getattr(record, "dirs", [])
    if dirs and not dirs_ok(record.relpath, record.action, dirs):
        raise corrupt(where, f"field 'dirs' of {record.relpath} names directories that are not between "
                             f"its package module and the file: {dirs!r:.80}")
    emptied = getattr(record, "emptied", {})
    if emptied and not emptied_ok(record.relpath, record.action, list(emptied), _removes(record)):
        raise corrupt(where, f"field 'emptied' of {record.relpath} names directories that are not between "
                             f"its package module and the file, or the file is not one removed: {emptied!r:.80}")


def _removes(record: object) -> bool:
    """Whether the recorded change removes its file (a manifest record's `after`, a journal entry's
    digest or written bytes, is None)."""
    return (getattr(record, "after", "") is None or getattr(record, "digest", "") is None
            or getattr(record, "written", "") is None)


def corrupt(where: Path, reason: str) -> PatcherError:
    return PatcherError(ExitCode.ENVIRONMENT, f"corrupt state file {where}: {reason}",
                        hint=f"inspect it; if the environment is pristine (`ernie-patch status`), remove {where.parent}")


class StateDir:
    """STATE_DIR layout: manifest.json, journal.json, objects/<sha256>, overwritten/, lock.

    Every access goes through safeio: no part of the state is followed through a symlink, read if
    it is not a regular file or directory owned by the user running ernie-patch (or root), or read
    beyond a size cap.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest_path = root / "manifest.json"
        self.journal_path = root / "journal.json"
        self.objects = root / "objects"
        self.lock_path = root / "lock"
        self._held: SafeDir | None = None
        self.overwritten = root / "overwritten"

    def exists(self) -> bool:
        """Whether anything is at ROOT (a symlink too: it is refused when opened, never skipped)."""
        return os.path.lexists(self.root)

    def _open(self, create: bool = False) -> SafeDir | None:
        """The state directory, opened once per run and held: every later use goes through that
        descriptor, so a directory swapped in at its path meanwhile is never used (check_in_place
        refuses before the run commits to anything)."""
        if self._held is None:
            self._held = SafeDir.open(self.root, create=create)
            if self._held is None:
                return None
        return SafeDir(self.root, os.dup(self._held.fd))

    def _identity(self) -> tuple[int, int] | None:
        if self._held is None:
            return None
        found = os.fstat(self._held.fd)
        return found.st_dev, found.st_ino

    def pin(self, identity: tuple[int, int] | None) -> None:
        """The state directory of this run is the one its lock is in: another one is refused."""
        if identity is None:
            return
        self._open()
        if self._identity() != identity:
            raise self._moved()

    def check_in_place(self) -> None:
        """Refuse when the state directory this run holds is no longer the one at its path (moved away
        and replaced): a journal or manifest written there would never be found by the next run."""
        held = self._identity()
        try:
            found = os.stat(self.root, follow_symlinks=False)
        except OSError:
            found = None
        if held is not None and (found is None or (found.st_dev, found.st_ino) != held):
            raise self._moved()

    def _moved(self) -> PatcherError:
        return PatcherError(ExitCode.ENVIRONMENT, f"refusing {self.root}: it is another directory than the one "
                            "this run locked (moved or replaced meanwhile)",
                            hint=f"another process is changing {self.root.parent}; find out who can write it")

    def close(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def has_journal(self) -> bool:
        """Whether a journal is pending; an unsafe state directory is refused here already."""
        directory = self._open()
        if directory is None:
            return False
        with directory:
            return directory.exists(self.journal_path.name)

    def _load(self, path: Path) -> object | None:
        directory = self._open()
        if directory is None:
            return None
        with directory:
            data = directory.read(path.name, MAX_JSON)
        if data is None:
            return None
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise corrupt(path, f"not valid JSON ({type(exc).__name__}: {str(exc)[:80]})") from None

    def manifest(self) -> Manifest | None:
        data = self._load(self.manifest_path)
        return None if data is None else Manifest.from_json(data, self.manifest_path)

    def journal(self) -> Journal | None:
        data = self._load(self.journal_path)
        return None if data is None else Journal.from_json(data, self.journal_path)

    def write_json(self, path: Path, document: dict) -> None:
        with self._create() as directory:
            # One line, by json's C encoder: with indent it encodes in Python (~1 s for a 1 600-file manifest).
            directory.write(path.name, (json.dumps(document, sort_keys=True) + "\n").encode(), 0o644)

    def _create(self) -> SafeDir:
        directory = self._open(create=True)
        if directory is None:
            raise PatcherError(ExitCode.ENVIRONMENT, f"the state directory {self.root} vanished while in use")
        return directory

    @contextmanager
    def _subdir(self, name: str, create: bool = False) -> Iterator[SafeDir | None]:
        """The checked subdirectory NAME of the state; None when absent (never with CREATE)."""
        root = self._create() if create else self._open()
        if root is None:
            yield None
            return
        with root:
            sub = root.subdir(name, create=create)
            if sub is None and create:
                raise PatcherError(ExitCode.ENVIRONMENT, f"{self.root / name} vanished while in use")
            if sub is None:
                yield None
                return
            with sub:
                yield sub

    def remove(self, path: Path) -> None:
        directory = self._open()
        if directory is not None:
            with directory:
                directory.remove(path.name)

    def write_manifest(self, manifest: Manifest | None) -> None:
        if manifest is None or not manifest.patches:
            self.remove(self.manifest_path)
        else:
            manifest.updated = now()
            self.write_json(self.manifest_path, manifest.to_json())

    def store(self, data: bytes) -> str:
        """Keep DATA under its digest (once); return the digest."""
        return self.store_many([data])[0]

    def store_many(self, datas: list[bytes], modes: list[int] | None = None) -> list[str]:
        """Keep each of DATAS under its digest, each distinct one once, the directory fsynced once.
        MODES (those of the files the bytes are from) limit who may read each copy: a file only its
        owner may read is not stored readable by everyone."""
        digests = [sha256(data) for data in datas]
        with self._subdir(self.objects.name, create=True) as objects:
            written: dict[str, bool] = {}
            for index, (digest, data) in enumerate(zip(digests, datas)):
                if digest in written:
                    continue
                kept = objects.read(digest, MAX_OBJECT)
                written[digest] = kept is None or sha256(kept) != digest
                if written[digest]:
                    mode = 0o444 if modes is None else (modes[index] & 0o444) | 0o400
                    objects.write(digest, data, mode, sync_dir=False, sync_file=False)
            objects.fsync_entries([d for d, new in written.items() if new])
            objects.sync()
        return digests

    def stored_digest(self, digest: str) -> str | None:
        """The sha256 of the bytes stored under DIGEST; None when nothing is (verify: can revert run?)."""
        with self._subdir(self.objects.name) as objects:
            data = objects.read(digest, MAX_OBJECT) if objects is not None else None
        return None if data is None else sha256(data)

    def fetch(self, digest: str) -> bytes:
        """Stored bytes for DIGEST, checked; a missing or damaged object is a corrupt state."""
        path = self.objects / digest
        with self._subdir(self.objects.name) as objects:
            data = objects.read(digest, MAX_OBJECT) if objects is not None else None
        if data is None or sha256(data) != digest:
            raise corrupt(path, "stored original is missing or damaged")
        return data

    def drop_objects(self, keep: set[str]) -> None:
        """Remove every stored object but KEEP; the directory is fsynced once."""
        with self._subdir(self.objects.name) as objects:
            dropped = [n for n in (objects.names() if objects is not None else []) if n not in keep]
            for name in dropped:
                objects.remove(name, sync_dir=False)
            if dropped:
                objects.sync()

    def save_overwritten(self, path: Path, data: bytes) -> Path:
        """Keep a copy of bytes `revert --force` is about to overwrite, in OVERWRITTEN (the one place
        those copies go, kept after the rest of the state is gone); return where."""
        name = f"{sha256(data)[:16]}-{path.name}"
        with self._subdir(self.overwritten.name, create=True) as saved:
            saved.write(name, data, 0o600)  # someone's edits, of a file perhaps only they could read
        return self.overwritten / name

    def overwritten_names(self) -> list[str]:
        """The copies `revert --force` kept (names in OVERWRITTEN)."""
        with self._subdir(self.overwritten.name) as saved:
            return sorted(saved.names()) if saved is not None else []

    def remove_if_empty(self) -> None:
        """Once nothing is applied, remove the state: stored originals, lock file, empty directories,
        and the state directory itself unless it still holds copies `revert --force` kept."""
        root = self._open()
        if root is None:
            return
        with root:
            if any(root.exists(n) for n in (self.manifest_path.name, self.journal_path.name)):
                return
            self.drop_objects(set())
            root.sweep_temp()
            root.rmdir(self.objects.name)
            if root.exists(self.overwritten.name):
                return  # the lock stays with them: the directory is still in use
            root.remove(self.lock_path.name, quiet=True)
        self.close()
        try:
            os.rmdir(self.root)
        except OSError:
            pass
