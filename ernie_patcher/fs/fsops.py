"""File-system primitives: package files read, replaced (mode and owner kept) and removed through
directory descriptors, stale bytecode removal, locking; plain atomic writes outside packages."""
from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path, PurePosixPath

from ..errors import ExitCode, PatcherError, environment_error
from .safeio import (MAX_OBJECT, TEMP_SUFFIX, Create, SafeDir, Staged, check_file, each_concurrently, entered, forget,
                     open_tree, saw_file, wrote_file)

LOCK_ATTEMPTS = 5


def sha256(data: bytes) -> str:
    import hashlib  # OpenSSL's, fast on large files; the verify fast path uses the interpreter's own

    return hashlib.sha256(data).hexdigest()


def read_bytes(path: Path) -> bytes | None:
    """The bytes of a file outside any package (a patch set's, an authoring output), or None when it
    does not exist (also under a non-directory). Opened non-blocking and refused unless a regular
    file: a FIFO never blocks. Package files are read with read_target."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise PatcherError(ExitCode.ENVIRONMENT, f"cannot read {path}: {exc.strerror}") from None
    try:
        _check_regular(path, os.fstat(fd).st_mode)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as exc:
        raise PatcherError(ExitCode.ENVIRONMENT, f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _check_regular(path: Path, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise PatcherError(ExitCode.ENVIRONMENT, f"{path} is a directory, expected a file")
    if stat.S_ISLNK(mode):
        raise PatcherError(ExitCode.ENVIRONMENT, f"refusing {path}: it is a symlink",
                           hint="ernie-patch never follows a symlink in a package; reinstall the package")
    if not stat.S_ISREG(mode):
        raise PatcherError(ExitCode.ENVIRONMENT, f"{path} is not a regular file (a FIFO, socket or device)",
                           hint="someone replaced a package file; reinstall the package")


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace PATH (a file outside any package: a patch set's) with DATA, through a temp file in
    the same directory, fsynced, renamed; the mode (default: the replaced file's) is set on the
    temp file's descriptor. Package files go through stage and install."""
    import tempfile  # only when writing: status and verify start faster without it

    try:
        current = os.stat(path, follow_symlinks=False)
        mode = current.st_mode & 0o7777 if mode is None else mode
    except FileNotFoundError:
        mode = 0o644 if mode is None else mode
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(temp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _unlink(temp)
        raise environment_error("write", path, exc) from None


def _unlink(name: str | Path) -> None:
    try:
        os.unlink(name)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_file(path: Path) -> None:
    """Remove a file outside any package (a patch set's); package files go through remove."""
    try:
        path.unlink()
        _fsync_dir(path.parent)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise environment_error("remove", path, exc) from None


# Package files: every one is named by PATH and its RELPATH under the import root; every operation
# reaches its directory from the import root by descriptor (safeio.open_tree: no symlink followed,
# inside a pinned run the directories planning saw), never by path.


def import_root(path: Path, relpath: str) -> Path:
    """The directory RELPATH is relative to, given the file's absolute PATH."""
    return path.parents[len(PurePosixPath(relpath).parts) - 1]


def _parent(relpath: str) -> tuple[str, str]:
    parent, _, name = relpath.rpartition("/")
    return parent, name


def _directory(path: Path, relpath: str, create: Create = (), lookup: bool = False) -> SafeDir | None:
    """The directory of package file PATH (RELPATH), opened from its import root (open_tree)."""
    return open_tree(import_root(path, relpath), _parent(relpath)[0], create, lookup)


def _vanished(path: Path) -> PatcherError:
    return PatcherError(ExitCode.ENVIRONMENT, f"cannot write {path}: its directory vanished while writing",
                        hint="another process is changing the package; run the command again")


def read_target(path: Path, relpath: str, cap: int = MAX_OBJECT) -> bytes | None:
    """The bytes of package file PATH (RELPATH), None when it or a directory of it is absent;
    refused when it is a symlink, a directory or anything but a regular file (never blocks)."""
    directory = _directory(path, relpath, lookup=True)
    if directory is None:
        return None
    name = _parent(relpath)[1]
    with directory:
        found = directory.lstat(name)
        saw_file(path, found)
        if found is None:
            return None
        _check_regular(path, found.st_mode)
        return directory.read(name, cap, owned=False)


def stat_target(path: Path, relpath: str) -> os.stat_result | None:
    """lstat of package file PATH (RELPATH), reached by descriptor; None when absent."""
    directory = _directory(path, relpath, lookup=True)
    if directory is None:
        return None
    with directory:
        found = directory.lstat(_parent(relpath)[1])
    saw_file(path, found)
    return found


def new_file_mode(path: Path, relpath: str) -> int:
    """The mode of a file a patch creates at PATH (RELPATH): that of a .py file of root or the user
    running ernie-patch in its directory, else in the nearest existing one above it (it may lie in
    directories apply creates), without set-id bits or group and world write; else 0o644. A file
    of another user sets nothing: a mode is never copied from what someone else controls."""
    reldir = _parent(relpath)[0]
    root = import_root(path, relpath)
    while True:
        directory = open_tree(root, reldir, lookup=True)
        if directory is not None:
            with directory:
                for name in directory.names():
                    found = directory.lstat(name) if name.endswith(".py") else None
                    if found is not None and stat.S_ISREG(found.st_mode) and found.st_uid in (0, os.geteuid()):
                        return found.st_mode & 0o755
            return 0o644
        if not reldir:
            return 0o644
        reldir = _parent(reldir)[0]


class StagedFile:
    """New contents of package file PATH (RELPATH), staged beside it for install. (A plain class, as
    safeio.Staged: the verify fast path imports this module.)"""

    __slots__ = ("path", "relpath", "staged")

    def __init__(self, path: Path, relpath: str, staged: Staged) -> None:
        self.path = path
        self.relpath = relpath
        self.staged = staged


def stage(path: Path, relpath: str, data: bytes, mode: int, create: Create = (),
          replace_any: bool = False) -> StagedFile:
    """A temp file beside package file PATH holding DATA with MODE and the owner of the file it will
    replace (not fsynced: fsync_staged does a batch at once). The directories of CREATE are made
    first (open_tree). A symlink or non-regular file now at PATH is refused, unless REPLACE_ANY
    (putting an original back: the rename replaces the entry itself, never what it leads to)."""
    directory = _directory(path, relpath, create)
    if directory is None:
        raise _vanished(path)
    name = _parent(relpath)[1]
    with directory:
        current = directory.lstat(name)
        if not replace_any:
            check_file(path, current)
        if current is not None and not (replace_any and not stat.S_ISREG(current.st_mode)):
            _check_regular(path, current.st_mode)
        regular = current is not None and stat.S_ISREG(current.st_mode)
        owner = (current.st_uid, current.st_gid) if regular else None
        return StagedFile(path, relpath, directory.stage(name, data, mode, owner=owner))


def fsync_staged(files: Sequence[StagedFile]) -> None:
    """fsync each staged temp file, checked to be the one staged; concurrently (each_concurrently)."""
    each_concurrently(_fsync_staged, files)


def _fsync_staged(file: StagedFile) -> None:
    directory = _directory(file.path, file.relpath)
    if directory is None:
        raise _vanished(file.path)
    with directory:
        directory.fsync_staged(file.staged, _parent(file.relpath)[1])


def install(file: StagedFile, sync_dir: bool = True, drop_bytecode: bool = False) -> None:
    """Rename the staged temp file over its target (atomic), through its directory entered again by
    descriptor: a directory swapped since planning is refused, never written through. DROP_BYTECODE:
    then remove the target's stale bytecode through the same directory fd (as remove_bytecode)."""
    directory = _directory(file.path, file.relpath)
    if directory is None:
        raise _vanished(file.path)
    with directory:
        directory.rename(file.staged, _parent(file.relpath)[1])
        wrote_file(file.path, file.staged.identity)
        if drop_bytecode:
            _remove_bytecode_in(directory, _parent(file.relpath)[1])
        if sync_dir:
            directory.sync()


def discard(files: Iterable[StagedFile]) -> None:
    """Remove staged temp files that will not be installed (reached no-follow; a gone directory holds none)."""
    for file in files:
        try:
            directory = _directory(file.path, file.relpath)
        except PatcherError:
            continue
        if directory is not None:
            with directory:
                directory.remove(file.staged.name, quiet=True, sync_dir=False)


def put(path: Path, relpath: str, data: bytes, mode: int, create: Create = (),
        replace_any: bool = False) -> None:
    """Replace package file PATH (RELPATH) with DATA atomically: stage, fsync, install (see stage)."""
    file = stage(path, relpath, data, mode, create, replace_any)
    try:
        fsync_staged([file])
        install(file)
    except BaseException:
        discard([file])
        raise


def chmod_target(path: Path, relpath: str, mode: int) -> None:
    """Give package file PATH (RELPATH) MODE through its own fd, its directory reached by descriptor
    (a patch's `old mode`/`new mode`; a symlink or non-regular file there is refused)."""
    directory = _directory(path, relpath)
    if directory is None:
        raise _vanished(path)
    with directory:
        directory.chmod(_parent(relpath)[1], mode)


def entries(root: Path, relpath: str) -> dict[str, os.stat_result] | None:
    """The entries of package directory ROOT/RELPATH with their lstat, reached by descriptor; None
    when it is absent."""
    directory = open_tree(root, relpath, lookup=True)
    if directory is None:
        return None
    with directory:
        found = {name: directory.lstat(name) for name in directory.names()}
    return {name: st for name, st in found.items() if st is not None}


def remove(path: Path, relpath: str, undo: bool = False, sync_dir: bool = True) -> bool:
    """Remove package file PATH (RELPATH), its bytecode and the temp files a killed write left beside
    it; True when the file was there. A directory that is gone holds nothing of ernie-patch's. One
    that is now a symlink, no directory or another directory than planned means what apply wrote
    was moved: the run refuses (PatcherError) and nothing is removed through it; a rollback or
    recovery then keeps its journal, and the run after the directory is back finishes it. An UNDO
    (rollback, recovery) of a file in a directory this run never entered -- one that was not there
    when it planned -- has nothing to remove: the write that would have made it never got there."""
    try:
        directory = _directory(path, relpath)
    except PatcherError:
        if undo and not entered(path.parent):
            return False
        raise
    if directory is None:
        return False
    name = _parent(relpath)[1]
    with directory:
        found = directory.exists(name)
        changed = bool(_remove_temp_in(directory, name)) or found
        if found:
            directory.remove(name, sync_dir=False)
        changed = _remove_bytecode_in(directory, name) or changed
        if sync_dir and changed:
            directory.sync()
    return found


def remove_bytecode(path: Path, relpath: str) -> bool:
    """Delete the cached bytecode of package file PATH (RELPATH), every interpreter tag and
    optimisation level, so no interpreter runs the old code (unchecked-hash .pyc too); True when
    there was some. A __pycache__ that is a symlink leads out of the package: never followed."""
    directory = _directory(path, relpath)
    if directory is None:
        return False
    with directory:
        return _remove_bytecode_in(directory, _parent(relpath)[1])


def remove_temp_files(path: Path, relpath: str) -> list[Path]:
    """Delete the temp files a killed write of package file PATH left beside it; return them."""
    directory = _directory(path, relpath)
    if directory is None:
        return []
    with directory:
        return _remove_temp_in(directory, _parent(relpath)[1])


def _remove_temp_in(directory: SafeDir, name: str) -> list[Path]:
    left = [entry for entry in directory.names() if entry.startswith(f".{name}.") and entry.endswith(TEMP_SUFFIX)]
    for entry in left:
        directory.remove(entry, sync_dir=False)
    return [directory.path / entry for entry in left]


def sync_directories(directories: Iterable[tuple[Path, str]]) -> None:
    """fsync each package directory (import root, relpath) once, reached by descriptor, making the
    renames and unlinks of a batch of writes durable; concurrently (each_concurrently)."""
    each_concurrently(_sync_directory, sorted(set(directories)))


def _sync_directory(directory: tuple[Path, str]) -> None:
    try:
        opened = open_tree(*directory)
    except PatcherError:
        return  # replaced since: nothing of this run's is reachable there to make durable
    if opened is not None:
        with opened:
            opened.sync()


def fsync_entries(entries: Iterable[tuple[Path, str]]) -> None:
    """fsync each package file (import root, relpath) written through a SafeDir (bytecode), reached by
    descriptor; concurrently."""
    each_concurrently(_fsync_entry, sorted(set(entries)))


def _fsync_entry(entry: tuple[Path, str]) -> None:
    root, relpath = entry
    parent, name = _parent(relpath)
    directory = open_tree(root, parent)
    if directory is not None:
        with directory:
            directory.fsync_entries([name])


def _directories(dirs: list[str]) -> str:
    return f"director{'ies' if len(dirs) > 1 else 'y'} {', '.join(dirs)}"


def creates_dirs_detail(dirs: list[str]) -> str:
    """What a file to create in missing directories DIRS says before apply (status, --dry-run)."""
    return f"creates {_directories(dirs)}" if dirs else ""


def made_dirs_detail(dirs: list[str]) -> str:
    """The detail of an applied file for which apply created DIRS (the engine and the fast path alike)."""
    return f"apply created {_directories(dirs)}" if dirs else ""


def _remove_bytecode_in(directory: SafeDir, name: str) -> bool:
    """Unlink every .pyc of module NAME in DIRECTORY's __pycache__ (opened no-follow; whoever owns it:
    an unlink through its fd never follows anything); True when there was one."""
    if not name.endswith(".py"):
        return False
    try:
        cache = os.open("__pycache__", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=directory.fd)
    except OSError:
        return False
    removed = False
    try:
        for entry in os.listdir(cache):
            if entry.startswith(name[:-3] + ".") and entry.endswith(".pyc"):
                try:
                    os.unlink(entry, dir_fd=cache)
                    removed = True
                except FileNotFoundError:
                    pass
        if removed:
            os.fsync(cache)
    except OSError as exc:
        raise environment_error("remove", directory.path / "__pycache__", exc) from None
    finally:
        os.close(cache)
    return removed


def remove_empty_dirs(root: Path, relpaths: Iterable[str], anyone: Collection[str] = ()) -> list[Path]:
    """Remove each directory ROOT/RELPATH that is empty once an empty __pycache__ in it is removed,
    deepest first, through directories opened without following symlinks; return those removed.
    A directory still holding something, or replaced by a non-directory, is left; so is one another
    user owns, unless it is in ANYONE (one of the release's, which a patch emptied)."""
    removed: list[Path] = []
    relpaths = set(relpaths) | set(anyone)
    for relpath in sorted(set(relpaths), key=lambda r: (-r.count("/"), r)):
        parent_rel, name = _parent(relpath)
        try:
            parent = open_tree(root, parent_rel)
        except PatcherError:
            continue  # a parent made a symlink or a file: nothing below it is ours any more
        if parent is None:
            continue
        with parent:
            if _remove_empty(parent, name, relpath in anyone):
                removed.append(root / relpath)
                forget(root / relpath)
    return removed


def _remove_empty(parent: SafeDir, name: str, anyone: bool = False) -> bool:
    try:
        directory = SafeDir(parent.path / name, os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                                        | os.O_CLOEXEC, dir_fd=parent.fd))
    except OSError:
        return False
    with directory:
        if not anyone and os.fstat(directory.fd).st_uid != os.geteuid():
            return False  # made by another user since: not the one apply made
        try:
            os.rmdir("__pycache__", dir_fd=directory.fd)
        except OSError:
            pass
    try:
        os.rmdir(name, dir_fd=parent.fd)
    except OSError:
        return False
    parent.sync()
    return True


