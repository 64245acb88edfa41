"""Package metadata turned hostile by whoever can write the site: a FIFO as METADATA or RECORD, a
direct_url.json nested too deep, a symlink loop in the package. Every command answers in bounded
time with a one-line reason (or ignores what it does not need); none hangs or ends in exit 70."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from faultkit import command, environ, fault_set

DIST_INFO = "diffusers-0.38.0.dist-info"
TIMEOUT = 60


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), capture_output=True, text=True, env=environ({}), timeout=TIMEOUT)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("command_name", ["status", "apply"])
def test_a_fifo_as_metadata_never_hangs(site: Path, tmp_path: Path, command_name: str):
    patches = fault_set(site, tmp_path / "set")
    _fifo(site / DIST_INFO / "METADATA")
    done = _run(command_name, "--site", site, "--patches", patches)
    assert done.returncode not in (70,), done.stderr
    assert done.returncode == (0 if command_name == "status" else 3), done.stdout + done.stderr


def test_a_fifo_as_record_is_refused_in_one_line(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    _fifo(site / DIST_INFO / "RECORD")
    done = _run("status", "--site", site, "--patches", patches)
    assert done.returncode == 7, done.stdout + done.stderr
    assert f"{site / DIST_INFO / 'RECORD'} is not a regular file" in done.stderr.splitlines()[0]


def test_a_direct_url_nested_too_deep_is_ignored(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    (site / DIST_INFO / "direct_url.json").write_text("[" * 200_000)
    done = _run("status", "--site", site, "--patches", patches)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_symlink_loop_in_the_package_is_refused_in_one_line(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    loop = site / "diffusers" / "models" / "transformers"
    os.rename(loop, loop.with_name("transformers.real"))
    loop.symlink_to("transformers")
    done = _run("status", "--site", site, "--patches", patches)
    assert done.returncode == 7, done.stdout + done.stderr
    assert done.stderr.startswith(f"error: refusing {site / 'diffusers' / 'models' / 'transformers'}")
