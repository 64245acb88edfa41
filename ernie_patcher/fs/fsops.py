"""File-system primitives: atomic replace keeping mode and owner, stale bytecode removal, locking."""
from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Collection, Iterable
from pathlib import Path, PurePosixPath

from ..errors import ExitCode, PatcherError, environment_error
from .safeio import TEMP_SUFFIX, SafeDir, each_concurrently, open_tree

LOCK_ATTEMPTS = 5


def sha256(data: bytes) -> str:
    import hashlib  # OpenSSL's, fast on large files; the verify fast path uses the interpreter's own

    return hashlib.sha256(data).hexdigest()


def read_bytes(path: Path) -> bytes | None:
    """The file's bytes, or None when it does not exist (also under a non-directory). Opened
    non-blocking and refused unless a regular file: a FIFO planted at a target never blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise PatcherError(ExitCode.ENVIRONMENT, f"cannot read {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise PatcherError(ExitCode.ENVIRONMENT, f"{path} is a directory, expected a file")
        if not stat.S_ISREG(mode):
            raise PatcherError(ExitCode.ENVIRONMENT, f"{path} is not a regular file (a FIFO, socket or device)",
                               hint="someone replaced a package file; reinstall the package")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read()
    except OSError as exc:
        raise PatcherError(ExitCode.ENVIRONMENT, f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sync_dirs(directories: set[Path]) -> None:
    """fsync each directory once, making the renames and unlinks of a batch of writes durable."""
    each_concurrently(_fsync_dir, sorted(directories))


def atomic_write(path: Path, data: bytes, mode: int | None = None, owner: tuple[int, int] | None = None,
                 sync_dir: bool = True) -> None:
    """Replace PATH with DATA via a temp file in the same directory and rename, fsynced.

    MODE and OWNER default to those of the file being replaced, so a patched file keeps them.
    Without SYNC_DIR the caller fsyncs the directory (sync_dirs), once for a batch of writes.
    """
    install(stage(path, data, mode, owner), path, sync_dir)


def stage(path: Path, data: bytes, mode: int | None = None, owner: tuple[int, int] | None = None,
          sync: bool = True) -> str:
    """A temp file beside PATH holding DATA, with PATH's mode and owner (see atomic_write), fsynced
    unless SYNC is false (then the caller fsyncs it, fsync_files, before install renames it)."""
    import tempfile  # only when writing: status and verify start faster without it

    try:
        current = path.stat()
        mode = current.st_mode & 0o7777 if mode is None else mode
        owner = (current.st_uid, current.st_gid) if owner is None else owner
    except FileNotFoundError:
        mode = 0o644 if mode is None else mode
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        if owner is not None and hasattr(os, "chown"):
            try:
                os.chown(tmp_name, *owner)
            except PermissionError:
                pass
    except OSError as exc:
        discard([tmp_name] if tmp_name else [])
        raise environment_error("write", path, exc) from None
    return tmp_name


def install(tmp_name: str, path: Path, sync_dir: bool = True) -> None:
    """Rename the staged TMP_NAME over PATH (atomic); the directory fsynced unless SYNC_DIR is false."""
    try:
        os.replace(tmp_name, path)
        if sync_dir:
            _fsync_dir(path.parent)
    except OSError as exc:
        discard([tmp_name])
        raise environment_error("write", path, exc) from None


def discard(tmp_names: Iterable[str]) -> None:
    """Remove staged temp files that will not be installed."""
    for name in tmp_names:
        try:
            os.unlink(name)
        except OSError:
            pass


def fsync_files(names: Iterable[str | Path]) -> None:
    """fsync each file, opened again without following symlinks; concurrently (safeio.each_concurrently)."""
    each_concurrently(_fsync_file, list(names))


def _fsync_file(name: str | Path) -> None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise environment_error("write", Path(name), exc) from None
    try:
        os.fsync(fd)
    except OSError as exc:
        raise environment_error("write", Path(name), exc) from None
    finally:
        os.close(fd)


def remove_temp_files(path: Path) -> list[Path]:
    """Delete temp files a killed atomic_write(PATH) left beside PATH; return them."""
    import glob

    try:
        left = sorted(path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"))
    except OSError:
        return []
    for temp in left:
        remove_file(temp)
    return left


def remove_file(path: Path, sync_dir: bool = True) -> None:
    try:
        path.unlink()
        if sync_dir:
            _fsync_dir(path.parent)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise environment_error("remove", path, exc) from None


def stale_bytecode(path: Path) -> list[Path]:
    """Every __pycache__ entry of PATH (all interpreter tags and optimisation levels).

    A __pycache__ that is a symlink leads out of the package: it is never followed.
    """
    if path.suffix != ".py":
        return []
    cache = path.parent / "__pycache__"
    if cache.is_symlink():
        return []
    try:
        return sorted(p for p in cache.iterdir() if p.name.startswith(path.stem + ".") and p.suffix == ".pyc")
    except OSError:
        return []


def remove_bytecode(path: Path, sync_dir: bool = True) -> list[Path]:
    """Delete PATH's cached bytecode so no interpreter runs the old code (unchecked-hash .pyc too)."""
    removed = stale_bytecode(path)
    for pyc in removed:
        remove_file(pyc, sync_dir)
    return removed