class Lock:
    """An exclusive (or shared) flock on STATE_DIR/lock; a second writer is refused, never queued."""

    def __init__(self, path: Path, exclusive: bool = True) -> None:
        self.path = path
        self.exclusive = exclusive
        self._fd: int | None = None
        self.directory: tuple[int, int] | None = None  # identity of the state directory locked in

    def __enter__(self) -> "Lock":
        for _ in range(LOCK_ATTEMPTS):
            if self._acquire():
                return self
        raise PatcherError(ExitCode.ENVIRONMENT, f"the lock file {self.path} keeps being removed by another run",
                           hint="wait for the other ernie-patch run to finish, then run the command again")

    def _acquire(self) -> bool:
        """Lock the file at PATH; False when another run removed it meanwhile (then try again).

        The state directory and the lock file are opened without following symlinks: a planted
        `lock -> /etc/passwd` must never be truncated."""
        if not self.exclusive and self._read_only():
            return True
        directory = SafeDir.open(self.path.parent, create=True)
        if directory is None:
            return False  # removed by a finishing run between mkdir and open: try again
        with directory:
            self._fd = directory.open_lock(self.path.name)
            found = os.fstat(directory.fd)
            self.directory = (found.st_dev, found.st_ino)
        flag = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._fd, flag | fcntl.LOCK_NB)
        except BlockingIOError:
            from .lockholder import holder_text

            holder = holder_text(self._fd)  # the process holding it now, not the last run the file names
            self._close()
            raise PatcherError(ExitCode.ENVIRONMENT, f"another ernie-patch run holds the lock {self.path} ({holder})",
                               hint="wait for it to finish, then run the command again") from None
        if not self._still_linked():
            self._close()
            return False
        if self.exclusive:
            try:
                if os.fstat(self._fd).st_mode & 0o077:
                    os.fchmod(self._fd, 0o600)  # nobody else may open it to flock it and lock every run out
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, f"pid {os.getpid()}\n".encode(), 0)
            except OSError:
                pass  # the pid is only for the message of a refused run; a full disk must not stop the lock
        return True

    def _read_only(self) -> bool:
        """A reader of a state directory it cannot write (a read-only image) needs no lock: no
        ernie-patch run can write there either. A symlinked state directory is not trusted here."""
        try:
            found = os.lstat(self.path.parent)
        except OSError:
            return False
        return stat.S_ISDIR(found.st_mode) and not os.access(self.path.parent, os.W_OK)

    def _still_linked(self) -> bool:
        """Whether PATH is still the file we locked (a finishing run may have removed it)."""
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(self._fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc_info: object) -> None:
        self._close()
