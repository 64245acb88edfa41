"""Attacks on the tool's own state, tried as an attacker would: symlinks, FIFOs, foreign owners,
oversized files, a journal carried to another environment, a forged manifest, and a failure that
used to leave a journal wedging every later command. Each ends with nothing outside the site
changed, nothing hung, a one-line reason and the documented exit code, and the site all pristine
or all patched."""
from __future__ import annotations

import hashlib
import json
import os
import py_compile
import subprocess
from pathlib import Path

import pytest

from faultkit import (CREATED, DISPATCH, KILL_ENV, OMNI_PIPELINE, STATE, TRANSFORMER, changed, cli, command, environ,
                      fault_set, run, settled, states, tree)
from support.tree import snapshot

HANG_LIMIT = 60  # seconds; a command reading a FIFO used to block forever


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A directory outside the site that no command may touch: files, a subdirectory, a 'lock'."""
    place = tmp_path / "victim"
    (place / "objects").mkdir(parents=True)
    (place / "precious.txt").write_text("do not delete\n")
    (place / "lock").write_text("someone's data\n")
    (place / "objects" / "keep.bin").write_bytes(b"\x00keep")
    return place


def _refused(result, path: Path, why: str) -> None:
    assert result.code == 7, (result.code, result.stdout, result.stderr)
    assert result.reason.startswith(f"error: unsafe state {path}: "), result.reason
    assert why in result.reason, result.reason


def _timed(*args: str | Path) -> subprocess.CompletedProcess:
    """ARGS as a process that must end within HANG_LIMIT (a hang fails the test, it does not hang it)."""
    return subprocess.run(command(*args), capture_output=True, text=True, env=environ(), timeout=HANG_LIMIT)


def test_symlinked_objects_dir_is_refused_and_its_target_untouched(site: Path, tmp_path: Path, victim: Path):
    patches = fault_set(site, tmp_path / "set")
    pristine, outside = tree(site), snapshot(victim)
    (site / STATE).mkdir()
    (site / STATE / "objects").symlink_to(victim)
    _refused(cli("apply", "--site", site, "--patches", patches), site / STATE / "objects", "it is a symlink")
    assert snapshot(victim) == outside, "apply changed files of the directory the objects symlink points to"
    assert tree(site) == pristine


@pytest.mark.parametrize("command_args", [("apply", True), ("revert", False), ("status", True), ("verify", True)],
                         ids=lambda c: c[0])
def test_symlinked_state_dir_is_refused_by_every_command(site: Path, tmp_path: Path, victim: Path, command_args):
    name, takes_patches = command_args
    patches = fault_set(site, tmp_path / "set")
    pristine, outside = tree(site), snapshot(victim)
    (site / STATE).symlink_to(victim)
    extra = ["--patches", patches] if takes_patches else []
    _refused(cli(name, "--site", site, *extra), site / STATE, "it is a symlink")
    assert snapshot(victim) == outside, f"{name} changed files where the symlinked state directory points"
    assert tree(site) == pristine


@pytest.mark.parametrize("name", ["apply", "status"])
def test_symlinked_lock_file_is_never_written(site: Path, tmp_path: Path, name: str):
    patches = fault_set(site, tmp_path / "set")
    target = tmp_path / "passwd"
    target.write_text("root:x:0:0::/root:/bin/sh\n")
    (site / STATE).mkdir()
    (site / STATE / "lock").symlink_to(target)
    pristine = tree(site)
    _refused(cli(name, "--site", site, "--patches", patches), site / STATE / "lock", "it is a symlink")
    assert target.read_text() == "root:x:0:0::/root:/bin/sh\n", "the lock symlink's target was overwritten"
    assert tree(site) == pristine


@pytest.fixture
def applied(site: Path, tmp_path: Path) -> tuple[Path, Path]:
    patches = fault_set(site, tmp_path / "set")
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    return site, patches


@pytest.mark.parametrize("name", ["manifest.json", "journal.json"])
def test_fifo_state_file_is_refused_without_blocking(applied: tuple[Path, Path], name: str):
    site, patches = applied
    patched = tree(site)
    fifo = site / STATE / name
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    for args in (("status", "--patches", patches), ("verify", "--patches", patches), ("revert",)):
        done = _timed(args[0], "--site", site, *args[1:])
        assert done.returncode == 7, (args, done.stdout, done.stderr)
        first = done.stderr.strip().splitlines()[0]
        assert first.startswith(f"error: unsafe state {fifo}: it is a FIFO, not a regular file"), first
    fifo.unlink()  # the snapshot below reads every file: a FIFO would block it
    assert tree(site) == patched


def test_oversized_manifest_is_refused(applied: tuple[Path, Path]):
    from ernie_patcher.fs.safeio import MAX_JSON

    site, patches = applied
    manifest = site / STATE / "manifest.json"
    good = manifest.read_bytes()
    with open(manifest, "r+b") as handle:
        handle.truncate(MAX_JSON + 1)
    try:
        _refused(cli("status", "--site", site, "--patches", patches), manifest, "more than")
    finally:
        manifest.write_bytes(good)
    assert cli("verify", "--site", site, "--patches", patches).code == 0


@pytest.mark.parametrize("part", ["manifest.json", "objects", "."])
def test_state_owned_by_another_user_is_refused(applied: tuple[Path, Path], part: str):
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    site, patches = applied
    path = (site / STATE / part) if part != "." else site / STATE
    patched = tree(site)
    stranger = 4242
    os.chown(path, stranger, stranger, follow_symlinks=False)
    before = settled(site)
    why = f"it is owned by uid {stranger}"
    _refused(cli("revert", "--site", site), path.resolve() if part == "." else path, why)
    _refused(cli("status", "--site", site, "--patches", patches), path, why)  # it checks the originals revert needs
    assert tree(site) == patched and settled(site) == before
    os.chown(path, 0, 0)
    assert cli("revert", "--site", site).code == 0


def test_journal_of_a_copied_environment_recovers_the_copy_not_the_original(site: Path, tmp_path: Path):
    """A killed apply, then `cp -a A B`: recovering B must write into B only."""
    patches = fault_set(site, tmp_path / "set")
    pristine = tree(site)
    assert run("apply", "--site", site, "--patches", patches, env={KILL_ENV: "file-3-written"}).code == -9
    half = snapshot(site)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(site), str(copy)], check=True)
    result = cli("status", "--site", copy, "--patches", patches)
    assert result.code == 0, result.stderr
    assert "recovered an interrupted apply" in result.stdout
    assert snapshot(site) == half, f"recovering the copy wrote into the original: {changed(half, snapshot(site))}"
    assert tree(copy) == pristine, changed(pristine, tree(copy))
    assert not (copy / STATE / "journal.json").exists()
    assert states(site, patches) == ["not-applied"] * 3  # the original is recovered by its own next run
    assert tree(site) == pristine


def test_journal_not_matching_the_environment_is_refused(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    assert run("apply", "--site", site, "--patches", patches, env={KILL_ENV: "file-3-written"}).code == -9
    stranger = site / DISPATCH
    stranger.write_bytes(stranger.read_bytes() + b"# another environment's file\n")
    before = settled(site)
    result = cli("status", "--site", site, "--patches", patches)
    assert result.code == 7, result.stderr
    assert result.reason.startswith(f"error: pending journal {site / STATE / 'journal.json'} does not match this "
                                    f"environment: {stranger} holds"), result.reason
    assert settled(site) == before, "a refused recovery wrote something"


def _forge(site: Path, change) -> None:
    manifest = site / STATE / "manifest.json"
    document = json.loads(manifest.read_bytes())
    change(document)
    manifest.write_text(json.dumps(document))


def _store(site: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (site / STATE / "objects" / digest).write_bytes(data)
    return digest


def _other_bytes_for_dispatch(site: Path) -> str:
    digest = _store(site, b"import os\nEVIL = os.getcwd()\n")

    def change(document: dict) -> None:
        document["files"][DISPATCH]["before"] = digest
    _forge(site, change)
    return DISPATCH


def _dispatch_entry_copied_onto(site: Path, victim: str, **overrides: object) -> str:
    """Add a manifest entry for VICTIM made from dispatch's (what VICTIM holds now as 'after')."""
    entry = json.loads((site / STATE / "manifest.json").read_bytes())["files"][DISPATCH]
    current = hashlib.sha256((site / victim).read_bytes()).hexdigest()

    def change(document: dict) -> None:
        document["files"][victim] = {**entry, "relpath": victim, "path": str(site / victim), "after": current,
                                     **overrides}
    _forge(site, change)
    return victim


