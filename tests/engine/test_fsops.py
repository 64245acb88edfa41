"""atomic_write's durability order: the temp file's data reaches the disk before the rename."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ernie_patcher.fs import fsops


def fsync_and_replace_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record, in order, every fsync (by the path of its fd) and every rename (by its source) fsops makes."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", os.path.realpath(src)))
        real_replace(src, dst)

    monkeypatch.setattr(fsops.os, "fsync", fsync)
    monkeypatch.setattr(fsops.os, "replace", replace)
    return events


def test_temp_file_is_fsynced_before_it_replaces_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Without the fsync a crash after the rename can leave an empty or partial file in place."""
    target = tmp_path / "module.py"
    target.write_bytes(b"old\n")
    events = fsync_and_replace_events(monkeypatch)
    fsops.atomic_write(target, b"new\n")

    assert target.read_bytes() == b"new\n"
    renamed = [i for i, (kind, _) in enumerate(events) if kind == "replace"]
    assert len(renamed) == 1, events
    temp = events[renamed[0]][1]
    assert temp.endswith(fsops.TEMP_SUFFIX) and Path(temp).parent == tmp_path.resolve()
    assert ("fsync", temp) in events[:renamed[0]], f"temp file not fsynced before the rename: {events}"


def test_apply_fsyncs_every_staged_file_before_renaming_it_in_place(site: Path, monkeypatch: pytest.MonkeyPatch):
    """apply stages all new contents and fsyncs them together: each still reaches the disk before
    its rename, so a crash never leaves a renamed but empty file."""
    from support.cli import cli

    events = fsync_and_replace_events(monkeypatch)
    assert cli("apply", "--site", site).code == 0
    renamed = [(i, path) for i, (kind, path) in enumerate(events) if kind == "replace"]
    assert len(renamed) >= 5, events
    for index, temp in renamed:
        assert temp.endswith(fsops.TEMP_SUFFIX)
        assert ("fsync", temp) in events[:index], f"{temp} not fsynced before its rename"


def test_fsyncs_run_concurrently_and_still_refuse_a_symlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A batch of fsyncs goes to several threads; a planted symlink among them is still an error
    naming it, and every other file is still fsynced."""
    from ernie_patcher.errors import PatcherError

    names = []
    for index in range(12):
        (tmp_path / f"f{index}").write_bytes(b"x")
        names.append(tmp_path / f"f{index}")
    (tmp_path / "planted").symlink_to(tmp_path / "f0")
    threads: set[int] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        import threading
        import time

        threads.add(threading.get_ident())
        time.sleep(0.01)
        real_fsync(fd)

    monkeypatch.setattr(fsops.os, "fsync", fsync)
    fsops.fsync_files(names)
    assert len(threads) > 1, "the fsyncs ran one after another in one thread"
    with pytest.raises(PatcherError, match="planted"):
        fsops.fsync_files([*names[:6], tmp_path / "planted", *names[6:]])
