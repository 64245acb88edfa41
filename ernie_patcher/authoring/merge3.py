"""A three-way merge of lines with diff3's rules (those of `git merge-file` and `git apply -3`).

Hand-written on difflib because ernie-patch's runtime dependencies are click, rich and
packaging only; the tests cross-check it against the `merge3` package on random inputs.

BASE is the common ancestor, OURS and THEIRS two descendants. The stretches of BASE that both
keep unchanged (the intersections of each side's matching blocks against BASE) synchronise the
three; between two of them a side that left BASE as it was takes the other side's change, two
sides that made the same change agree, and two different changes conflict. Changes that touch
(one side inserts where the other rewrites the next line, or both insert at one place) conflict
too: diff3 cannot tell in which order they belong.
"""
from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Sequence

UNCHANGED, OURS, THEIRS, SAME, CONFLICT = "unchanged", "ours", "theirs", "same", "conflict"


@dataclass(frozen=True)
class Region:
    """One stretch of the merge: KIND and the [start, end) line ranges it covers in each input."""

    kind: str
    base: tuple[int, int]
    ours: tuple[int, int]
    theirs: tuple[int, int]


@dataclass(frozen=True)
class Conflict:
    """A conflict as written to the merged text: its region and the line of its `<<<<<<<` marker
    (1-based) in that text."""

    region: Region
    line: int


@dataclass(frozen=True)
class Merged:
    """The merged lines (with conflict markers where the sides disagree) and the conflicts."""

    lines: list[str]
    conflicts: list[Conflict]

    @property
    def clean(self) -> bool:
        return not self.conflicts

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _matches(base: Sequence[str], other: Sequence[str]) -> list[tuple[int, int, int]]:
    """(base start, other start, length) of the blocks OTHER keeps from BASE; autojunk off, so a
    line common in a long file (a blank, a closing bracket) still anchors the alignment."""
    return [tuple(m) for m in SequenceMatcher(None, base, other, autojunk=False).get_matching_blocks()]


def sync_points(base: Sequence[str], ours: Sequence[str],
                theirs: Sequence[str]) -> list[tuple[int, int, int, int]]:
    """(base start, ours start, theirs start, length) of every stretch of BASE both sides keep, in
    order, ending with an empty stretch at the three ends."""
    ours_blocks, theirs_blocks = _matches(base, ours), _matches(base, theirs)
    points = []
    i = j = 0
    while i < len(ours_blocks) and j < len(theirs_blocks):
        o_base, o_at, o_len = ours_blocks[i]
        t_base, t_at, t_len = theirs_blocks[j]
        start, end = max(o_base, t_base), min(o_base + o_len, t_base + t_len)
        if start < end:
            points.append((start, o_at + start - o_base, t_at + start - t_base, end - start))
        if o_base + o_len < t_base + t_len:
            i += 1
        else:
            j += 1
    points.append((len(base), len(ours), len(theirs), 0))
    return points


def regions(base: Sequence[str], ours: Sequence[str], theirs: Sequence[str]) -> list[Region]:
    """The merge as regions, in order: unchanged stretches and, between them, what each side did."""
    found: list[Region] = []
    at_base = at_ours = at_theirs = 0
    for sync_base, sync_ours, sync_theirs, length in sync_points(base, ours, theirs):
        if sync_ours > at_ours or sync_theirs > at_theirs:
            spans = (at_base, sync_base), (at_ours, sync_ours), (at_theirs, sync_theirs)
            found.append(Region(_kind(base, ours, theirs, *spans), *spans))
        if length:
            found.append(Region(UNCHANGED, (sync_base, sync_base + length), (sync_ours, sync_ours + length),
                                (sync_theirs, sync_theirs + length)))
        at_base, at_ours, at_theirs = sync_base + length, sync_ours + length, sync_theirs + length
    return found


def _kind(base: Sequence[str], ours: Sequence[str], theirs: Sequence[str], base_span: tuple[int, int],
          ours_span: tuple[int, int], theirs_span: tuple[int, int]) -> str:
    """What happened between two sync points: one side changed it, both alike, or a conflict."""
    old = list(base[slice(*base_span)])
    mine, other = list(ours[slice(*ours_span)]), list(theirs[slice(*theirs_span)])
    if mine == other:
        return SAME
    if mine == old:
        return THEIRS
    if other == old:
        return OURS
    return CONFLICT


def _ended(lines: list[str]) -> list[str]:
    """LINES with a newline after the last one, so a marker after it starts a line of its own."""
    return lines[:-1] + [lines[-1] + "\n"] if lines and not lines[-1].endswith("\n") else lines


def merge(base: Sequence[str], ours: Sequence[str], theirs: Sequence[str],
          labels: tuple[str, str, str] = ("ours", "base", "theirs")) -> Merged:
    """Merge OURS and THEIRS (lines, ends kept) from BASE; a conflict is written diff3-style:
    `<<<<<<< LABELS[0]`, ours, `||||||| LABELS[1]`, base, `=======`, theirs, `>>>>>>> LABELS[2]`."""
    lines: list[str] = []
    conflicts: list[Conflict] = []
    for region in regions(base, ours, theirs):
        if region.kind in (UNCHANGED, OURS, SAME):
            lines.extend(ours[slice(*region.ours)])
        elif region.kind == THEIRS:
            lines.extend(theirs[slice(*region.theirs)])
        else:
            lines[:] = _ended(lines)
            conflicts.append(Conflict(region, len(lines) + 1))
            lines.append(f"<<<<<<< {labels[0]}\n")
            lines.extend(_ended(list(ours[slice(*region.ours)])))
            lines.append(f"||||||| {labels[1]}\n")
            lines.extend(_ended(list(base[slice(*region.base)])))
            lines.append("=======\n")
            lines.extend(_ended(list(theirs[slice(*region.theirs)])))
            lines.append(f">>>>>>> {labels[2]}\n")
    return Merged(lines, conflicts)
