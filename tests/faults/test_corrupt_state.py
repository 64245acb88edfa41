"""A corrupt, truncated or foreign manifest or journal, or a damaged stored original: exit 7,
naming the file, and nothing changed."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from faultkit import KILL_ENV, STATE, cli, fault_set, run, settled
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target

Damage = Callable[[bytes], bytes]


def _edit(change: Callable[[dict], None]) -> Damage:
    def damage(data: bytes) -> bytes:
        document = json.loads(data)
        change(document)
        return json.dumps(document).encode()
    return damage


def _first_file(document: dict) -> dict:
    return next(iter(document["files"].values()))


DAMAGE: dict[str, Damage] = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "not-utf8": lambda data: b"\xff\xfe" + data,
    "not-json": lambda data: b"manifest = 'toml?'\n",
    "json-list": lambda data: b"[1, 2, 3]\n",
    "foreign-tool": _edit(lambda d: d.update(tool="someone-else")),
    "future-schema": _edit(lambda d: d.update(schema=99)),
    "missing-files": _edit(lambda d: d.pop("files")),
    "files-a-list": _edit(lambda d: d.update(files=[])),
    "mode-a-string": _edit(lambda d: _first_file(d).update(mode="0644")),
    "digest-a-path": _edit(lambda d: _first_file(d).update(before="../../../../etc/passwd")),
    "relative-path": _edit(lambda d: _first_file(d).update(path="diffusers/models/attention_dispatch.py")),
    "relpath-escapes": _edit(lambda d: [f.update(relpath="../../../../tmp/ernie-escape")
                                        for f in d["files"].values() if f["action"] == "register"]),
    "patches-a-number": _edit(lambda d: _first_file(d).update(patches=7)),
}
COMMANDS = (("status", True), ("verify", True), ("apply", True), ("revert", False))


@pytest.fixture(scope="module")
def applied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One applied site for the module; each test damages a state file and puts it back."""
    root = tmp_path_factory.mktemp("corrupt")
    site = install_target(root / "site", DIFFUSERS, VLLM_OMNI)
    patches = fault_set(site, root / "set")
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    return site, patches


@contextmanager
def damaged(path: Path, damage: Damage) -> Iterator[Path]:
    good = path.read_bytes()
    path.write_bytes(damage(good))
    try:
        yield path
    finally:
        path.write_bytes(good)


@contextmanager
def interrupted_revert(site: Path, patches: Path) -> Iterator[Path]:
    """A revert killed after its second file, so a journal is pending; recovered afterwards."""
    assert run("revert", "--site", site, env={KILL_ENV: "file-2-written"}).code == -9
    journal = site / STATE / "journal.json"
    assert journal.exists()
    yield journal
    assert cli("verify", "--site", site, "--patches", patches).code == 0, "recovery did not restore the patches"


def _every_command_refuses(site: Path, patches: Path, damaged_file: Path) -> None:
    before = settled(site)
    for command, takes_patches in COMMANDS:
        extra = ["--patches", patches] if takes_patches else []
        result = cli(command, "--site", site, *extra)
        assert result.code == 7, (command, result.stdout, result.stderr)
        assert result.reason.startswith(f"error: corrupt state file {damaged_file}"), (command, result.reason)
    assert settled(site) == before, "a command changed something"


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_manifest_is_refused_by_every_command(applied: tuple[Path, Path], kind: str):
    site, patches = applied
    with damaged(site / STATE / "manifest.json", DAMAGE[kind]) as manifest:
        _every_command_refuses(site, patches, manifest)
    assert cli("verify", "--site", site, "--patches", patches).code == 0


JOURNAL_DAMAGE = ("truncated", "not-json", "foreign-tool", "future-schema")


@pytest.mark.parametrize("kind", JOURNAL_DAMAGE)
def test_damaged_journal_is_refused_and_files_left_as_they_are(applied: tuple[Path, Path], kind: str):
    site, patches = applied
    with interrupted_revert(site, patches) as journal, damaged(journal, DAMAGE[kind]):
        _every_command_refuses(site, patches, journal)


def test_journal_with_a_damaged_manifest_restores_nothing(applied: tuple[Path, Path]):
    """The journal is checked whole before recovery writes anything."""
    site, patches = applied

    def break_manifest(document: dict) -> None:
        document["manifest"]["files"] = "damaged"

    with interrupted_revert(site, patches) as journal, damaged(journal, _edit(break_manifest)):
        _every_command_refuses(site, patches, journal)


def test_damaged_stored_original_refuses_revert(applied: tuple[Path, Path]):
    site, patches = applied
    victim = sorted((site / STATE / "objects").iterdir())[-1]
    victim.chmod(0o644)
    with damaged(victim, lambda data: data + b"# tampered\n"):
        before = settled(site)
        result = cli("revert", "--site", site)
        assert result.code == 7 and f"corrupt state file {victim}" in result.reason
        assert "stored original is missing or damaged" in result.reason
        assert settled(site) == before
    assert cli("verify", "--site", site, "--patches", patches).code == 0