def _directories(dirs: list[str]) -> str:
    return f"director{'ies' if len(dirs) > 1 else 'y'} {', '.join(dirs)}"


def creates_dirs_detail(dirs: list[str]) -> str:
    """What a file to create in missing directories DIRS says before apply (status, --dry-run)."""
    return f"creates {_directories(dirs)}" if dirs else ""


def made_dirs_detail(dirs: list[str]) -> str:
    """The detail of an applied file for which apply created DIRS (the engine and the fast path alike)."""
    return f"apply created {_directories(dirs)}" if dirs else ""


def import_root(path: Path, relpath: str) -> Path:
    """The directory RELPATH is relative to, given the file's absolute PATH."""
    return path.parents[len(PurePosixPath(relpath).parts) - 1]


def _parent(relpath: str) -> tuple[str, str]:
    parent, _, name = relpath.rpartition("/")
    return parent, name


def _open_parent(path: Path, relpath: str, create: Collection[str] = ()) -> SafeDir | None:
    parent, _ = _parent(relpath)
    return open_tree(import_root(path, relpath), parent, create)


def stage_below(path: Path, relpath: str, data: bytes, mode: int, create: Collection[str]) -> str:
    """As stage (not fsynced), for a file in directories apply creates: the directories of CREATE
    are made and every directory below the module is opened without following symlinks
    (safeio.open_tree), the temp file made through the last one. Returns the temp file's path."""
    directory = _open_parent(path, relpath, create)
    if directory is None:
        raise PatcherError(ExitCode.ENVIRONMENT, f"cannot write {path}: its directory vanished while writing")
    with directory:
        return str(directory.path / directory.stage(_parent(relpath)[1], data, mode))


def install_below(temp: str, path: Path, relpath: str) -> None:
    """As install, for a file staged by stage_below: renamed in place through its directory opened
    again without following symlinks, so a directory swapped meanwhile is refused, not written through."""
    directory = _open_parent(path, relpath)
    if directory is None:
        raise PatcherError(ExitCode.ENVIRONMENT, f"cannot write {path}: its directory vanished while writing")
    with directory:
        directory.rename(Path(temp).name, _parent(relpath)[1])


def remove_below(path: Path, relpath: str, undo: bool = False) -> bool:
    """Remove PATH (RELPATH), its bytecode and the temp files a killed write left beside it, reached
    through directories opened without following symlinks; True when the file was there. A
    directory that is gone holds nothing of ernie-patch's. One that is now a symlink or no
    directory means what apply wrote was moved: revert refuses (PatcherError), an UNDO of this
    run's writes (rollback, recovery) leaves it, as nothing of this run is reachable there;
    either way nothing is removed through it."""
    try:
        directory = _open_parent(path, relpath)
    except PatcherError:
        if undo:
            return False
        raise
    if directory is None:
        return False
    name = _parent(relpath)[1]
    with directory:
        found = directory.exists(name)
        for entry in directory.names():
            if entry.startswith(f".{name}.") and entry.endswith(TEMP_SUFFIX):
                directory.remove(entry, sync_dir=False)
        directory.remove(name, sync_dir=False)
        _remove_bytecode_in(directory, name)
        directory.sync()
    return found


def _remove_bytecode_in(directory: SafeDir, name: str) -> None:
    """Unlink every .pyc of module NAME in DIRECTORY's __pycache__ (opened no-follow; whoever owns it:
    an unlink through its fd never follows anything)."""
    if not name.endswith(".py"):
        return
    try:
        cache = os.open("__pycache__", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                        dir_fd=directory.fd)
    except OSError:
        return
    try:
        for entry in os.listdir(cache):
            if entry.startswith(name[:-3] + ".") and entry.endswith(".pyc"):
                try:
                    os.unlink(entry, dir_fd=cache)
                except FileNotFoundError:
                    pass
        os.fsync(cache)
    except OSError as exc:
        raise environment_error("remove", directory.path / "__pycache__", exc) from None
    finally:
        os.close(cache)


def remove_empty_dirs(root: Path, relpaths: Iterable[str]) -> list[Path]:
    """Remove each directory ROOT/RELPATH that is empty once an empty __pycache__ in it is removed,
    deepest first, through directories opened without following symlinks; return those removed.
    A directory still holding something, or replaced by a non-directory, is left."""
    removed: list[Path] = []
    for relpath in sorted(set(relpaths), key=lambda r: (-r.count("/"), r)):
        parent_rel, name = _parent(relpath)
        try:
            parent = open_tree(root, parent_rel)
        except PatcherError:
            continue  # a parent made a symlink or a file: nothing below it is ours any more
        if parent is None:
            continue
        with parent:
            if _remove_empty(parent, name):
                removed.append(root / relpath)
    return removed


def _remove_empty(parent: SafeDir, name: str) -> bool:
    try:
        directory = SafeDir(parent.path / name, os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                                        | os.O_CLOEXEC, dir_fd=parent.fd))
    except OSError:
        return False
    with directory:
        if os.fstat(directory.fd).st_uid != os.geteuid():
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
        flag = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._fd, flag | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "another process"
            self._close()
            raise PatcherError(ExitCode.ENVIRONMENT, f"another ernie-patch run holds the lock {self.path} ({holder})",
                               hint="wait for it to finish, then run the command again") from None
        if not self._still_linked():
            self._close()
            return False
        if self.exclusive:
            try:
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