def _repointed_relpath(site: Path) -> str:
    return _dispatch_entry_copied_onto(site, "diffusers/__init__.py")


def _created_relpath_onto_a_shipped_file(site: Path) -> str:
    return _dispatch_entry_copied_onto(site, "diffusers/__init__.py", action="create", before=None)


def _release_directory_as_created(site: Path) -> str:
    """The created file's entry claims apply made its directory, which the release ships files in."""
    directory = CREATED.rsplit("/", 1)[0]

    def change(document: dict) -> None:
        document["files"][CREATED]["dirs"] = [directory]
    _forge(site, change)
    return directory


FORGERIES = {"object-with-other-bytes": _other_bytes_for_dispatch, "relpath-re-pointed": _repointed_relpath,
             "created-onto-shipped-file": _created_relpath_onto_a_shipped_file,
             "release-directory-as-created": _release_directory_as_created}


@pytest.mark.parametrize("kind", sorted(FORGERIES))
def test_forged_manifest_fails_verify_and_revert_refuses_it(applied: tuple[Path, Path], kind: str):
    site, patches = applied
    relpath = FORGERIES[kind](site)
    before = settled(site)
    manifest = site / STATE / "manifest.json"
    for args in (("verify", "--patches", patches), ("revert",), ("revert", "--force")):
        result = cli(args[0], "--site", site, *args[1:])
        assert result.code == 7, (args, result.stdout, result.stderr)
        assert result.reason.startswith(f"error: corrupt state file {manifest}: "), result.reason
        assert relpath in result.reason and "ships" in result.reason, result.reason
    assert settled(site) == before, f"a refused command changed something: {changed(before, settled(site))}"


