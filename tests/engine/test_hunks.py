"""The hand-written hunk applier: exact context, bounded offsets, reversibility, line endings."""
from __future__ import annotations

import difflib

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ernie_patcher.diffparse import parse_patch
from ernie_patcher.hunks import HunkConflict, apply_hunks, split_lines


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


@settings(max_examples=100, deadline=None)
@given(file_and_edit(), st.integers(1, 30))
def test_offset_is_found_and_reported(case, shift):
    old, new = case
    assume(old and old != new)
    fp = _patch(old, new)
    header = [f"# header {i}\n" for i in range(shift)]
    patched, placements = apply_hunks("".join(header + old), fp.hunks)
    assert patched == "".join(header + new)
    assert placements[0].offset == shift


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
