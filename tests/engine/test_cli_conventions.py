"""Conventions people bring from git, pip, quilt and patch-package: `list`, `status --exit-code` for a
CI gate, -q/-v, ERNIE_PATCHER_* variables for the target options, completion of patch ids,
examples in every command's --help, and "did you mean" for a mistyped id."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import TRANSFORMER, cli, run

from ernie_patcher.cli.commands import main
from ernie_patcher.patchset.series import load_series

IDS = load_series(None).ids


def test_list_shows_every_patch_and_variant():
    result = cli("list")
    assert result.code == 0
    for spec in load_series(None).patches:
        assert any(spec.file in line and spec.tested in line for line in result.stdout.splitlines()), spec.file
    assert [line.split()[0] for line in result.stdout.splitlines()[1:] if line.startswith("  ") and
            line.split()[0] in IDS] == IDS


def test_status_exit_code_is_a_ci_gate(site: Path):
    assert cli("status", "--site", site).code == 0
    assert cli("status", "--site", site, "--exit-code").code == 1
    assert cli("apply", "--site", site).code == 0
    assert cli("status", "--site", site, "--exit-code").code == 0
    path = site / TRANSFORMER
    path.write_text(path.read_text() + "# edited\n")
    assert cli("status", "--site", site, "--exit-code").code == 6
    assert cli("status", "--site", site).code == 0


def test_status_exit_code_missing_package(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("status", "--site", empty, "--exit-code").code == 3


def test_quiet_is_one_line_and_verbose_lists_files_and_probes(site: Path):
    quiet = cli("apply", "--site", site, "-q")
    assert quiet.code == 0 and quiet.stdout.count("\n") == 1 and quiet.stdout == \
        "apply: 5 patches applied; 4 files patched, 1 created, 1 RECORD updated\n"
    quiet_verify = cli("verify", "--site", site, "--quiet")
    assert quiet_verify.stdout.splitlines() == [line for line in quiet_verify.stdout.splitlines()
                                                if line.startswith("verified: 5/5 patches applied")]
    assert len(quiet_verify.stdout.splitlines()) == 1
    verbose = cli("verify", "--site", site, "-v")
    assert f"diffusers-rope: file {TRANSFORMER}: applied" in verbose.stdout
    assert sum("probe pass" in line for line in verbose.stdout.splitlines()) >= 5
    assert cli("verify", "--site", site, "-q", "-v").code == 2


def test_quiet_failure_is_one_line_on_stderr(site: Path):
    result = cli("verify", "--site", site, "-q")
    assert result.code == 1 and result.stdout == ""
    assert result.stderr.splitlines() == ["error: verify failed: diffusers-rope: patch is not-applied"]


def test_environment_variables_set_the_target(site: Path, tmp_path: Path):
    by_env = run("status", "--json", env={"ERNIE_PATCHER_SITE": str(site)})
    by_option = run("status", "--site", site, "--json")
    assert by_env.code == 0 and by_env.stdout == by_option.stdout
    by_env_click = run("status", "-v", "--json", env={"ERNIE_PATCHER_SITE": str(site)})  # -v: the click CLI
    assert by_env_click.code == 0 and by_env_click.stdout == by_option.stdout
    python = run("status", "--json", env={"ERNIE_PATCHER_PYTHON": "/bin/true"})
    assert python.code == 7
    own = tmp_path / "set"
    own.mkdir()
    patches = run("list", env={"ERNIE_PATCHER_PATCHES": str(own)})
    assert patches.code == 2 and f"no series.toml in {own}" in patches.stderr


def _complete(words: str) -> list[str]:
    env = {**os.environ, "_ERNIE_PATCH_COMPLETE": "bash_complete", "COMP_WORDS": words,
           "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
    out = subprocess.run([sys.executable, "-c", "from ernie_patcher.cli.commands import main; main(prog_name='ernie-patch')"],
                         env=env, capture_output=True, text=True).stdout
    return [line.split(",", 1)[1] for line in out.splitlines() if "," in line]


def test_completion_offers_patch_ids():
    assert _complete("ernie-patch verify --only omni-") == [i for i in IDS if i.startswith("omni-")]
    assert "diffusers_attention_dispatch.v0_41.patch" in _complete("ernie-patch diff diffusers_")
    assert "status" in _complete("ernie-patch sta")


@pytest.mark.parametrize("command", sorted(main.commands))
def test_every_command_help_has_examples(command: str):
    result = cli(command, "--help")
    assert result.code == 0 and "Examples:" in result.stdout
    examples = result.stdout.split("Examples:", 1)[1].split("\n\n", 1)[0]
    assert f"ernie-patch {command}" in examples


def test_did_you_mean(site: Path):
    result = cli("verify", "--site", site, "--only", "diffusers-rop")
    assert result.code == 2
    assert result.reason == "error: unknown patch id 'diffusers-rop' (did you mean 'diffusers-rope'?)"
    assert "did you mean" not in cli("diff", "zzz").reason


def test_create_without_pip_says_so_and_names_wheel(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """uv environments have no pip: create says that, and that --wheel is the way, instead of 'found no wheel'."""
    from ernie_patcher.authoring import wheels

    monkeypatch.setattr(wheels, "_has_pip", lambda python: False)
    path = site / TRANSFORMER
    path.write_text(path.read_text() + "# edited\n")
    result = cli("create", "diffusers", TRANSFORMER, "--site", site, "--name", "mine", "--patches", tmp_path / "set")
    assert result.code == 7
    assert result.reason == f"error: cannot download diffusers==0.38.0: no pip in {sys.executable}"
    assert "--wheel FILE" in result.stderr


def test_usage_names_the_command_however_it_is_started():
    """`python -m ernie_patcher` and the console script say `ernie-patch` in usage messages alike."""
    result = run("status", "--bogus")
    assert result.code == 2 and result.stderr.startswith("Usage: ernie-patch status [OPTIONS]"), result.stderr
