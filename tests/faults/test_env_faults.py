"""A read-only or immutable target, a full disk, and concurrent runs: refused, nothing changed.

Root ignores file modes, so "not writable" is made real: a read-only bind mount, or chattr +i.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import signal
from pathlib import Path

import pytest

from faultkit import (DISPATCH, OMNI_PIPELINE, PAUSE_ENV, STATE, SUMMARY, changed, cli, debris, fault_set, run,
                      spawn, states, tree, wait_stopped)
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target
from support.tree import snapshot

ERNIE_DIR = Path(OMNI_PIPELINE).parent


def _apply(site: Path, patches: Path):
    return cli("apply", "--site", site, "--patches", patches)


def test_read_only_directory_refused_and_earlier_files_put_back(site: Path, tmp_path: Path, mounts):
    patches = fault_set(site, tmp_path / "set")
    before = snapshot(site)
    mounts.readonly(site / ERNIE_DIR)
    result = _apply(site, patches)
    assert result.code == 7, result.stdout + result.stderr
    assert str(site / OMNI_PIPELINE) in result.reason and "Read-only file system" in result.reason
    assert "put back" in result.stderr, "the diffusers files written before the failure must be restored"
    assert snapshot(site) == before, changed(before, snapshot(site))


def test_immutable_file_refused_nothing_changed(site: Path, tmp_path: Path, mounts):
    patches = fault_set(site, tmp_path / "set")
    before = snapshot(site)
    mounts.immutable(site / DISPATCH)
    result = _apply(site, patches)
    assert result.code == 7
    assert str(site / DISPATCH) in result.reason and "Operation not permitted" in result.reason
    assert snapshot(site) == before, changed(before, snapshot(site))


def test_read_only_site_refused_before_any_state_is_created(site: Path, tmp_path: Path, mounts):
    patches = fault_set(site, tmp_path / "set")
    before = snapshot(site)
    mounts.readonly(site)
    result = _apply(site, patches)
    assert result.code == 7
    assert str(site / STATE) in result.reason and "Read-only file system" in result.reason
    assert snapshot(site) == before


def test_revert_on_read_only_target_keeps_everything_patched(site: Path, tmp_path: Path, mounts):
    patches = fault_set(site, tmp_path / "set")
    assert _apply(site, patches).code == 0
    patched = tree(site)
    mounts.readonly(site / ERNIE_DIR)
    result = cli("revert", "--site", site)
    assert result.code == 7 and str(site / ERNIE_DIR) in result.reason
    assert tree(site) == patched, changed(patched, tree(site))
    assert cli("verify", "--site", site, "--patches", patches).code == 0


# Free bytes left on the site's file system before apply: from nothing to plenty.
FREE_LEVELS = (0, 160 << 10, 330 << 10, 400 << 10, 480 << 10, 8 << 20)


def _fill(mount: Path, leave: int) -> Path:
    filler = mount / "filler"
    stat = os.statvfs(mount)
    size = max(stat.f_bavail * stat.f_frsize - leave, 0)
    try:
        with open(filler, "wb") as handle:
            handle.truncate(0)
            for _ in range(size // (1 << 20)):
                handle.write(b"\0" * (1 << 20))
            handle.write(b"\0" * (size % (1 << 20)))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    return filler


def _stage(reason: str, site: Path) -> str:
    """Which write hit ENOSPC: the object store, the journal, the manifest or a target file."""
    path = Path(re.search(r"cannot \w+ (\S+):", reason).group(1))
    return "objects" if path.parent.name == "objects" else str(path.relative_to(site))


def test_disk_full_at_every_stage_refuses_cleanly(tmp_path: Path, mounts):
    """Sweep the free space left so ENOSPC hits storing originals, the journal, and the targets."""
    mount = tmp_path / "small"
    mounts.tmpfs(mount, "56m")
    site = install_target(mount / "site", DIFFUSERS, VLLM_OMNI)
    patches = fault_set(site, tmp_path / "set")
    pristine = snapshot(site)
    failures: dict[int, str] = {}
    for leave in FREE_LEVELS:
        filler = _fill(mount, leave)
        result = _apply(site, patches)
        if result.code == 7:
            assert "No space left on device" in result.reason, result.reason
            failures[leave] = _stage(result.reason, site)
            assert snapshot(site) == pristine, (leave, changed(pristine, snapshot(site)))
        else:
            assert result.code == 0, result.stderr
            assert cli("verify", "--site", site, "--patches", patches).code == 0
            full_revert = cli("revert", "--site", site)
            if full_revert.code == 7:
                assert states(site, patches) == ["applied"] * 3, "a failed revert must leave all patched"
            filler.unlink()
            if full_revert.code == 7:
                assert cli("revert", "--site", site).code == 0
        filler.unlink(missing_ok=True)
        assert snapshot(site) == pristine, (leave, changed(pristine, snapshot(site)))
        assert debris(site) == []
    SUMMARY.append(f"disk full: apply refused at free={sorted(failures)} bytes: {failures}")
    assert failures and len(failures) < len(FREE_LEVELS), "the sweep must cross from refused to applied"
    assert len(set(failures.values())) >= 2, "ENOSPC should hit more than one stage"


def test_second_apply_refused_while_first_holds_the_lock(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    first = spawn("apply", "--site", site, "--patches", patches, env={PAUSE_ENV: "file-2-written"})
    try:
        wait_stopped(first)
        midway = snapshot(site)
        second = run("apply", "--site", site, "--patches", patches)
        assert second.code == 7
        assert "another ernie-patch run holds the lock" in second.reason and f"pid {first.pid}" in second.reason
        assert snapshot(site) == midway, "the refused run wrote something"
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.communicate(timeout=120)
    assert first.returncode == 0
    assert cli("verify", "--site", site, "--patches", patches).code == 0


def test_lock_held_by_another_process_refuses_apply_and_revert(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    (site / STATE).mkdir()
    with open(site / STATE / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        before = snapshot(site)
        for args in (("apply", "--patches", patches), ("revert",)):
            result = cli(args[0], "--site", site, *args[1:])
            assert result.code == 7 and "holds the lock" in result.reason
            assert snapshot(site) == before


def test_simultaneous_applies_never_both_write(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    pristine = tree(site)
    outcomes = []
    for _ in range(3):
        runs = [spawn("apply", "--site", site, "--patches", patches, "--json") for _ in range(2)]
        results = [(p.wait(timeout=300), p.communicate()[0]) for p in runs]
        writers = [code for code, out in results if code == 0 and json.loads(out)["actions"]]
        others = sorted(code if code == 7 else "noop" for code, out in results
                        if not (code == 0 and json.loads(out)["actions"]))
        outcomes.append(others)
        assert len(writers) == 1, results
        assert all(o in (7, "noop") for o in others), results
        assert cli("verify", "--site", site, "--patches", patches).code == 0
        assert cli("revert", "--site", site).code == 0
        assert tree(site) == pristine
    SUMMARY.append(f"simultaneous applies: the second run was {outcomes}")


def test_lock_file_removed_between_open_and_flock_is_not_trusted(tmp_path: Path, monkeypatch):
    """A finishing run may remove the lock file after we opened it: locking that orphan would let a
    third run, which creates a new lock file, write at the same time as us."""
    from ernie_patcher.fs import fsops
    from ernie_patcher.errors import PatcherError

    path = tmp_path / STATE / "lock"
    real_flock = fcntl.flock
    third: list = []

    def flock_after_removal(fd: int, operation: int) -> None:
        if not third:
            path.unlink()
            third.append(open(path, "w"))
            real_flock(third[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        real_flock(fd, operation)

    monkeypatch.setattr(fsops.fcntl, "flock", flock_after_removal)
    try:
        with pytest.raises(PatcherError) as refused:
            with fsops.Lock(path):
                pass
        assert "holds the lock" in refused.value.reason
    finally:
        third[0].close()
