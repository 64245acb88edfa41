"""No-follow, owner-checked I/O through directory descriptors: the state directory, and the package
directories apply and revert write in.

Hand-written because pathlib and shutil follow symlinks and the stdlib has no directory-handle
API that refuses them: every entry is reached through an open directory fd (`dir_fd=`) with
O_NOFOLLOW, checked with fstat (regular file or directory, owned by the running user or root)
before it is read, written or listed, so a planted symlink, FIFO or foreign file is refused
(exit 7, naming it) instead of followed, blocked on or trusted. `open_tree` walks the
directories of a package the same way from its import root (the module directory included, no
owner check for directories that were there); inside a `pinned()` run, the identity (device,
inode) each directory had when the run first entered it -- while planning -- must be the one it
has at every later entry, so a directory swapped meanwhile is refused, never written through.
Temp files are made with O_CREAT|O_EXCL|O_NOFOLLOW, get their mode and owner through their fd
(fchmod, fchown), and are renamed in place within their directory's fd; after the rename the
entry must be the file that was written, else the run refuses.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
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
FILE_MODE_BITS = 0o777  # never a set-id or sticky bit on a file ernie-patch writes

Identity = tuple[int, int]  # (st_dev, st_ino)
ABSENT: Identity = (-1, -1)  # a file a run found not there


class Pins:
    """What one run saw of the package tree: the identity each directory had when first entered and
    each file when first read (while planning), and the directories a user other than root (or the
    one running ernie-patch) can write."""

    def __init__(self) -> None:
        self.seen: dict[Path, Identity] = {}
        self.files: dict[Path, Identity] = {}
        self.user_writable: dict[Path, str] = {}

    def saw_file(self, path: Path, found: os.stat_result | None) -> None:
        """Pin file PATH as first read: its identity, or ABSENT."""
        if found is None:
            self.files.setdefault(path, ABSENT)
        elif stat.S_ISREG(found.st_mode):
            self.files.setdefault(path, (found.st_dev, found.st_ino))

    def wrote_file(self, path: Path, identity: Identity) -> None:
        self.files[path] = identity

    def check_file(self, path: Path, found: os.stat_result | None) -> None:
        """Refuse to replace PATH when it is not the file this run read while planning (removed or
        replaced since): what is written is decided from that file, mode and owner included."""
        pinned = self.files.get(path)
        now = ABSENT if found is None else (found.st_dev, found.st_ino)
        if pinned is not None and now != pinned:
            what = "removed" if found is None else "created" if pinned == ABSENT else "replaced"
            raise PatcherError(ExitCode.ENVIRONMENT, f"refusing {path}: it was {what} since this run planned",
                               hint=f"another process is changing the package; find out who can write "
                                    f"{path.parent} and run the command again once nothing else touches it")

    def enter(self, path: Path, found: os.stat_result) -> None:
        """Pin PATH's identity on first entry; refuse a later entry that finds another directory."""
        identity = (found.st_dev, found.st_ino)
        pinned = self.seen.setdefault(path, identity)
        if pinned != identity:
            raise PatcherError(ExitCode.ENVIRONMENT, f"refusing {path}: it is another directory than when this "
                               "run planned (replaced meanwhile)",
                               hint=f"another process is changing the package; find out who can write {path.parent} "
                                    "and run the command again once nothing else touches the environment")
        why = writable_by_others(found)
        if why:
            self.user_writable[path] = why


_PINS: list[Pins] = []


@contextmanager
def pinned() -> Iterator[Pins]:
    """A run whose package directories keep the identity they had when first entered (see Pins)."""
    pins = Pins()
    _PINS.append(pins)
    try:
        yield pins
    finally:
        _PINS.remove(pins)


def saw_file(path: Path, found: os.stat_result | None) -> None:
    for pins in _PINS:
        pins.saw_file(path, found)


def check_file(path: Path, found: os.stat_result | None) -> None:
    for pins in _PINS:
        pins.check_file(path, found)


def wrote_file(path: Path, identity: Identity) -> None:
    for pins in _PINS:
        pins.wrote_file(path, identity)


def forget(path: Path) -> None:
    """Directory PATH was removed by this run (a patch emptied it): a directory made there again by
    the same run (a rollback) is pinned afresh, PATH and everything below it."""
    below = f"{path}/"
    for pins in _PINS:
        for seen in [p for p in pins.seen if p == path or str(p).startswith(below)]:
            del pins.seen[seen]


def entered(path: Path) -> bool:
    """Whether the pinned run entered directory PATH before (it holds nothing of the run's otherwise)."""
    return any(path in pins.seen for pins in _PINS)


def note_insecure_path(path: Path) -> None:
    """Name, in the pins of the run, the first directory on the way to PATH (as given, symlinks
    followed the same way) through which another user could redirect it: one that user can write,
    unless it is sticky and the entry below it is root's or ours (sudo's secure-path rule)."""
    found = insecure_path(Path(os.path.abspath(path)))
    if found is not None:
        for pins in _PINS:
            pins.user_writable.setdefault(*found)


