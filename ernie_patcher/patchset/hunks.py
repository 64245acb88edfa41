"""Apply hunks to text in memory, by exact context with a bounded offset search.

Hand-written because unidiff only parses diffs and GNU patch/git apply write to disk, fuzz,
or leave .orig/.rej files; this must be pure, exact and all-or-nothing so a plan can be built
for every file before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .diffparse import Hunk

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


def _locate(lines: list[str], hunk: Hunk, expected: int, low: int, max_offset: int) -> int | None:
    if not hunk.old:
        return expected if low <= expected <= len(lines) else None
    high = len(lines) - len(hunk.old)
    for at in _candidates(expected, low, high, max_offset):
        if _matches(lines, at, hunk.old):
            return at
    return None


def apply_hunks(text: str, hunks: Sequence[Hunk], *, reverse: bool = False,
                max_offset: int = MAX_OFFSET) -> tuple[str, list[HunkPlacement]]:
    """Return TEXT with HUNKS applied (or un-applied), and where each matched; raise HunkConflict."""
    lines = split_lines(text)
    crlf = _uses_crlf(lines)
    placements: list[HunkPlacement] = []
    delta = 0
    low = 0
    for index, hunk in enumerate(hunks):
        if reverse:
            hunk = hunk.reversed()
        if crlf:
            hunk = Hunk(hunk.source_start, hunk.target_start, _to_crlf(hunk.old), _to_crlf(hunk.new))
        start = hunk.source_start - 1 if hunk.old else hunk.source_start
        expected = max(start + delta, 0)
        at = _locate(lines, hunk, expected, low, max_offset)
        if at is None:
            reason = f"hunk #{index + 1} does not match at line {expected + 1} or within {max_offset} lines"
            raise HunkConflict(HunkFailure(index=index, expected_line=expected + 1, reason=reason))
        lines[at:at + len(hunk.old)] = list(hunk.new)
        placements.append(HunkPlacement(index=index, line=at + 1, offset=at - expected))
        delta += len(hunk.new) - len(hunk.old) + (at - expected)
        low = at + len(hunk.new)
    return "".join(lines), placements
