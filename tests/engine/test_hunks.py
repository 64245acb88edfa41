"""The hand-written hunk applier: exact context, bounded offsets, reversibility, line endings."""
from __future__ import annotations

import difflib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ernie_patcher.patchset.diffparse import parse_patch
from ernie_patcher.patchset.hunks import HunkConflict, apply_hunks, split_lines


def _patch(old: list[str], new: list[str], n: int = 3):
    diff = "".join(difflib.unified_diff(old, new, "a/pkg/f.py", "b/pkg/f.py", n=n))
    return parse_patch(diff, "pkg", None, "test").files[0]


lines_strategy = st.lists(st.sampled_from(["a\n", "b\n", "c\n", "def f():\n", "    return 1\n", "\n", "x = 1\n"]),
                          min_size=0, max_size=40)


@st.composite
def file_and_edit(draw):
    old = draw(lines_strategy)
    new = list(old)
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        if op == "insert" or not new:
            new.insert(draw(st.integers(0, len(new))), draw(st.sampled_from(["NEW\n", "y = 2\n", "# c\n"])))
        elif op == "delete":
            del new[draw(st.integers(0, len(new) - 1))]
        else:
            new[draw(st.integers(0, len(new) - 1))] = draw(st.sampled_from(["R\n", "z = 3\n"]))
    return old, new


@settings(max_examples=300, deadline=None)
@given(file_and_edit())
def test_apply_then_revert_returns_the_original(case):
    old, new = case
    if old == new:
        return
    fp = _patch(old, new)
    patched, _ = apply_hunks("".join(old), fp.hunks)
    assert patched == "".join(new)
    restored, _ = apply_hunks(patched, fp.hunks, reverse=True)
    assert restored == "".join(old)


def _nearest_match(lines: list[str], block: tuple[str, ...], expected: int) -> int:
    """The match the applier must pick: nearest to EXPECTED, the earlier one on a tie."""
    found = [at for at in range(len(lines) - len(block) + 1) if tuple(lines[at:at + len(block)]) == block]
    return min(found, key=lambda at: (abs(at - expected), at))


@settings(max_examples=100, deadline=None)
@given(file_and_edit(), st.integers(1, 30))
def test_offset_is_found_and_reported(case, shift):
    """Shifted by SHIFT lines, the first hunk lands at the match nearest its header's line.

    That is offset SHIFT when its context occurs once; a file of repeated lines may hold a
    nearer copy, so exact text and offsets are asserted only when every hunk's context is unique.
    Later hunks are expected where the earlier ones landed, so their own offset is 0.
    """
    old, new = case
    assume(old and old != new)
    fp = _patch(old, new)
    shifted = [f"# header {i}\n" for i in range(shift)] + old
    patched, placements = apply_hunks("".join(shifted), fp.hunks)
    first = fp.hunks[0]
    expected = first.source_start - 1
    assert placements[0].offset == _nearest_match(shifted, first.old, expected) - expected
    unique = all(sum(tuple(shifted[at:at + len(h.old)]) == h.old for at in range(len(shifted))) == 1
                 for h in fp.hunks)
    if unique:
        assert patched == "".join(shifted[:shift] + new)
        assert [p.offset for p in placements] == [shift] + [0] * (len(placements) - 1), "later hunks carry the shift"


def test_conflict_names_the_hunk_and_line():
    old = [f"line {i}\n" for i in range(20)]
    new = list(old)
    new[10] = "changed\n"
    fp = _patch(old, new)
    damaged = list(old)
    damaged[9] = "someone else\n"
    with pytest.raises(HunkConflict) as caught:
        apply_hunks("".join(damaged), fp.hunks)
    assert caught.value.failure.index == 0
    assert "hunk #1" in str(caught.value)


def test_offset_search_is_bounded():
    old = [f"line {i}\n" for i in range(10)]
    new = old[:5] + ["inserted\n"] + old[5:]
    fp = _patch(old, new)
    far = [f"pad {i}\n" for i in range(50)] + old
    with pytest.raises(HunkConflict):
        apply_hunks("".join(far), fp.hunks, max_offset=10)
    assert apply_hunks("".join(far), fp.hunks, max_offset=60)[1][0].offset == 50


def test_crlf_file_keeps_its_line_endings():
    old = ["a\n", "b\n", "c\n"]
    fp = _patch(old, ["a\n", "b\n", "new\n", "c\n"])
    patched, _ = apply_hunks("a\r\nb\r\nc\r\n", fp.hunks)
    assert patched == "a\r\nb\r\nnew\r\nc\r\n"


def test_missing_trailing_newline_is_preserved():
    old = ["a\n", "b"]
    new = ["a\n", "x\n", "b"]
    diff = "".join(difflib.unified_diff(old, new, "a/pkg/f.py", "b/pkg/f.py"))
    diff = diff.replace("+x\n b", "+x\n b\n\\ No newline at end of file\n")
    fp = parse_patch(diff, "pkg", None, "test").files[0]
    patched, _ = apply_hunks("a\nb", fp.hunks)
    assert patched == "a\nx\nb"
    assert apply_hunks(patched, fp.hunks, reverse=True)[0] == "a\nb"


def test_split_lines_splits_on_newline_only():
    text = "a\x0cb\nc\u2028d\n"
    assert split_lines(text) == ["a\x0cb\n", "c\u2028d\n"]
    assert "".join(split_lines("x\ny")) == "x\ny"


@pytest.mark.parametrize("damaged_line", [7, 13], ids=["first-context", "last-context"])
def test_conflict_when_an_edge_context_line_differs(damaged_line: int):
    """Every context line counts, the edges too: a differing edge line is someone else's edit."""
    old = [f"line {i}\n" for i in range(20)]
    new = list(old)
    new[10] = "changed\n"
    fp = _patch(old, new)
    assert fp.hunks[0].old[0] == old[7] and fp.hunks[0].old[-1] == old[13]
    damaged = list(old)
    damaged[damaged_line] = "someone else\n"
    with pytest.raises(HunkConflict):
        apply_hunks("".join(damaged), fp.hunks)


def test_later_hunk_never_matches_before_the_previous_hunks_output():
    """A block repeated near the top must not catch the second hunk, though it is nearer."""
    block = ["r1\n", "r2\n", "r3\n", "target\n", "r4\n", "r5\n", "r6\n"]
    middle = [f"u{i}\n" for i in range(20)]
    old = ["head\n"] + block + middle + block
    new = ["head2\n"] + block + middle + block[:3] + ["T\n"] + block[4:]
    fp = _patch(old, new)
    assert len(fp.hunks) == 2
    shifted = [f"pad {i}\n" for i in range(30)]
    target = ["head\n"] + block + middle + shifted + block
    patched, placements = apply_hunks("".join(target), fp.hunks)
    assert patched == "".join(["head2\n"] + block + middle + shifted + new[-7:])
    assert [p.line for p in placements] == [1, 1 + 1 + 7 + 20 + 30]


def test_a_shift_found_by_the_first_hunk_is_carried_to_the_next():
    """With a header prepended, the first hunk lands SHIFT lines late; the second is then expected
    there too, so it reports offset 0 (as GNU patch does), not SHIFT again."""
    old = [f"line {i}\n" for i in range(40)]
    new = list(old)
    new[5] = "first\n"
    new[30] = "second\n"
    fp = _patch(old, new)
    assert len(fp.hunks) == 2
    header = [f"# header {i}\n" for i in range(12)]
    patched, placements = apply_hunks("".join(header + old), fp.hunks)
    assert patched == "".join(header + new)
    assert [p.offset for p in placements] == [12, 0]