def insecure_path(path: Path, depth: int = 0) -> tuple[Path, str] | None:
    """The first directory on the way to absolute PATH another user can use to redirect it, and why."""
    current = Path(path.anchor)
    for name in path.parts[1:]:
        try:
            parent, entry = os.stat(current), os.lstat(current / name)
        except OSError:
            return None  # not there (yet): nothing to redirect through
        why = writable_by_others(parent)
        if why and not (parent.st_mode & stat.S_ISVTX and entry.st_uid in (0, os.geteuid())):
            return current, why
        if stat.S_ISLNK(entry.st_mode):
            if depth > 40:
                return current / name, "a chain of more than 40 symlinks"
            target = Path(os.path.normpath(current / os.readlink(current / name)))
            found = insecure_path(target, depth + 1)
            if found is not None:
                return found
            current = Path(os.path.realpath(current / name))
        else:
            current = current / name
    return None


def writable_by_others(found: os.stat_result) -> str:
    """Why a user other than root or the one running ernie-patch can change directory FOUND; '' if none can."""
    if found.st_uid not in (0, os.geteuid()):
        return f"owned by uid {found.st_uid}"
    if found.st_mode & stat.S_IWOTH:
        return "writable by every user"
    if found.st_mode & stat.S_IWGRP:
        return f"writable by group {found.st_gid}"
    return ""


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


def check(path: Path, st: os.stat_result, want_dir: bool, owned: bool = True) -> None:
    """Refuse PATH unless it is a directory (WANT_DIR) or a regular file, owned by us or root (OWNED)."""
    ok = stat.S_ISDIR(st.st_mode) if want_dir else stat.S_ISREG(st.st_mode)
    if not ok:
        wanted = "a directory" if want_dir else "a regular file"
        raise unsafe(path, f"it is {_kind(st.st_mode)}, not {wanted}")
    if owned and st.st_uid not in (os.geteuid(), 0):
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


class Staged:
    """A temp file written beside its target (its NAME in that directory) and the identity it was made
    with. (A plain class: dataclasses would cost the verify fast path, which imports this module.)"""

    __slots__ = ("name", "identity")

    def __init__(self, name: str, identity: Identity) -> None:
        self.name = name
        self.identity = identity


