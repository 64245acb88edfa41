"""Probe results on a release's own files, kept per user, so `status` before apply need not parse
files it has seen.

A probe is a pure function of its definition and the file's bytes: a result kept under the
probe's key (probes.probe_key) and the file's sha256 is the result. Only results on files whose
digest is the one the release's RECORD lists, and on what apply plans from them, are kept, so
the memo holds nothing a user edits. The memo is in the user's cache directory ($XDG_CACHE_HOME,
else ~/.cache), or where ERNIE_PATCHER_PROBE_CACHE says (`off`: nowhere, e.g. in an image build).

It is reached by descriptor from that root (the home directory, $XDG_CACHE_HOME or the variable's
directory), every component opened with O_NOFOLLOW|O_DIRECTORY (created 0700 where missing, the
home directory never) and owned by the running user, as pip does under sudo: a root process never
follows a user's symlink or writes into a user's directory on the way. A refused directory is not
used -- the probes run from source -- and the command says so once (take_note). Its files are
named `probes-<sha256>.json`, never a bare digest, so a memo pointed at a state directory's objects
cannot pass for stored originals. Anything else wrong with it -- unwritable, damaged -- makes the
probes run from source, never fails the command.
"""
from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from ..errors import PatcherError
from ..fs.safeio import SafeDir

MAX_MEMO = 1 << 20
CACHE_ENV = "ERNIE_PATCHER_PROBE_CACHE"
PREFIX = "probes-"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_refused: list[str] = []  # why the memo was not used in this command, once (take_note)


class _Refused(Exception):
    """A directory on the way to the memo is a symlink, not a directory, or not the running user's."""


def _location() -> tuple[Path, tuple[str, ...], bool] | None:
    """(root, components below it, whether the root may be created); None when the memo is off."""
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen), (), True
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative value is to be ignored
        return Path(xdg), ("ernie-patcher", "probe-results"), True
    return Path(os.path.expanduser("~")), (".cache", "ernie-patcher", "probe-results"), False


def directory() -> Path | None:
    """Where the memo is; None when ERNIE_PATCHER_PROBE_CACHE is `off`."""
    location = _location()
    return None if location is None else location[0].joinpath(*location[1])


def file_name(file_digest: str) -> str:
    """The memo's file for the file with FILE_DIGEST: never a name a state directory's object has."""
    return f"{PREFIX}{file_digest}.json"


def _enter(path: Path, name: str, create: bool, parent: int | None) -> int | None:
    """An fd on directory NAME (in PARENT, else the path PATH), no symlink followed, owned by the
    running user; None when it is absent and not CREATE."""
    where = {"dir_fd": parent} if parent is not None else {}
    try:
        fd = os.open(name, _DIR_FLAGS, **where)
    except FileNotFoundError:
        if not create:
            return None
        try:
            os.mkdir(name, 0o700, **where)
        except FileExistsError:
            pass
        fd = os.open(name, _DIR_FLAGS, **where)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _Refused(f"{path} is a symlink or not a directory") from None
        raise
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise _Refused(f"{path} is owned by uid {st.st_uid}, not by the user running ernie-patch "
                       f"(uid {os.geteuid()})")
    return fd


def _open(create: bool) -> SafeDir | None:
    """The memo directory, opened as _enter does each component; None when off, absent (not
    CREATE) or refused (noted once)."""
    location = _location()
    if location is None:
        return None
    root, parts, root_creatable = location
    path, fd = root, None
    try:
        fd = _enter(root, str(root), create and root_creatable, None)
        for part in parts:
            if fd is None:
                return None
            path = path / part
            below = _enter(path, part, create, fd)
            os.close(fd)
            fd = below
    except _Refused as refusal:
        if fd is not None:
            os.close(fd)
        if not _refused:
            _refused.append(f"the probe memo in {directory()} is not used: {refusal}; the probes run from "
                            f"source (pip refuses such a cache the same way; set {CACHE_ENV} to a directory "
                            "of yours, or off)")
        return None
    except OSError:
        if fd is not None:
            os.close(fd)
        return None
    return SafeDir(path, fd) if fd is not None else None


def take_note() -> str | None:
    """Why the memo was not used since the last call (once per command), or None."""
    return _refused.pop() if _refused else None


def _valid(kept: object) -> bool:
    return (isinstance(kept, dict) and set(kept) == {"passed", "detail"} and isinstance(kept["passed"], bool)
            and isinstance(kept["detail"], str))


def recall(file_digest: str) -> dict[str, dict]:
    """Kept results for the file with FILE_DIGEST: probe key -> {"passed", "detail"}."""
    try:
        memo = _open(create=False)
        if memo is None:
            return {}
        with memo:
            data = memo.read(file_name(file_digest), MAX_MEMO)
        kept = json.loads(data) if data is not None else {}
    except (PatcherError, OSError, ValueError, RecursionError):
        return {}
    return {k: v for k, v in kept.items() if _valid(v)} if isinstance(kept, dict) else {}


def remember(file_digest: str, results: dict[str, dict]) -> None:
    """Keep RESULTS (probe key -> {"passed", "detail"}) for the file with FILE_DIGEST, beside the kept ones."""
    try:
        memo = _open(create=True)
        if memo is None:
            return
        with memo:
            kept = {**recall(file_digest), **results}
            memo.write(file_name(file_digest), json.dumps(kept, sort_keys=True).encode(), 0o600, sync_dir=False,
                       sync_file=False)
    except (PatcherError, OSError):
        pass


def probe_kept(probe, source: bytes):
    """PROBE on SOURCE (bytes the memo may hold results for): the kept result when there is one,
    else the probe run and its result kept."""
    from ..fs.fsops import sha256
    from ..patchset.probes import ProbeResult, probe_key, run_probe

    digest, key = sha256(source), probe_key(probe)
    kept = recall(digest).get(key)
    if kept is not None:
        return ProbeResult(probe, kept["passed"], kept["detail"])
    result = run_probe(probe, source)
    remember(digest, {key: {"passed": result.passed, "detail": result.detail}})
    return result