@pytest.mark.parametrize("dirs", [["vllm_omni"], ["vllm_omni/diffusion/models/other"], ["vllm_omni/../x"]])
def test_created_directories_outside_the_files_path_are_refused(applied: tuple[Path, Path], dirs: list[str]):
    """`dirs` may name only directories between the module directory and the created file: revert
    never removes anything else (the module directory itself, a sibling, a path with '..')."""
    site, patches = applied

    def change(document: dict) -> None:
        document["files"][CREATED]["dirs"] = dirs
    _forge(site, change)
    before = settled(site)
    for args in (("verify", "--patches", patches), ("revert",)):
        result = cli(args[0], "--site", site, *args[1:])
        assert result.code == 7, (args, result.stdout, result.stderr)
        assert "corrupt state file" in result.reason and "'dirs'" in result.reason, result.reason
    assert settled(site) == before


def test_originals_without_a_record_are_used_and_said_to_be_unchecked(applied: tuple[Path, Path]):
    """Sound rule for what cannot be checked (no RECORD, e.g. editable installs): revert trusts the
    originals as recorded at apply, and says so."""
    site, patches = applied
    (site / "diffusers-0.38.0.dist-info" / "RECORD").unlink()
    result = cli("revert", "--site", site)
    assert result.code == 0, result.stderr
    assert "not checked against a RECORD" in result.stdout and DISPATCH in result.stdout
    assert b"dispatch-mark" not in (site / DISPATCH).read_bytes()
    assert b"rope-mark" not in (site / TRANSFORMER).read_bytes()


def test_unwritable_file_never_written_leaves_no_journal(site: Path, tmp_path: Path, mounts):
    """The third write fails (read-only directory holding a __pycache__): rollback must not touch the
    bytecode of that file (it never wrote it), so no journal is left to wedge later commands."""
    patches = fault_set(site, tmp_path / "set")
    target = site / OMNI_PIPELINE
    pyc = Path(py_compile.compile(str(target), cfile=None, doraise=True))
    assert pyc.exists() and pyc.parent.name == "__pycache__"
    before = snapshot(site)
    mounts.readonly(target.parent)
    result = cli("apply", "--site", site, "--patches", patches)
    assert result.code == 7 and str(target) in result.reason, result.stderr
    assert "put back" in result.stderr
    assert not (site / STATE).exists(), "a journal (or other state) was left behind"
    assert snapshot(site) == before, changed(before, snapshot(site))
    status = cli("status", "--site", site, "--patches", patches)
    assert status.code == 0, status.stderr


def test_the_fast_path_also_refuses_a_release_directory_recorded_as_created(applied: tuple[Path, Path]):
    """verify as a process goes through the fast path first: it must hand the forged manifest to
    the engine (which refuses it), never answer from it."""
    site, patches = applied
    _release_directory_as_created(site)
    result = run("verify", "--site", site, "--patches", patches)
    assert result.code == 7 and "corrupt state file" in result.stderr, (result.stdout, result.stderr)


class _SwapAtOpen:
    """Replaces state file NAME by a symlink to TARGET just before ernie-patch opens it, after it
    checked the file (lstat): the window only O_NOFOLLOW on the open closes."""

    def __init__(self, name: str, target: Path) -> None:
        self.name, self.target, self.swapped = name, target, 0
        self._open = os.open

    def __call__(self, path, flags, mode=0o777, *, dir_fd=None):  # noqa: ANN001 (os.open's signature)
        if path == self.name and dir_fd is not None and not os.path.islink(f"/proc/self/fd/{dir_fd}/{path}"):
            os.unlink(path, dir_fd=dir_fd)
            os.symlink(str(self.target), path, dir_fd=dir_fd)
            self.swapped += 1
        return self._open(path, flags, mode, dir_fd=dir_fd)


def test_a_symlink_swapped_in_between_lstat_and_open_of_a_state_file_is_refused(applied: tuple[Path, Path],
                                                                               tmp_path: Path, monkeypatch):
    """The manifest is checked, then swapped for a symlink to a root-owned copy of itself: only a
    no-follow open tells. The engine refuses (exit 7, naming it); the fast path never answers from it."""
    from ernie_patcher.core import fastpath

    site, patches = applied
    manifest = site / STATE / "manifest.json"
    good = manifest.read_bytes()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(good)
    swap = _SwapAtOpen("manifest.json", elsewhere)
    monkeypatch.setattr(os, "open", swap)
    options = {"command": "verify", "python": None, "site": str(site), "patches": str(patches), "only": [],
               "as_json": True, "reparse": False, "quiet": False}
    assert fastpath.answer(options) is None, "the fast path answered from a manifest reached through a symlink"
    assert swap.swapped == 1
    manifest.unlink()
    manifest.write_bytes(good)
    _refused(cli("verify", "--site", site, "--patches", patches), manifest, "it is a symlink")
    assert swap.swapped == 2
    monkeypatch.undo()
    manifest.unlink()
    manifest.write_bytes(good)
    assert cli("verify", "--site", site, "--patches", patches).code == 0