def _fchown(fd: int, owner: tuple[int, int]) -> None:
    """Give the open file OWNER's uid and gid, as far as permitted (a non-root run keeps its own)."""
    try:
        os.fchown(fd, *owner)
    except PermissionError:
        pass


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

    def read(self, name: str, cap: int, owned: bool = True) -> bytes | None:
        """The bytes of regular file NAME (at most CAP), None when absent; never blocks on a FIFO.
        OWNED: it must belong to the running user or root (state files; not a package's files)."""
        path = self.path / name
        found = self.lstat(name)
        if found is None:
            return None
        check(path, found, want_dir=False, owned=owned)
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _open_error(path, exc, "read") from None
        try:
            st = os.fstat(fd)
            check(path, st, want_dir=False, owned=owned)
            if st.st_size > cap:
                raise unsafe(path, f"it is {st.st_size} bytes, more than the {cap} ernie-patch reads of one file")
            return _read_all(fd, path, cap)
        finally:
            _close(fd)

    def write(self, name: str, data: bytes, mode: int, sync_dir: bool = True, sync_file: bool = True) -> None:
        """Replace NAME with DATA atomically: a new temp file (stage), fsync, rename.
        For a batch of writes the caller may fsync the files (fsync_entries) and this directory
        (sync) once afterwards instead (SYNC_FILE, SYNC_DIR false)."""
        staged = self.stage(name, data, mode, sync=sync_file)
        try:
            self.rename(staged, name)
            staged = None
            if sync_dir:
                os.fsync(self.fd)
        except OSError as exc:
            raise environment_error("write", self.path / name, exc) from None
        finally:
            if staged is not None:
                self.remove(staged.name, quiet=True)

    def stage(self, name: str, data: bytes, mode: int, sync: bool = False,
              owner: tuple[int, int] | None = None) -> "Staged":
        """A new temp file beside NAME (O_EXCL, no-follow) holding DATA, fsynced when SYNC, for rename.
        MODE (and OWNER, when given and permitted) are set through its fd, never by name: the name
        may already lead elsewhere."""
        temp = f".{name}.{os.urandom(4).hex()}{TEMP_SUFFIX}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o777,
                         dir_fd=self.fd)
        except OSError as exc:
            raise environment_error("write", self.path / name, exc) from None
        try:
            _write_all(fd, data)
            if owner is not None:
                _fchown(fd, owner)
            elif os.geteuid() == 0:
                mode &= 0o755  # a file root makes is root's: nobody else may write it
            os.fchmod(fd, mode & FILE_MODE_BITS)
            if sync:
                os.fsync(fd)
            found = os.fstat(fd)
        except OSError as exc:
            self.remove(temp, quiet=True, sync_dir=False)
            raise environment_error("write", self.path / name, exc) from None
        finally:
            _close(fd)
        return Staged(temp, (found.st_dev, found.st_ino))

    def rename(self, staged: "Staged", name: str) -> None:
        """Rename the staged temp file over NAME, both in this directory (atomic); then NAME must be
        the file that was staged: another put at the temp name meanwhile is refused, not left."""
        path = self.path / name
        try:
            os.rename(staged.name, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except OSError as exc:
            raise environment_error("write", path, exc) from None
        found = self.lstat(name)
        # the type too: a symlink made where the temp file was may reuse its freed inode number
        if found is None or not stat.S_ISREG(found.st_mode) or (found.st_dev, found.st_ino) != staged.identity:
            raise self._replaced(name)

    def _replaced(self, name: str) -> PatcherError:
        return PatcherError(ExitCode.ENVIRONMENT, f"refusing {self.path / name}: the file ernie-patch wrote was "
                            "replaced at its temp name before it was renamed in place",
                            hint=f"another process is writing in {self.path}; find out who can write it")

    def fsync_staged(self, staged: "Staged", name: str) -> None:
        """fsync the temp file staged for NAME, reached no-follow and checked to be the one staged."""
        try:
            fd = os.open(staged.name, _READ_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            raise self._replaced(name) from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise self._replaced(name) from None
            raise environment_error("write", self.path / name, exc) from None
        try:
            found = os.fstat(fd)
            if (found.st_dev, found.st_ino) != staged.identity:
                raise self._replaced(name)
            os.fsync(fd)
        except OSError as exc:
            raise environment_error("write", self.path / staged.name, exc) from None
        finally:
            _close(fd)

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

    def chmod(self, name: str, mode: int) -> None:
        """Set the mode of regular file NAME through its own fd (opened no-follow, non-blocking,
        checked to be a regular file), fsynced: a symlink, FIFO or directory there is refused."""
        path = self.path / name
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self.fd)
        except OSError as exc:
            raise _open_error(path, exc, "change the mode of", _lstat(name, {"dir_fd": self.fd})) from None
        try:
            check(path, os.fstat(fd), want_dir=False, owned=False)
            os.fchmod(fd, mode)
            os.fsync(fd)
        except OSError as exc:
            raise environment_error("change the mode of", path, exc) from None
        finally:
            _close(fd)

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
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600,
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


Create = Collection[str] | Mapping[str, "int | None"]


def open_tree(root: Path, relpath: str, create: Create = (), lookup: bool = False) -> SafeDir | None:
    """The package directory ROOT/RELPATH, None when a component is absent (and not in CREATE).

    ROOT (the import root, as discovery found it) is opened by path; every component below it --
    the module directory first -- relative to its parent's fd with O_NOFOLLOW|O_DIRECTORY, so a
    symlink or a non-directory planted anywhere is refused, never followed, and inside a
    `pinned()` run each must be the directory it was when the run first entered it. A component
    named in CREATE (relpaths under ROOT) is made when missing, with os.mkdir relative to that fd
    and the mode of its parent; one that is there must then be a directory of the user running
    ernie-patch (made earlier in this run), not one another user slipped in. CREATE may also map a
    relpath to the mode to make it with (a directory a patch emptied, made again to put its files
    back): one that is there then is the directory that was never removed, whoever owns it; None
    means as above. A LOOKUP (to read or
    stat a file) takes a component that is a regular file or other non-directory as absent; a
    symlink is refused all the same."""
    parts = PurePosixPath(relpath).parts if relpath else ()
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise environment_error("open directory", root, exc) from None
    current: SafeDir | None = SafeDir(root, fd)
    try:
        for pins in _PINS:
            pins.enter(root, os.fstat(fd))
        for depth in range(1, len(parts) + 1):
            current = _descend(current, root, "/".join(parts[:depth]), create, lookup)
            if current is None:
                return None
    except BaseException:
        if current is not None:
            current.close()
        raise
    return current


def _descend(parent: SafeDir, root: Path, relpath: str, create: Create, lookup: bool = False) -> SafeDir | None:
    """Component RELPATH of PARENT opened (made first when in CREATE); PARENT is closed."""
    name, path = relpath.rsplit("/", 1)[-1], root / relpath
    wanted = create.get(relpath) if isinstance(create, Mapping) else None
    with parent:
        mode = os.fstat(parent.fd).st_mode & 0o7777 if wanted is None else wanted
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
                found = _lstat(name, {"dir_fd": parent.fd})
                if lookup and found is not None and not stat.S_ISLNK(found.st_mode):
                    return None
                raise _not_a_directory(path, found) from None
            raise environment_error("open directory", path, exc) from None
    opened = SafeDir(path, fd)
    try:
        found = os.fstat(fd)
        if relpath in create and wanted is None and found.st_uid != os.geteuid():
            raise PatcherError(ExitCode.ENVIRONMENT, f"refusing {path}: the directory appeared while writing, "
                               f"owned by uid {found.st_uid}, not by the user running ernie-patch",
                               hint=f"another process is changing the package; inspect {path}")
        if made and found.st_uid == os.geteuid() and not os.listdir(fd):
            os.fchmod(fd, mode)  # the directory just made (not one swapped in meanwhile) gets its parent's mode
        for pins in _PINS:
            pins.enter(path, found)
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
            raise unsafe(path, f"it has more than the {cap} bytes ernie-patch reads of one file")
        chunks.append(chunk)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
