"""No-follow, owner-checked I/O inside the state directory.

Hand-written because pathlib and shutil follow symlinks and the stdlib has no directory-handle
API that refuses them: every entry is reached through an open directory fd (`dir_fd=`) with
O_NOFOLLOW, checked with fstat (regular file or directory, owned by the running user or root)
before it is read, written or listed, so a planted symlink, FIFO or foreign file is refused
(exit 7, naming it) instead of followed, blocked on or trusted. `open_tree` walks the
directories of a package the same way (no owner check for directories that were there), for
the files apply writes in directories it creates.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Collection, Sequence
from pathlib import Path, PurePosixPath
from typing import TypeVar

from ..errors import ExitCode, PatcherError, environment_error

Item = TypeVar("Item")

TEMP_SUFFIX = ".ernie-tmp"
MAX_JSON = 16 << 20  # manifest and journal
MAX_OBJECT = 256 << 20  # a stored original: one source file of a package (or its RECORD)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
SYNC_THREADS = 8


def each_concurrently(function: Callable[[Item], object], items: Sequence[Item]) -> None:
    """FUNCTION on every item, several at a time in threads: an fsync waits for the disk with the
    GIL released, and concurrent fsyncs share the file system's journal commits (about a third of
    the time of one after another). The first error is raised once all have run."""
    if len(items) < 4:
        for item in items:
            function(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(SYNC_THREADS, len(items))) as pool:
        for _ in pool.map(function, items):
            pass


def unsafe(path: Path, why: str) -> PatcherError:
    return PatcherError(ExitCode.ENVIRONMENT, f"unsafe state {path}: {why}; refusing to use it",
                        hint=f"the state directory may hold only regular files and directories owned by you or "
                             f"root, no symlinks; inspect {path} and remove what ernie-patcher did not create")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "of an unknown type"


def check(path: Path, st: os.stat_result, want_dir: bool) -> None:
    """Refuse PATH unless it is a directory (WANT_DIR) or a regular file owned by us or root."""
    ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if not ok:
        wanted = "a directory" if want_dir else "a regular file"
        raise unsafe(path, f"it is {_kind(st.st_mode)}, not {wanted}")
    if st.st_uid not in (os.geteuid(), 0):
        raise unsafe(path, f"it is owned by uid {st.st_uid}, neither the user running ernie-patch "
                           f"(uid {os.geteuid()}) nor root")


def _open_error(path: Path, exc: OSError, action: str, found: os.stat_result | None = None) -> PatcherError:
    """The refusal for a failed no-follow open; FOUND (lstat) tells a symlink from another non-directory."""
    if exc.errno == errno.ELOOP or (found is not None and stat.S_ISLNK(found.st_mode)):
        return unsafe(path, "it is a symlink")
    if exc.errno == errno.ENOTDIR:
        kind = _kind(found.st_mode) if found is not None else "something else"
        return unsafe(path, f"it is {kind}, not a directory")
    return environment_error(action, path, exc)


def _lstat(name: str, where: dict) -> os.stat_result | None:
    try:
        return os.stat(name, follow_symlinks=False, **where)
    except OSError:
        return None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class SafeDir:
    """An open, checked directory of the state; its entries are reached by name, never through a symlink."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: Path, create: bool = False, parent: "SafeDir | None" = None) -> "SafeDir | None":
        """Directory PATH (relative to PARENT when given); None when absent and not CREATE."""
        name = path.name if parent else str(path)
        where = {"dir_fd": parent.fd} if parent else {}
        if create:
            try:
                os.mkdir(name, 0o755, **where)
            except FileExistsError:
                pass
            except OSError as exc:
                raise environment_error("create directory", path, exc) from None
        try:
            fd = os.open(name, _DIR_FLAGS, **where)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _open_error(path, exc, "open directory", _lstat(name, where)) from None
        try:
            check(path, os.fstat(fd), want_dir=True)
        except PatcherError:
            _close(fd)
            raise
        return cls(path, fd)

    def __enter__(self) -> "SafeDir":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            _close(self.fd)
            self.fd = -1

    def subdir(self, name: str, create: bool = False) -> "SafeDir | None":
        return SafeDir.open(self.path / name, create=create, parent=self)

    def lstat(self, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise environment_error("inspect", self.path / name, exc) from None

    def exists(self, name: str) -> bool:
        return self.lstat(name) is not None

    def read(self, name: str, cap: int) -> bytes | None:
        """The bytes of regular file NAME (at most CAP), None when absent; never blocks on a FIFO."""
        path = self.path / name
        found = self.lstat(name)
        if found is None:
            return None
        check(path, found, want_dir=False)
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _open_error(path, exc, "read") from None
        try:
            st = os.fstat(fd)
            check(path, st, want_dir=False)
            if st.st_size > cap:
                raise unsafe(path, f"it is {st.st_size} bytes, more than the {cap} a state file may have")
            return _read_all(fd, path, cap)
        finally:
            _close(fd)

    def write(self, name: str, data: bytes, mode: int, sync_dir: bool = True, sync_file: bool = True) -> None:
        """Replace NAME with DATA atomically: a new temp file (stage), fsync, rename.
        For a batch of writes the caller may fsync the files (fsync_entries) and this directory
        (sync) once afterwards instead (SYNC_FILE, SYNC_DIR false)."""
        temp = self.stage(name, data, mode, sync=sync_file)
        try:
            self.rename(temp, name)
            temp = ""
            if sync_dir:
                os.fsync(self.fd)
        except OSError as exc:
            raise environment_error("write", self.path / name, exc) from None
        finally:
            if temp:
                self.remove(temp, quiet=True)

    def stage(self, name: str, data: bytes, mode: int, sync: bool = False) -> str:
        """A new temp file beside NAME (O_EXCL, no-follow) holding DATA with MODE, fsynced when SYNC;
        its name, for rename."""
        temp = f".{name}.{os.urandom(4).hex()}{TEMP_SUFFIX}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                         dir_fd=self.fd)
        except OSError as exc:
            raise environment_error("write", self.path / name, exc) from None
        try:
            _write_all(fd, data)
            os.fchmod(fd, mode)
            if sync:
                os.fsync(fd)
        except OSError as exc:
            self.remove(temp, quiet=True, sync_dir=False)
            raise environment_error("write", self.path / name, exc) from None
        finally:
            _close(fd)
        return temp

    def rename(self, temp: str, name: str) -> None:
        """Rename entry TEMP over NAME, both in this directory (atomic)."""
        try:
            os.rename(temp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as exc:
            raise environment_error("write", self.path / name, exc) from None

    def fsync_entries(self, names: list[str]) -> None:
        """fsync the regular files NAMES of this directory (no-follow), concurrently."""
        each_concurrently(self._fsync_entry, names)

    def _fsync_entry(self, name: str) -> None:
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            raise _open_error(self.path / name, exc, "write") from None
        try:
            check(self.path / name, os.fstat(fd), want_dir=False)
            os.fsync(fd)
        except OSError as exc:
            raise environment_error("write", self.path / name, exc) from None
        finally:
            _close(fd)

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as exc:
            raise environment_error("write", self.path, exc) from None

    def remove(self, name: str, quiet: bool = False, sync_dir: bool = True) -> None:
        """Unlink NAME (a symlink is removed itself, never followed); without SYNC_DIR the caller
        fsyncs this directory (sync) once after a batch of removals."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return
        except OSError as exc:
            if not quiet:
                raise environment_error("remove", self.path / name, exc) from None
            return
        if not sync_dir:
            return
        try:
            os.fsync(self.fd)
        except OSError:
            pass

    def rmdir(self, name: str) -> None:
        try:
            os.rmdir(name, dir_fd=self.fd)
        except OSError:
            pass

    def names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.fd))
        except OSError as exc:
            raise environment_error("list", self.path, exc) from None

    def sweep_temp(self) -> None:
        """Remove temp files a killed write left here."""
        for name in self.names():
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                self.remove(name)

    def open_lock(self, name: str) -> int:
        """An fd on lock file NAME, created if missing; never a symlink, FIFO or foreign file."""
        path = self.path / name
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644,
                         dir_fd=self.fd)
        except OSError as exc:
            raise _open_error(path, exc, "create lock file") from None
        try:
            check(path, os.fstat(fd), want_dir=False)
        except PatcherError:
            _close(fd)
            raise
        return fd


def _not_a_directory(path: Path, found: os.stat_result | None) -> PatcherError:
    kind = _kind(found.st_mode) if found is not None else "something else"
    return PatcherError(ExitCode.ENVIRONMENT, f"refusing {path}: it is {kind}, not a directory",
                        hint="ernie-patch writes only through real directories inside the package; "
                             f"inspect {path} and remove what does not belong to the package")


def open_tree(root: Path, relpath: str, create: Collection[str] = ()) -> SafeDir | None:
    """The package directory ROOT/RELPATH, None when a component is absent (and not in CREATE).

    The module directory (RELPATH's first part, as discovery found it) is opened by path; every
    component below it relative to its parent's fd with O_NOFOLLOW|O_DIRECTORY, so a symlink or
    a non-directory planted anywhere below is refused, never followed. A component named in
    CREATE (relpaths under ROOT) is made when missing, with os.mkdir relative to that fd and the
    mode of its parent; one that is there must then be a directory of the user running
    ernie-patch (made earlier in this run), not one another user slipped in."""
    parts = PurePosixPath(relpath).parts
    try:
        fd = os.open(root / parts[0], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise environment_error("open directory", root / parts[0], exc) from None
    current = SafeDir(root / parts[0], fd)
    try:
        for depth in range(2, len(parts) + 1):
            current = _descend(current, root, "/".join(parts[:depth]), create)
            if current is None:
                return None
    except BaseException:
        if current is not None:
            current.close()
        raise
    return current


def _descend(parent: SafeDir, root: Path, relpath: str, create: Collection[str]) -> SafeDir | None:
    """Component RELPATH of PARENT opened (made first when in CREATE); PARENT is closed."""
    name, path = relpath.rsplit("/", 1)[-1], root / relpath
    with parent:
        mode = os.fstat(parent.fd).st_mode & 0o7777
        made = False
        if relpath in create:
            try:
                os.mkdir(name, mode & 0o777, dir_fd=parent.fd)
                made = True
            except FileExistsError:
                pass
            except OSError as exc:
                raise environment_error("create directory", path, exc) from None
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=parent.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _not_a_directory(path, _lstat(name, {"dir_fd": parent.fd})) from None
            raise environment_error("open directory", path, exc) from None
    opened = SafeDir(path, fd)
    try:
        found = os.fstat(fd)
        if relpath in create and found.st_uid != os.geteuid():
            raise PatcherError(ExitCode.ENVIRONMENT, f"refusing {path}: the directory appeared while writing, "
                               f"owned by uid {found.st_uid}, not by the user running ernie-patch",
                               hint=f"another process is changing the package; inspect {path}")
        if made:
            os.fchmod(fd, mode)
    except BaseException:
        opened.close()
        raise
    return opened


def _read_all(fd: int, path: Path, cap: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except OSError as exc:
            raise environment_error("read", path, exc) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cap:
            raise unsafe(path, f"it has more than the {cap} bytes a state file may have")
        chunks.append(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
