"""Durability order: a temp file's data reaches the disk before its rename (atomic_write of a patch
set's file, and apply's staged package files); fsyncs of a batch run in threads."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ernie_patcher.fs import fsops
from ernie_patcher.fs.safeio import SafeDir


def fsync_and_replace_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record, in order, every fsync (by the path of its fd) and every rename (by its source) fsops makes."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", os.path.realpath(src)))
        real_replace(src, dst)

    def rename(src: str, dst: str, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
        where = os.readlink(f"/proc/self/fd/{src_dir_fd}") if src_dir_fd is not None else ""
        events.append(("replace", os.path.join(where, src)))
        real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(fsops.os, "fsync", fsync)
    monkeypatch.setattr(fsops.os, "replace", replace)
    monkeypatch.setattr(fsops.os, "rename", rename)
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
    renamed = [(i, path) for i, (kind, path) in enumerate(events)
               if kind == "replace" and "/.ernie-patcher/" not in path and "/__pycache__/" not in path]
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
    with SafeDir.open(tmp_path) as directory:
        directory.fsync_entries([path.name for path in names])
        assert len(threads) > 1, "the fsyncs ran one after another in one thread"
        with pytest.raises(PatcherError, match="planted"):
            directory.fsync_entries([*(path.name for path in names[:6]), "planted", *(p.name for p in names[6:])])


def test_apply_fsyncs_each_directory_it_renamed_into_before_the_manifest_says_so(site: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch):
    """A rename is durable only once its directory is fsynced: every directory apply renamed a file
    into is fsynced after that rename and before the manifest (which says the files are in place)
    is renamed into the state directory, however the rename is made (by path or through a directory fd)."""
    from support.cli import cli

    events: list[tuple[str, str, str]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def where(dst: str | Path, dir_fd: int | None) -> tuple[str, str]:
        if dir_fd is not None:
            return os.readlink(f"/proc/self/fd/{dir_fd}"), os.path.basename(dst)
        return os.path.dirname(os.path.realpath(dst)), os.path.basename(dst)

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def replace(src, dst, *, src_dir_fd=None, dst_dir_fd=None):  # noqa: ANN001 (os.replace's signature)
        events.append(("rename", *where(dst, dst_dir_fd)))
        real_replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):  # noqa: ANN001
        events.append(("rename", *where(dst, dst_dir_fd)))
        real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    assert cli("apply", "--site", site).code == 0
    state = str((site / ".ernie-patcher").resolve())
    manifest = max(i for i, event in enumerate(events) if event == ("rename", state, "manifest.json"))
    files = [(i, directory) for i, (kind, directory, name) in enumerate(events[:manifest])
             if kind == "rename" and name.endswith(".py")]
    assert len(files) >= 5, events
    for index, directory in files:
        assert ("fsync", directory, "") in events[index + 1:manifest], \
            f"{directory} not fsynced after a file was renamed into it and before the manifest"
