"""status before apply reuses probe results kept for the release's own files (probememo) and parses
a file again whenever it is not the release's, or the memo is damaged or unsafe."""
from __future__ import annotations

from pathlib import Path

import pytest

from ernie_patcher.core import probememo
from ernie_patcher.patchset import probes
from support.cli import DISPATCH, cli


@pytest.fixture
def parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the sources the probes parse; the memo in a fresh cache directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    sizes: list[int] = []
    real = probes._parse.__wrapped__

    def parse(source: bytes):
        sizes.append(len(source))
        return real(source)

    monkeypatch.setattr(probes, "_parse", parse)
    return sizes


def test_second_status_parses_nothing_and_reports_the_same(site: Path, parsed: list[int]):
    first = cli("status", "--site", site, "--json")
    assert parsed, "the first status parses the release's files"
    parsed.clear()
    second = cli("status", "--site", site, "--json")
    assert parsed == [] and (second.code, second.stdout) == (first.code, first.stdout)


def test_an_edited_file_is_parsed_again(site: Path, parsed: list[int]):
    cli("status", "--site", site)
    (site / DISPATCH).write_bytes((site / DISPATCH).read_bytes() + b"\n# edited\n")
    parsed.clear()
    cli("status", "--site", site)
    assert len((site / DISPATCH).read_bytes()) in parsed


@pytest.mark.parametrize("damage", ["garbage", "symlink"])
def test_a_damaged_or_unsafe_memo_is_ignored(site: Path, parsed: list[int], tmp_path: Path, damage: str):
    first = cli("status", "--site", site, "--json")
    memo = probememo.directory()
    if damage == "garbage":
        for kept in memo.iterdir():
            kept.write_text('{"x": {"passed": "yes"}, ')
    else:
        memo.rename(tmp_path / "elsewhere")
        memo.symlink_to(tmp_path / "elsewhere")
    parsed.clear()
    again = cli("status", "--site", site, "--json")
    notes = again.json().pop("notes")
    assert parsed and (again.code, {**again.json(), "notes": []}) == (first.code, first.json())
    if damage == "symlink":
        assert len(notes) == 1 and f"the probe memo in {memo} is not used: {memo} is a symlink" in notes[0], notes
    else:
        assert notes == []


def test_the_memo_goes_where_the_variable_says_or_nowhere(site: Path, parsed: list[int], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    chosen = tmp_path / "chosen"
    monkeypatch.setenv(probememo.CACHE_ENV, str(chosen))
    first = cli("status", "--site", site, "--json")
    assert any(chosen.iterdir()) and not (tmp_path / "cache").exists()
    monkeypatch.setenv(probememo.CACHE_ENV, "off")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        parsed.clear()
        again = cli("status", "--site", site, "--json")
        assert parsed, "with the memo off the probes parse the files, every time"
        assert (again.code, again.stdout) == (first.code, first.stdout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chosen", "site"], "a memo was written although it is off"
