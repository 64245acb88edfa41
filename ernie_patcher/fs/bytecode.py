"""Fresh bytecode for the files apply and revert write, as pip compiles at install.

A patched module must not be compiled again by every process (a read-only container image would
do it on each start), and a stale .pyc must never run. After a .py file is written its old
bytecode is removed (fsops.remove_bytecode) and, where the release has bytecode for this
interpreter, a new .pyc is written in the invalidation mode that bytecode used (PEP 552:
timestamp, checked-hash or unchecked-hash). Hand-written header (four fields) because py_compile
reads the source again, compiles it again and writes through a path that follows symlinks;
here the code object of apply's compile check is reused and the .pyc is written through an open
__pycache__ directory, no-follow and atomically (safeio). Revert and rollback remove every .pyc
of the files they put back (fsops.remove_bytecode), the ones written here included.
"""
from __future__ import annotations

import marshal
import os
import stat
from importlib.util import MAGIC_NUMBER, cache_from_source, source_hash
from pathlib import Path

from ..errors import COMPILE_ERRORS, PatcherError
from .safeio import SafeDir, open_tree

HASH_BASED = 0b01
CHECK_SOURCE = 0b10
FLAGS = (0, HASH_BASED, HASH_BASED | CHECK_SOURCE)  # timestamp, unchecked-hash, checked-hash
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _header_flags(pyc: Path) -> int | None:
    """The invalidation flags of PYC when it is this interpreter's bytecode, else None."""
    try:
        fd = os.open(pyc, _READ)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        header = os.read(fd, 8)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(header) < 8 or header[:4] != MAGIC_NUMBER:
        return None
    flags = int.from_bytes(header[4:8], "little")
    return flags if flags in FLAGS else None


def release_flags(path: Path, beside: Path | None = None) -> int | None:
    """How the release's bytecode of PATH (else of a module beside it, or in directory BESIDE: the
    one apply made PATH's new directories in) is invalidated for this interpreter; None when there
    is none for it (no __pycache__, a symlinked one, another Python)."""
    if path.suffix != ".py":
        return None
    if beside is not None:
        path = beside / path.name
    try:
        own = Path(cache_from_source(str(path), optimization=""))
    except NotImplementedError:  # sys.implementation.cache_tag is None: no bytecode cache
        return None
    cache = own.parent
    if cache.is_symlink() or not cache.is_dir():
        return None
    flags = _header_flags(own)
    if flags is not None:
        return flags
    suffix = own.name[len(path.stem):]  # e.g. ".cpython-311.pyc"
    try:
        siblings = sorted(n for n in os.listdir(cache) if n.endswith(suffix) and ".opt-" not in n)
    except OSError:
        return None
    return next((f for f in (_header_flags(cache / n) for n in siblings[:8]) if f is not None), None)


def pyc_bytes(source: os.stat_result, data: bytes, code: bytes, flags: int) -> bytes:
    """The .pyc of CODE (marshalled) for source DATA just written (SOURCE: its lstat, whose mtime a
    timestamp .pyc records with the size)."""
    header = MAGIC_NUMBER + flags.to_bytes(4, "little")
    if flags & HASH_BASED:
        header += source_hash(data)
    else:
        header += (int(source.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
        header += (len(data) & 0xFFFFFFFF).to_bytes(4, "little")
    return header + code


def compile_source(data: bytes, path: Path) -> bytes:
    """What the import system compiles from DATA at PATH, marshalled: a code object of a large
    module takes a hundred times its marshalled size in memory, so it is never kept. Optimization
    0 whatever this interpreter's -O: the result goes in the plain .pyc, not an .opt-N one."""
    return marshal.dumps(compile(data, str(path), "exec", dont_inherit=True, optimize=0))


def write(path: Path, relpath: str, data: bytes, code: bytes | None, flags: int,
          create_cache: bool = False) -> tuple[Path, str] | None:
    """Write the .pyc of DATA (just written at package file PATH, RELPATH) in mode FLAGS; CODE
    (marshalled) None compiles DATA. Its directory is reached from the import root by descriptor
    (safeio.open_tree), its __pycache__ no-follow (made when CREATE_CACHE: a directory apply made).

    Bytecode only saves the interpreter work: a file that does not compile, an unsafe or
    unwritable __pycache__ leave none (the stale one is already removed). Returns the .pyc written
    as (import root, relpath); the caller fsyncs it (fsops.fsync_entries) and its directory
    (fsops.sync_directories) with the others."""
    from .fsops import import_root

    root = import_root(path, relpath)
    reldir, _, name = relpath.rpartition("/")
    pyc = Path(cache_from_source(str(path), optimization="")).name
    try:
        code = code if code is not None else compile_source(data, path)
        parent = open_tree(root, reldir)
        if parent is None:
            return None
        with parent:
            source = parent.lstat(name)
            if source is None or not stat.S_ISREG(source.st_mode):
                return None
            cache = SafeDir.open(parent.path / "__pycache__", create=create_cache, parent=parent)
            if cache is None:
                return None
            with cache:
                cache.write(pyc, pyc_bytes(source, data, code, flags), (source.st_mode | 0o200) & 0o666,
                            sync_dir=False, sync_file=False)
    except (*COMPILE_ERRORS, OSError, PatcherError):
        return None
    return root, "/".join(filter(None, [reldir, "__pycache__", pyc]))
