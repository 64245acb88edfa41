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
    if (site / TOP).exists():
        assert list((site / TOP).iterdir()) == [], "a file was written into the other user's directory"
        (site / TOP).rmdir()
    assert tree(site) == pristine, changed(pristine, tree(site))
