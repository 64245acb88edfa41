"""Probe results on a release's own files, kept per user, so `status` before apply need not parse
files it has seen.

A probe is a pure function of its definition and the file's bytes: a result kept under the
probe's key (probes.probe_key) and the file's sha256 is the result. Only results on files whose
digest is the one the release's RECORD lists, and on what apply plans from them, are kept, so
the memo holds nothing a user edits. The memo is in the user's cache directory ($XDG_CACHE_HOME,
else ~/.cache), or where ERNIE_PATCHER_PROBE_CACHE says (`off`: nowhere, e.g. in an image
build), reached through safeio (no symlink followed, owner checked, size capped); anything wrong
with it -- unwritable, unsafe, damaged -- makes the probes run from source, never fails the
command.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import PatcherError
from ..fs.safeio import SafeDir

MAX_MEMO = 1 << 20
CACHE_ENV = "ERNIE_PATCHER_PROBE_CACHE"


def directory() -> Path | None:
    """Where the memo is; None when ERNIE_PATCHER_PROBE_CACHE is `off`."""
    chosen = os.environ.get(CACHE_ENV, "").strip()
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ernie-patcher" / "probe-results"


def _valid(kept: object) -> bool:
    return (isinstance(kept, dict) and set(kept) == {"passed", "detail"} and isinstance(kept["passed"], bool)
            and isinstance(kept["detail"], str))


def recall(file_digest: str) -> dict[str, dict]:
    """Kept results for the file with FILE_DIGEST: probe key -> {"passed", "detail"}."""
    where = directory()
    if where is None:
        return {}
    try:
        memo = SafeDir.open(where)
        if memo is None:
            return {}
        with memo:
            data = memo.read(file_digest, MAX_MEMO)
        kept = json.loads(data) if data is not None else {}
    except (PatcherError, OSError, ValueError, RecursionError):
        return {}
    return {k: v for k, v in kept.items() if _valid(v)} if isinstance(kept, dict) else {}


def remember(file_digest: str, results: dict[str, dict]) -> None:
    """Keep RESULTS (probe key -> {"passed", "detail"}) for the file with FILE_DIGEST, beside the kept ones."""
    where = directory()
    if where is None:
        return
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        memo = SafeDir.open(where, create=True)
        if memo is None:
            return
        with memo:
            kept = {**recall(file_digest), **results}
            memo.write(file_digest, json.dumps(kept, sort_keys=True).encode(), 0o644, sync_dir=False,
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
