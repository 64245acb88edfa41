"""The hand-written three-way merge (authoring/merge3.py) against the merge3 package, the reference
implementation of diff3's rules, on random inputs; and the cases `port` depends on by hand."""
from __future__ import annotations

import difflib

import merge3 as reference
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_patcher.authoring.merge3 import CONFLICT, merge, regions

LINES = st.lists(st.sampled_from(["a\n", "b\n", "c\n", "d\n", "\n", "x = 1\n", ")\n"]), max_size=14)


class _Matcher(difflib.SequenceMatcher):
    """The reference aligned as ours is: autojunk off (merge3 uses difflib's default)."""

    def __init__(self, isjunk=None, a="", b="") -> None:
        super().__init__(isjunk, a, b, autojunk=False)


def _reference_outcome(base: list[str], ours: list[str], theirs: list[str]) -> list[tuple]:
    merged = reference.Merge3(base, ours, theirs, sequence_matcher=_Matcher)
    outcome = []
    for region in merged.merge_regions():
        kind = region[0]
        if kind == "unchanged":
            outcome.append(("take", tuple(base[region[1]:region[2]])))
        elif kind in ("a", "same"):
            outcome.append(("take", tuple(ours[region[1]:region[2]])))
        elif kind == "b":
            outcome.append(("take", tuple(theirs[region[1]:region[2]])))
        else:
            _, z0, z1, a0, a1, b0, b1 = region
            outcome.append(("conflict", tuple(ours[a0:a1]), tuple(base[z0:z1]), tuple(theirs[b0:b1])))
    return outcome


def _outcome(base: list[str], ours: list[str], theirs: list[str]) -> list[tuple]:
    outcome = []
    for region in regions(base, ours, theirs):
        if region.kind == CONFLICT:
            outcome.append(("conflict", tuple(ours[slice(*region.ours)]), tuple(base[slice(*region.base)]),
                            tuple(theirs[slice(*region.theirs)])))
        elif region.kind == "theirs":
            outcome.append(("take", tuple(theirs[slice(*region.theirs)])))
        else:
            outcome.append(("take", tuple(ours[slice(*region.ours)])))
    return outcome


@settings(max_examples=400, deadline=None)
@given(LINES, LINES, LINES)
def test_regions_agree_with_merge3(base: list[str], ours: list[str], theirs: list[str]):
    assert _outcome(base, ours, theirs) == _reference_outcome(base, ours, theirs)


@settings(max_examples=200, deadline=None)
@given(LINES, LINES)
def test_one_side_unchanged_takes_the_other(base: list[str], changed: list[str]):
    assert merge(base, changed, base).lines == changed
    assert merge(base, base, changed).lines == changed
    assert merge(base, changed, changed).lines == changed


def test_an_edit_merges_under_lines_inserted_above():
    base = [f"line {i}\n" for i in range(20)]
    ours = base[:10] + ["patched\n"] + base[11:]
    theirs = ["new 1\n", "new 2\n", "new 3\n"] + base
    merged = merge(base, ours, theirs)
    assert merged.clean
    assert merged.lines == theirs[:13] + ["patched\n"] + theirs[14:]


def test_insertions_at_one_place_conflict_with_both_sides_and_the_base_shown():
    base = ["import a\n", ")\n", "\n", "log = 1\n"]
    ours = base[:2] + ["import mine\n"] + base[2:]
    theirs = base[:2] + ["import theirs\n"] + base[2:]
    merged = merge(base, ours, theirs, ("patched", "old release", "new release"))
    assert not merged.clean and len(merged.conflicts) == 1
    assert merged.conflicts[0].line == 3 and merged.conflicts[0].region.base == (2, 2)
    assert merged.text == ("import a\n)\n<<<<<<< patched\nimport mine\n||||||| old release\n=======\n"
                           "import theirs\n>>>>>>> new release\n\nlog = 1\n")


def test_a_last_line_without_newline_keeps_markers_on_their_own_lines():
    merged = merge(["a\n", "b"], ["a\n", "mine"], ["a\n", "theirs"])
    assert merged.text == "a\n<<<<<<< ours\nmine\n||||||| base\nb\n=======\ntheirs\n>>>>>>> theirs\n"
