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
"""
from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from .. import __version__
from ..errors import ExitCode, PatcherError
from ..fs.fsops import sha256
from ..fs.safeio import MAX_JSON, MAX_OBJECT, SafeDir

MANIFEST_SCHEMA = 2
MANIFEST_READABLE = (1, 2)  # 1: before `dirs`
JOURNAL_SCHEMA = 3
JOURNAL_READABLE = (2, 3)  # 2: before `dirs`
ACTIONS = ("create", "modify", "register")
TOOL = "ernie-patcher"


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
    is used only while the series file and every digest are as recorded."""

    series: str
    patch_dir: str
    patches: dict[str, PatchRecord] = field(default_factory=dict)
    files: dict[str, FileRecord] = field(default_factory=dict)
    tool_version: str = __version__
    updated: str = field(default_factory=now)
    answer: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"schema": MANIFEST_SCHEMA, "tool": TOOL, "tool_version": self.tool_version,
                "updated": self.updated, "series": self.series, "patch_dir": self.patch_dir,
                "patches": {k: asdict(v) for k, v in self.patches.items()},
                "files": {k: asdict(v) for k, v in self.files.items()}, "answer": self.answer}

    @classmethod
    def from_json(cls, data: object, where: Path) -> "Manifest":
        if not isinstance(data, dict) or data.get("tool") != TOOL:
            raise corrupt(where, "not an ernie-patcher manifest")
        if data.get("schema") not in MANIFEST_READABLE:
            readable = ", ".join(map(str, MANIFEST_READABLE))
            raise corrupt(where, f"manifest schema {data.get('schema')!r} is not one of {readable} "
                                 "(written by another ernie-patcher version?)")
        try:
            manifest = cls(series=str(data["series"]), patch_dir=str(data["patch_dir"]),
                           patches={k: PatchRecord(**v) for k, v in data["patches"].items()},
                           files={k: FileRecord(**v) for k, v in data["files"].items()},
                           tool_version=str(data["tool_version"]), updated=str(data["updated"]),
                           answer=data.get("answer") if isinstance(data.get("answer"), dict) else {})
        except (KeyError, TypeError, AttributeError) as exc:
            raise corrupt(where, f"missing or malformed field ({exc})") from None
        for record in [*manifest.patches.values(), *manifest.files.values()]:
            _check_fields(record, where)
        return manifest


@dataclass
class RestoreEntry:
    """Recovery puts DIGEST's stored bytes in one file (or removes it when DIGEST is None).

    The file is named like a manifest entry, by package and relpath, and found again in the
    environment the recovery runs on (never through an absolute path of the interrupted run: a
    copy of a half-patched environment must be recovered where it is). WRITTEN is what the
    interrupted run was putting there: any other content means the journal is not about this
    environment, and recovery refuses. DIRS are the directories (relpaths under the import root)
    apply created for the file: made again when the file is put back, removed when empty once it
    is removed.
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


@dataclass
class Journal:
    operation: str
    restore: list[RestoreEntry]
    manifest: dict | None
    started: str = field(default_factory=now)

    def to_json(self) -> dict:
        return {"schema": JOURNAL_SCHEMA, "tool": TOOL, "operation": self.operation,
                "started": self.started, "restore": [asdict(e) for e in self.restore],
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


_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def _field_ok(name: str, kind: object, value: object) -> bool:
    """Whether VALUE fits the annotation KIND; digests must be sha256 hex (they name files)."""
    kind = str(kind)
    if name in ("before", "after", "digest", "written"):
        return value is None or (isinstance(value, str) and bool(_DIGEST.match(value)))
    if name == "path":
        return isinstance(value, str) and value.startswith("/") and "\x00" not in value
    if name == "relpath":
        return (isinstance(value, str) and bool(value) and not value.startswith("/") and "\x00" not in value
                and ".." not in value.split("/"))
    if name == "action":
        return value in ACTIONS
    if name == "dirs":
        return isinstance(value, list) and all(_field_ok("relpath", str, v) for v in value)
    if name == "probes":
        return isinstance(value, dict) and all(_probe_memo_ok(k, v) for k, v in value.items())
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind.startswith("list["):
        item = int if kind == "list[int]" else str
        return isinstance(value, list) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
    return isinstance(value, str)


def _probe_memo_ok(key: object, memo: object) -> bool:
    return (isinstance(key, str) and bool(_DIGEST.match(key)) and isinstance(memo, dict)
            and set(memo) == {"file_sha256", "passed", "detail"}
            and (memo["file_sha256"] is None or bool(_DIGEST.match(str(memo["file_sha256"]))))
            and isinstance(memo["passed"], bool) and isinstance(memo["detail"], str))


def _check_fields(record: object, where: Path) -> None:
    """Refuse a record whose fields have the wrong types, so a damaged file cannot steer a write."""
    for item in fields(record):
        value = getattr(record, item.name)
        if not _field_ok(item.name, item.type, value):
            raise corrupt(where, f"field {item.name!r} of {type(record).__name__} has a bad value {value!r:.60}")
    dirs = getattr(record, "dirs", [])
    if dirs and not _dirs_ok(record.relpath, record.action, dirs):
        raise corrupt(where, f"field 'dirs' of {record.relpath} names directories that are not between "
                             f"its package module and the file: {dirs!r:.80}")


def _dirs_ok(relpath: str, action: str, dirs: list[str]) -> bool:
    """Directories apply created for a file it created: each below the module directory (the
    first part of RELPATH) and above the file, so revert can never remove anything else."""
    return action == "create" and all(len(d.split("/")) >= 2 and not {"", "."} & set(d.split("/"))
                                      and relpath.startswith(d + "/") for d in dirs)


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

    def exists(self) -> bool:
        """Whether anything is at ROOT (a symlink too: it is refused when opened, never skipped)."""
        return os.path.lexists(self.root)

    def _open(self, create: bool = False) -> SafeDir | None:
        return SafeDir.open(self.root, create=create)

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
            directory.write(path.name, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode(), 0o644)

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

    def store_many(self, datas: list[bytes]) -> list[str]:
        """Keep each of DATAS under its digest, each distinct one once, the directory fsynced once."""
        digests = [sha256(data) for data in datas]
        with self._subdir(self.objects.name, create=True) as objects:
            written: dict[str, bool] = {}
            for digest, data in zip(digests, datas):
                if digest in written:
                    continue
                kept = objects.read(digest, MAX_OBJECT)
                written[digest] = kept is None or sha256(kept) != digest
                if written[digest]:
                    objects.write(digest, data, 0o444, sync_dir=False, sync_file=False)
            objects.fsync_entries([d for d, new in written.items() if new])
            objects.sync()
        return digests

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
        """Keep a copy of bytes `revert --force` is about to overwrite; return where."""
        name = f"{sha256(data)[:16]}-{path.name}"
        with self._subdir("overwritten", create=True) as saved:
            saved.write(name, data, 0o644)
        return self.root / "overwritten" / name

    def remove_if_empty(self) -> None:
        """Remove the state directory once nothing is applied (lock file and empty dirs only)."""
        root = self._open()
        if root is None:
            return
        with root:
            if any(root.exists(n) for n in (self.manifest_path.name, self.journal_path.name, "overwritten")):
                return
            self.drop_objects(set())
            root.sweep_temp()
            root.rmdir(self.objects.name)
            root.remove(self.lock_path.name, quiet=True)
        try:
            os.rmdir(self.root)
        except OSError:
            pass
