"""Apply hunks to text in memory, by exact context with a bounded offset search.

Hand-written because unidiff only parses diffs and GNU patch/git apply write to disk, fuzz,
or leave .orig/.rej files; this must be pure, exact and all-or-nothing so a plan can be built
for every file before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .diffparse import BinaryPatch, Hunk

MAX_OFFSET = 1000


@dataclass(frozen=True)
class HunkPlacement:
    """Where hunk INDEX matched: OFFSET lines away from where its header said (0 = exact)."""

    index: int
    line: int
    offset: int


@dataclass(frozen=True)
class HunkFailure:
    index: int
    expected_line: int
    reason: str


class HunkConflict(Exception):
    def __init__(self, failure: HunkFailure) -> None:
        super().__init__(failure.reason)
        self.failure = failure


def split_lines(text: str) -> list[str]:
    """Split on '\\n' only (str.splitlines also splits on \\f, \\x1c, U+2028 ...), keeping ends."""
    if not text:
        return []
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _uses_crlf(lines: Sequence[str]) -> bool:
    ended = [line for line in lines if line.endswith("\n")]
    return bool(ended) and all(line.endswith("\r\n") for line in ended)


def _to_crlf(lines: Sequence[str]) -> tuple[str, ...]:
    return tuple(line[:-1] + "\r\n" if line.endswith("\n") and not line.endswith("\r\n") else line
                 for line in lines)


def _matches(lines: Sequence[str], at: int, block: Sequence[str]) -> bool:
    if at < 0 or at + len(block) > len(lines):
        return False
    return all(lines[at + i] == expected for i, expected in enumerate(block))


def _candidates(expected: int, low: int, high: int, max_offset: int):
    """Positions from EXPECTED outwards (0, -1, +1, -2, ...), within [LOW, HIGH]."""
    for distance in range(max_offset + 1):
        for at in ((expected,) if distance == 0 else (expected - distance, expected + distance)):
            if low <= at <= high:
                yield at


def _locate(lines: list[str], old: Sequence[str], expected: int, low: int, max_offset: int) -> int | None:
    if not old:
        return expected if low <= expected <= len(lines) else None
    high = len(lines) - len(old)
    for at in _candidates(expected, low, high, max_offset):
        if _matches(lines, at, old):
            return at
    return None


def apply_hunks(text: str, hunks: Sequence[Hunk], *, reverse: bool = False,
                max_offset: int = MAX_OFFSET) -> tuple[str, list[HunkPlacement]]:
    """Return TEXT with HUNKS applied (or un-applied), and where each matched; raise HunkConflict.
    Each hunk's lines are made from the patch bytes here, one hunk at a time (diffparse.Hunk)."""
    lines = split_lines(text)
    crlf = _uses_crlf(lines)
    placements: list[HunkPlacement] = []
    delta = 0
    low = 0
    for index, hunk in enumerate(hunks):
        old, new = hunk.sides()
        source_start = hunk.source_start
        if reverse:
            old, new, source_start = new, old, hunk.target_start
        if crlf:
            old, new = _to_crlf(old), _to_crlf(new)
        start = source_start - 1 if old else source_start
        expected = max(start + delta, 0)
        at = _locate(lines, old, expected, low, max_offset)
        if at is None:
            reason = f"hunk #{index + 1} does not match at line {expected + 1} or within {max_offset} lines"
            raise HunkConflict(HunkFailure(index=index, expected_line=expected + 1, reason=reason))
        lines[at:at + len(old)] = list(new)
        placements.append(HunkPlacement(index=index, line=at + 1, offset=at - expected))
        delta += len(new) - len(old) + (at - expected)
        low = at + len(new)
    return "".join(lines), placements


def apply_binary(current: bytes | None, patch: BinaryPatch) -> bytes | None:
    """CURRENT (None: no file) with git binary PATCH applied, as git apply does it: the file must be
    the one the patch was made from (its git object id), and so must the result; raise HunkConflict.
    None: the patch deletes the file."""
    from .gitbinary import BinaryError, apply_delta, object_id

    length = len(patch.old_id)
    found = object_id(current, length) if current is not None else "0" * length
    if found != patch.old_id:
        raise _binary_conflict(f"the file is not the one the binary patch was made from (git id {found[:12]}, "
                               f"the patch expects {patch.old_id[:12]})")
    if patch.new_id == "0" * length:
        return None
    try:
        result = patch.payload if patch.method == "literal" else apply_delta(current or b"", patch.payload)
    except BinaryError as exc:
        raise _binary_conflict(str(exc)) from None
    made = object_id(result, length)
    if made != patch.new_id:
        raise _binary_conflict(f"the binary patch makes git id {made[:12]}, its index line says {patch.new_id[:12]}")
    return result


def _binary_conflict(reason: str) -> HunkConflict:
    return HunkConflict(HunkFailure(index=0, expected_line=1, reason=reason))
