"""Fixtures of the fault-injection suite: real installed trees, mounts undone on teardown."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from faultkit import FUZZ_COUNTS, SUMMARY
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A fresh pip --no-deps --target tree of the real diffusers 0.38.0 and vllm-omni 0.20.0."""
    return install_target(tmp_path / "site", DIFFUSERS, VLLM_OMNI)


class Mounts:
    """Read-only bind mounts, tmpfs mounts and immutable files, all undone in reverse order."""

    def __init__(self) -> None:
        self._undo: list[list[str]] = []

    def _run(self, *argv: str) -> None:
        done = subprocess.run(list(argv), capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"`{' '.join(argv)}` is not permitted here ({done.stderr.strip()}); "
                        "this scenario needs root with CAP_SYS_ADMIN / CAP_LINUX_IMMUTABLE")

    def readonly(self, directory: Path) -> None:
        """Make DIRECTORY read-only for root too: a bind mount of itself, remounted ro."""
        self._run("mount", "--bind", str(directory), str(directory))
        self._undo.append(["umount", "--lazy", str(directory)])
        self._run("mount", "-o", "remount,ro,bind", str(directory))

    def tmpfs(self, directory: Path, size: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory))
        self._undo.append(["umount", "--lazy", str(directory)])

    def immutable(self, path: Path) -> None:
        """chattr +i: not even root may replace, rename over or delete PATH."""
        self._run("chattr", "+i", str(path))
        self._undo.append(["chattr", "-i", str(path)])

    def undo(self) -> None:
        while self._undo:
            argv = self._undo.pop()
            subprocess.run(argv, capture_output=True)


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    if os.geteuid() != 0:
        pytest.skip("read-only mounts, tmpfs and immutable files need root")
    helper = Mounts()
    try:
        yield helper
    finally:
        helper.undo()


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    """Report the randomized scenarios' tallies and how many inputs each fuzz target tried."""
    for line in SUMMARY:
        terminalreporter.write_line(line)
    for target, count in sorted(FUZZ_COUNTS.items()):
        terminalreporter.write_line(f"fuzz: {target}: {count} inputs tried, none raised anything "
                                    "but PatcherError")
