"""Directories a patch empties: removed by apply when nothing else is in them, made again (with their
mode) by revert; one holding something apply did not remove is kept and named in a note. The patch is
the real `git diff` that deletes vllm-omni 0.20.0's magi_human subpackage (as 0.30.0 does)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from support.cli import cli
from support.realpkgs import VLLM_OMNI, install_target
from support.releasediff import git_diff, package_tree, write_set

MAGI = "vllm_omni/diffusion/models/magi_human"


def _deleting_set(tmp_path: Path) -> tuple[Path, Path]:
    old = install_target(tmp_path / "old", VLLM_OMNI)
    shutil.copytree(old / "vllm_omni", tmp_path / "a" / "vllm_omni")
    shutil.copytree(old / "vllm_omni", tmp_path / "b" / "vllm_omni")
    shutil.rmtree(tmp_path / "b" / MAGI)
    diff = git_diff(tmp_path, "a/vllm_omni", "b/vllm_omni")
    assert diff.count(b"\ndeleted file mode ") == len(list((old / MAGI).iterdir()))
    patches = write_set(tmp_path / "set", [{"id": "drop", "package": "vllm-omni", "module": "vllm_omni",
                                             "version": "0.20.0", "diff": diff}])
    return install_target(tmp_path / "site", VLLM_OMNI), patches


def test_emptied_directory_is_removed_and_made_again_with_its_mode(tmp_path: Path):
    site, patches = _deleting_set(tmp_path)
    os.chmod(site / MAGI, 0o750)
    pristine = package_tree(site)
    applied = cli("apply", "--site", site, "--patches", patches, "--json")
    assert applied.code == 0, applied.stdout
    assert not (site / MAGI).exists()
    assert any(MAGI in a["detail"] for a in applied.json()["actions"] if a["action"] == "remove")
    assert cli("verify", "--site", site, "--patches", patches).code == 0
    assert cli("revert", "--site", site).code == 0
    assert (site / MAGI).stat().st_mode & 0o7777 == 0o750
    assert package_tree(site) == pristine


def test_directory_holding_something_else_is_kept_and_named(tmp_path: Path):
    site, patches = _deleting_set(tmp_path)
    (site / MAGI / "notes.txt").write_text("the operator's\n")
    pristine = package_tree(site)
    applied = cli("apply", "--site", site, "--patches", patches, "--json")
    assert applied.code == 0, applied.stdout
    assert sorted(p.name for p in (site / MAGI).iterdir()) == ["notes.txt"]
    assert any(f"kept {site / MAGI}" in note and "notes.txt" in note for note in applied.json()["notes"])
    assert cli("revert", "--site", site).code == 0
    assert package_tree(site) == pristine
