"""The contracts the help and the README state, held: a Python 3.8 target works; an option on the
command line wins over its variable (and --python or --site over both target variables); a --site
that is a file is a missing target (exit 3); revert refuses --patches; the lock message names the
process holding the lock now; an inferred strip level still shows after apply; selftest before apply
is exit 7 with a short first line naming `ernie-patch apply`."""
from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import TRANSFORMER, cli, run
from support.patchsets import PatchDef, file_diff, insert_after, write_patchset
from support.realpkgs import DIFFUSERS, VLLM_OMNI, wheel


def _python38() -> str | None:
    """A CPython 3.8 on this machine that runs (a pyenv shim may not): one pyenv installed, or python3.8
    on PATH."""
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3.8")))
    candidates += [found] if (found := shutil.which("python3.8")) else []
    for candidate in candidates:
        answer = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"],
                                capture_output=True, text=True)
        if answer.stdout.strip() == "True":
            return candidate
    return None


PYTHON38 = _python38()


@pytest.mark.skipif(PYTHON38 is None, reason="no Python 3.8 on this machine (python3.8 on PATH or ~/.pyenv/versions/3.8*)")
def test_python38_target_applies_verifies_and_reverts(tmp_path: Path):
    env_dir = tmp_path / "py38"
    subprocess.run([PYTHON38, "-m", "venv", str(env_dir)], check=True)
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                    "--ignore-requires-python", "--disable-pip-version-check", str(wheel(*DIFFUSERS)),
                    str(wheel(*VLLM_OMNI))], check=True)
    assert run("status", "--python", env_dir, "--exit-code", "-q").code == 1
    applied = run("apply", "--python", env_dir, "-q")
    assert applied.code == 0, applied.stderr
    verified = run("verify", "--python", env_dir, "--json")
    assert verified.code == 0, verified.stderr
    assert json.loads(verified.stdout)["python"] == str(env_dir / "bin" / "python")
    source = next(env_dir.glob(f"lib/python3.8/site-packages/{TRANSFORMER}")).read_text()
    subprocess.run([str(env_dir / "bin" / "python"), "-c", "import ast, sys; ast.parse(sys.stdin.read())"],
                   input=source, text=True, check=True)  # the patched file is Python 3.8 syntax
    assert run("revert", "--python", env_dir, "-q").code == 0
    assert run("status", "--python", env_dir, "-q").stdout == "status: 5 patches: 5 not-applied\n"


def test_target_option_wins_over_the_other_target_variable(site: Path):
    """ERNIE_PATCHER_PYTHON with --site (and ERNIE_PATCHER_SITE with --python) is no usage error: the
    option on the command line names the target."""
    by_option = run("status", "--site", site, "--json")
    for args in (("status", "--json"), ("status", "-v", "--json")):  # the quick path and the click CLI
        mixed = run(*args[:1], "--site", site, *args[1:], env={"ERNIE_PATCHER_PYTHON": "/bin/false"})
        assert mixed.code == 0 and mixed.stdout == by_option.stdout, mixed.stderr
    python = run("status", "--python", sys.executable, "--json", env={"ERNIE_PATCHER_SITE": str(site)})
    assert python.code == 0 and json.loads(python.stdout)["python"] == sys.executable, python.stderr
    both = run("status", env={"ERNIE_PATCHER_SITE": str(site), "ERNIE_PATCHER_PYTHON": sys.executable})
    assert both.code == 2 and "ERNIE_PATCHER_PYTHON and ERNIE_PATCHER_SITE are both set" in both.stderr


def test_site_that_is_a_file_is_exit_3(tmp_path: Path):
    (tmp_path / "file").write_text("")
    for command in ("status", "apply", "verify", "revert", "selftest"):
        result = run(command, "--site", tmp_path / "file")
        assert result.code == 3, (command, result.stderr)
        assert result.reason == f"error: --site {tmp_path / 'file'} is not a directory", result.stderr


def test_revert_refuses_patches(site: Path):
    assert cli("apply", "--site", site).code == 0
    refused = cli("revert", "--site", site, "--patches", "/nonexistent")
    assert refused.code == 2 and "revert takes no --patches" in refused.stderr
    assert cli("verify", "--site", site).code == 0  # nothing was reverted
    kept = run("revert", "--site", site, "-q", env={"ERNIE_PATCHER_PATCHES": "/nonexistent"})
    assert kept.code == 0, kept.stderr  # the variable (a Dockerfile's ENV) does not stop revert


def test_lock_message_names_the_holder_not_the_last_run(site: Path):
    assert cli("apply", "--site", site, "--only", "diffusers-rope").code == 0  # writes its pid in the lock file
    lock = site / ".ernie-patcher" / "lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
                               "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refused = run("apply", "--site", site)
    finally:
        holder.kill()
        holder.wait()
    assert refused.code == 7
    assert refused.reason == f"error: another ernie-patch run holds the lock {site.resolve() / '.ernie-patcher' / 'lock'} " \
                             f"(pid {holder.pid})", refused.stderr


def test_inferred_strip_level_shows_after_apply(site: Path, tmp_path: Path):
    diff = file_diff(site, TRANSFORMER, insert_after("import torch", "EDITED = 1\n"))
    patches = write_patchset(tmp_path / "set", [PatchDef("rope", "diffusers", "diffusers", diff)])
    before = cli("status", "--site", site, "--patches", patches, "--json").json()["patches"][0]
    assert (before["strip"], before["strip_inferred"]) == (1, True)
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    for result in (cli("status", "--site", site, "--patches", patches, "--json"),
                   run("status", "--site", site, "--patches", patches, "--json")):  # engine and fast path
        after = json.loads(result.stdout)["patches"][0]
        assert (after["state"], after["strip"], after["strip_inferred"]) == ("applied", 1, True), after
    assert "1 (inferred)" in run("status", "--site", site, "--patches", patches).stdout
    assert "1 (inferred)" in cli("status", "--site", site, "--patches", patches).stdout


def test_selftest_before_apply_is_exit_7_naming_apply(tmp_path: Path):
    """A stand-in target interpreter answering as the runtime does on an environment not patched."""
    answer = {"schema": 1, "python": "/opt/venv/bin/python", "python_version": "3.11.0", "device": "cpu",
              "dtype": "bf16", "versions": {}, "checks": [], "hint": "run `ernie-patch apply` for this interpreter's "
              "environment, then selftest",
              "error": "the ERNIE-Image patches are not applied to the diffusers of /opt/venv/bin/python"}
    (tmp_path / "answer.json").write_text(json.dumps(answer))
    target = tmp_path / "python"
    target.write_text(f"#!/bin/sh\ncat '{tmp_path / 'answer.json'}'\n")
    target.chmod(0o755)
    result = run("selftest", "--python", target)
    assert result.code == 7
    first = result.stderr.splitlines()[0]
    assert len(first) < 200 and "not applied" in first, first
    assert "try: run `ernie-patch apply`" in result.stderr
