"""Apply of a patch set that adds a two-level subpackage, killed or interrupted at each write
checkpoint, and raced by a symlink planted after planning: the site ends as before apply
(directories and bytecode included) or fully patched, and nothing is written outside it."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from faultkit import KILL_ENV, PAUSE_ENV, STATE, changed, cli, debris, run, spawn, tree, wait_stopped
from support.realpkgs import DIFFUSERS, install_target
from support.subpackage import NEW_FILES, SUB, TOP, subpackage_set
from support.tree import snapshot

# The writes of that apply: the modified module, the three created files, RECORD.
CHECKPOINTS = ["journal-written", *[f"file-{n}-written" for n in range(1, len(NEW_FILES) + 3)],
               "manifest-written", "journal-removed"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, dict]:
    root = tmp_path_factory.mktemp("newdirs")
    site = install_target(root / "site", DIFFUSERS)
    patches = subpackage_set(site, root / "set")
    pristine = tree(site)
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    patched = tree(site)
    assert cli("revert", "--site", site).code == 0
    assert tree(site) == pristine
    return site, patches, pristine, patched


def _settle(site: Path, patches: Path, pristine: dict, patched: dict) -> str:
    """The next run (status) recovers; the tree is then exactly before apply or exactly patched."""
    assert cli("status", "--site", site, "--patches", patches).code == 0
    assert not (site / STATE / "journal.json").exists(), "the next run did not finish the recovery"
    assert debris(site) == []
    now = tree(site)
    if now == patched:
        return "patched"
    assert now == pristine, f"neither before apply nor patched: {changed(pristine, now)}"
    return "pristine"


@pytest.mark.parametrize("point", CHECKPOINTS)
def test_apply_killed_at_checkpoint_is_recovered_to_the_tree_before(world, point: str):
    site, patches, pristine, patched = world
    killed = run("apply", "--site", site, "--patches", patches, env={KILL_ENV: point})
    assert killed.code == -9, f"the hook did not fire at {point}: {killed.stderr}"
    if point.startswith("file-"):
        assert (site / SUB).is_dir(), "killed after the directories were made, yet they are not there"
    expected = "patched" if point == "journal-removed" else "pristine"
    assert _settle(site, patches, pristine, patched) == expected
    if expected == "patched":
        assert cli("revert", "--site", site).code == 0
        assert tree(site) == pristine


@pytest.mark.parametrize("point", ["file-3-written", "manifest-written"])
def test_revert_killed_is_recovered_with_the_directories_made_again(world, point: str):
    """Recovery of an interrupted revert puts the created files back, in their directories (at
    manifest-written revert has removed them, empty, already)."""
    site, patches, pristine, patched = world
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    killed = run("revert", "--site", site, env={KILL_ENV: point})
    assert killed.code == -9, killed.stderr
    assert (site / TOP).exists() == (point == "file-3-written")
    assert _settle(site, patches, pristine, patched) == "patched"
    assert cli("revert", "--site", site).code == 0
    assert tree(site) == pristine


def test_apply_interrupted_after_writing_rolls_the_directories_back(world):
    site, patches, pristine, patched = world
    process = spawn("apply", "--site", site, "--patches", patches, env={PAUSE_ENV: "file-3-written"})
    wait_stopped(process)
    assert (site / SUB).is_dir()
    process.send_signal(signal.SIGTERM)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate()
    assert process.returncode == 143, stderr
    assert "every file written so far was put back" in stderr
    assert not (site / STATE / "journal.json").exists()
    assert tree(site) == pristine, changed(pristine, tree(site))


def test_symlink_planted_after_planning_is_never_written_through(world, tmp_path: Path):
    """The directory is made and entered without following symlinks: one slipped in between the
    plan and the writes fails the write, which is rolled back; the outside stays untouched."""
    site, patches, pristine, patched = world
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kernels").mkdir()
    before_outside = snapshot(outside)
    process = spawn("apply", "--site", site, "--patches", patches, env={PAUSE_ENV: "journal-written"})
    wait_stopped(process)
    (site / TOP).symlink_to(outside)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate()
    try:
        assert process.returncode == 7, stderr
        assert f"refusing {site / TOP}: it is a symlink" in stderr, stderr
        assert "every file written so far was put back" in stderr
        assert snapshot(outside) == before_outside, "a write went through the symlink"
    finally:
        (site / TOP).unlink()
    assert not (site / STATE / "journal.json").exists()
    assert tree(site) == pristine, changed(pristine, tree(site))


def test_directory_of_another_user_slipped_in_after_planning_is_refused(world):
    """A real directory where apply is about to make one, made meanwhile by another user (uid
    4242): apply refuses to write into it and rolls back; no file is written in it."""
    site, patches, pristine, patched = world
    process = spawn("apply", "--site", site, "--patches", patches, env={PAUSE_ENV: "journal-written"})
    wait_stopped(process)
    (site / TOP).mkdir()
    os.chown(site / TOP, 4242, 4242)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate()
    assert process.returncode == 7, stderr
    assert f"refusing {site / TOP}: the directory appeared while writing, owned by uid 4242" in stderr, stderr
    assert not (site / STATE / "journal.json").exists()
    assert (site / TOP).is_dir(), "the rollback removed the other user's directory"
    assert list((site / TOP).iterdir()) == [], "a file was written into the other user's directory"
    (site / TOP).rmdir()
    assert tree(site) == pristine, changed(pristine, tree(site))


def _victim(root: Path) -> tuple[Path, list[str]]:
    """A directory outside the site shaped like the new subpackage, bytecode and a temp file in it."""
    for cache in (root / "__pycache__", root / "kernels" / "__pycache__"):
        cache.mkdir(parents=True)
    for name in ("__pycache__/__init__.cpython-311.pyc", "kernels/__pycache__/__init__.cpython-311.pyc",
                 "kernels/__pycache__/rope.cpython-311.pyc", "kernels/__pycache__/rope.cpython-312.opt-1.pyc",
                 "kernels/.rope.py.1234.ernie-tmp", "kernels/rope.py"):
        (root / name).write_bytes(b"not ernie-patch's")
    return root, sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_revert_through_a_new_directory_swapped_for_a_symlink_refuses_and_touches_nothing_outside(
        world, tmp_path: Path):
    """Another user moves the directory apply made and puts a symlink to elsewhere in its place
    while revert runs: revert refuses (the created files were moved away), nothing is removed or
    written through the symlink, and once the directory is back the next run finishes."""
    site, patches, pristine, patched = world
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    outside, before = _victim(tmp_path / "victim")
    process = spawn("revert", "--site", site, env={PAUSE_ENV: "journal-written"})
    wait_stopped(process)
    moved = site / (TOP + ".moved")
    os.rename(site / TOP, moved)
    (site / TOP).symlink_to(outside)
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate()
    assert process.returncode == 7, stderr
    assert f"refusing {site / TOP}: it is a symlink" in stderr, stderr
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == before
    assert all(p.read_bytes() == b"not ernie-patch's" for p in outside.rglob("*") if p.is_file())
    (site / TOP).unlink()
    os.rename(moved, site / TOP)
    assert cli("revert", "--site", site).code == 0
    assert tree(site) == pristine, changed(pristine, tree(site))


@pytest.mark.parametrize("target", [f"{TOP}/__init__.py", "diffusers/models/attention_dispatch.py"])
def test_a_fifo_planted_at_a_target_is_refused_without_blocking(world, target: str):
    site, patches, pristine, patched = world
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    saved = (site / target).read_bytes()
    (site / target).unlink()
    os.mkfifo(site / target)
    try:
        for command in (("status", "--site", site, "--patches", patches), ("verify", "--site", site, "--patches", patches),
                        ("revert", "--site", site)):
            result = run(*command)
            assert result.code == 7, (command, result.stderr)
            assert f"{site / target} is not a regular file" in result.stderr, result.stderr
    finally:
        (site / target).unlink()
        (site / target).write_bytes(saved)
    assert cli("revert", "--site", site).code == 0
    assert tree(site) == pristine, changed(pristine, tree(site))


def test_bytecode_is_never_written_through_a_directory_swapped_after_its_file(tmp_path: Path, monkeypatch):
    """The race won: right after a module is renamed into a new directory, that directory is moved
    and a symlink to elsewhere put in its place. Its bytecode is written through the directory
    reached no-follow from the module directory, so nothing lands outside."""
    import subprocess
    import sys

    from ernie_patcher.core import transaction

    site = install_target(tmp_path / "site", DIFFUSERS)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(site / "diffusers" / "__init__.py")], check=True)
    patches = subpackage_set(site, tmp_path / "set")
    outside, before = _victim(tmp_path / "victim")
    real = transaction.install

    def racing(file, sync_dir: bool = True, drop_bytecode: bool = False) -> None:
        real(file, sync_dir, drop_bytecode)
        if file.relpath == f"{SUB}/rope.py":
            os.rename(site / TOP, site / (TOP + ".moved"))
            (site / TOP).symlink_to(outside)

    monkeypatch.setattr(transaction, "install", racing)
    cli("apply", "--site", site, "--patches", patches)
    assert sorted(str(p.relative_to(outside)) for p in outside.rglob("*")) == before
    assert all(p.read_bytes() == b"not ernie-patch's" for p in outside.rglob("*") if p.is_file())
