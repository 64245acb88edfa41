"""Directories another user controls are not used by a root ernie-patch: the probe memo's cache
directory (a symlinked ~/.cache or ~/.cache/ernie-patcher, one owned by another user) is not
used, with a note, nothing is written through it, and a site's state stays revertible; `selftest
--site` refuses a directory another user owns or may write (it would go ahead of the standard
library in a root process)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from faultkit import STATE, run
from support.tree import snapshot

STRANGER = 4242  # a uid that is neither root nor the user running the tests
NOTE = "the probe memo in "


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    return home


def _status(site: Path, home: Path, *args: str) -> tuple[int, dict]:
    result = run("status", "--site", site, "--json", *args,
                 env={"HOME": str(home), "XDG_CACHE_HOME": "", "ERNIE_PATCHER_PROBE_CACHE": ""})
    return result.code, json.loads(result.stdout)


def _memo_notes(document: dict) -> list[str]:
    return [note for note in document["notes"] if note.startswith(NOTE)]


def test_a_symlinked_cache_directory_is_not_followed(site: Path, tmp_path: Path):
    """~/.cache -> a directory of root's: nothing is created there; the command says so once."""
    home, elsewhere = _home(tmp_path), tmp_path / "elsewhere"
    elsewhere.mkdir()
    (home / ".cache").symlink_to(elsewhere)
    code, document = _status(site, home)
    assert code == 0
    assert list(elsewhere.iterdir()) == [], "files were created through the symlinked ~/.cache"
    notes = _memo_notes(document)
    assert len(notes) == 1 and f"{home / '.cache'} is a symlink" in notes[0], document["notes"]


def test_a_cache_symlinked_into_a_state_directory_leaves_it_revertible(site: Path, tmp_path: Path):
    """~/.cache/ernie-patcher -> a site's .ernie-patcher/objects: status of the patches not yet applied
    writes nothing there, and revert still restores the site."""
    pristine = snapshot(site)
    assert run("apply", "--site", site, "--only", "diffusers-rope").code == 0
    objects = site / STATE / "objects"
    stored = sorted(p.name for p in objects.iterdir())
    home = _home(tmp_path)
    (home / ".cache").mkdir()
    (home / ".cache" / "ernie-patcher").symlink_to(objects)
    code, document = _status(site, home)
    assert code == 0 and len(_memo_notes(document)) == 1, document["notes"]
    assert sorted(p.name for p in objects.iterdir()) == stored, "the memo wrote into the state's objects"
    reverted = run("revert", "--site", site)
    assert reverted.code == 0, reverted.stderr
    assert snapshot(site) == pristine


@pytest.mark.parametrize("foreign", ["home", ".cache", ".cache/ernie-patcher", ".cache/ernie-patcher/probe-results"])
def test_a_cache_directory_of_another_user_is_not_used(site: Path, tmp_path: Path, as_root: None, foreign: str):
    """As pip under sudo: a component owned by another user (the home directory itself, as with a
    HOME kept by sudo) is not used, nothing is written below it, and the command says so once."""
    home = _home(tmp_path)
    (home / ".cache" / "ernie-patcher" / "probe-results").mkdir(parents=True)
    owned = home if foreign == "home" else home / foreign
    os.chown(owned, STRANGER, STRANGER)
    before = snapshot(home)
    code, document = _status(site, home)
    assert code == 0
    assert snapshot(home) == before, "the memo wrote below another user's directory"
    notes = _memo_notes(document)
    assert len(notes) == 1 and f"{owned} is owned by uid {STRANGER}" in notes[0], document["notes"]


def test_an_owned_cache_is_used_without_a_note(site: Path, tmp_path: Path):
    home = _home(tmp_path)
    code, document = _status(site, home)
    assert code == 0 and _memo_notes(document) == []
    kept = sorted((home / ".cache" / "ernie-patcher" / "probe-results").iterdir())
    assert kept and all(p.name.startswith("probes-") and p.name.endswith(".json") for p in kept), kept
    assert (home / ".cache").stat().st_mode & 0o777 == 0o700


def _stand_in(tmp_path: Path) -> Path:
    """An interpreter answering a passing selftest document."""
    answer = tmp_path / "answer.json"
    answer.write_text(json.dumps({
        "schema": 1, "python": "/x/python", "python_version": "3.11.0", "error": None, "device": "cpu",
        "dtype": "bf16", "versions": {"torch": "2.13.0"}, "seconds": 1.0,
        "checks": [{"name": "rope", "status": "passed", "error": 0.0, "tolerance": 0.1, "unit": "abs",
                    "detail": "", "seconds": 0.1}]}))
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\ncat '{answer}'\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("setup,why", [
    ("owned by another user", f"is owned by uid {STRANGER}, neither you"),
    ("root's, writable by others", "is writable by others"),
    ("root's, writable by its group", "is writable by its group"),
    ("below a directory of another user", f"is owned by uid {STRANGER}, neither you"),
])
def test_selftest_site_another_user_can_write_is_refused(tmp_path: Path, as_root: None, setup: str, why: str):
    python = _stand_in(tmp_path)
    site = tmp_path / "outer" / "site"
    site.mkdir(parents=True, mode=0o755)
    (site / "torch.py").write_text("raise SystemExit('planted torch ran')\n")
    if setup == "owned by another user":
        os.chown(site, STRANGER, STRANGER)
    elif setup == "below a directory of another user":
        os.chown(site.parent, STRANGER, STRANGER)
    else:
        site.chmod(0o777 if "others" in setup else 0o775)
    result = run("selftest", "--python", python, "--site", site)
    lines = result.stderr.strip().splitlines()
    assert result.code == 7, result.stderr
    assert lines[0].startswith(f"error: refusing --site {site}: ") and why in lines[0], lines[0]


def test_selftest_site_of_the_running_user_is_used(tmp_path: Path):
    python = _stand_in(tmp_path)
    site = tmp_path / "site"
    site.mkdir(mode=0o755)
    result = run("selftest", "--python", python, "--site", site)
    assert result.code == 0, result.stderr
