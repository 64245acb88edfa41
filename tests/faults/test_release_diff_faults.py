"""A `git diff --binary` between real releases, killed (SIGKILL) at every checkpoint of apply and of
revert: the next run leaves the tree exactly as before apply or exactly as git apply leaves it.

The pair is smaller than a whole release, so that every checkpoint can be killed: two patches in one
patch set, each a real `git diff --no-index --binary` of release files --
* tzdata 2025.1 -> 2025.2, whole: a new zone file (binary literal), two changed ones (binary deltas),
  text files;
* vllm-omni 0.20.0 -> 0.30.0 for a few paths (the older release with those paths as 0.30.0 has them):
  the magi_human subpackage deleted (two files removed, its __init__.py renamed to
  entrypoints/openpi/, its directory emptied), outputs.py renamed to outputs/__init__.py with
  changes, the new covo_audio subpackage with its empty __init__.py and a binary asset
  (speaker_prompt/prompt_token.npy).
  No release of vllm-omni (nor of diffusers) changes a file's executable bit, so that one case is
  built from a real file: entrypoints/cli/main.py made executable in the newer tree (git's `old mode
  100644` / `new mode 100755`, no hunk).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from faultkit import KILL_ENV, STATE, changed, cli, debris, run
from support.realpkgs import VLLM_OMNI, install_target
from support.releasediff import git_apply, git_diff, package_tree, subset, write_set

TZ_OLD, TZ_NEW = ("tzdata", "2025.1"), ("tzdata", "2025.2")
OMNI_PATHS = ["diffusion/models/magi_human", "entrypoints/openpi/__init__.py", "outputs.py", "outputs/__init__.py",
              "model_executor/models/covo_audio/__init__.py",
              "model_executor/models/covo_audio/speaker_prompt/prompt_token.npy"]
MADE_EXECUTABLE = "entrypoints/cli/main.py"
WRITES = 20  # files the apply writes (checked by the fixture): journal checkpoints file-1 .. file-20
CHECKPOINTS = ["journal-written", *[f"file-{n}-written" for n in range(1, WRITES + 1)], "manifest-written",
               "journal-removed"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, dict]:
    root = tmp_path_factory.mktemp("release-diff")
    old = install_target(root / "old", VLLM_OMNI, TZ_OLD)
    new = install_target(root / "new", ("vllm-omni", "0.30.0"), TZ_NEW)
    shutil.copytree(old / "tzdata", root / "a" / "tzdata")
    shutil.copytree(new / "tzdata", root / "b" / "tzdata")
    shutil.copytree(old / "vllm_omni", root / "a" / "vllm_omni")
    subset(old / "vllm_omni", new / "vllm_omni", root / "b" / "vllm_omni", OMNI_PATHS)
    os.chmod(root / "b" / "vllm_omni" / MADE_EXECUTABLE, 0o755)
    omni = git_diff(root, "a/vllm_omni", "b/vllm_omni")
    for header in (b"\ndeleted file mode ", b"\nrename from ", b"\nold mode 100644\nnew mode 100755",
                   b"\nGIT binary patch\nliteral ", b"\nindex 0000000..e69de29"):
        assert header in omni, header
    zones = git_diff(root, "a/tzdata", "b/tzdata")
    assert b"\ndelta " in zones
    patches = write_set(root / "set", [
        {"id": "omni", "package": "vllm-omni", "module": "vllm_omni", "version": "0.20.0", "diff": omni},
        {"id": "zones", "package": "tzdata", "module": "tzdata", "version": "2025.1", "diff": zones}])
    site = install_target(root / "site", VLLM_OMNI, TZ_OLD)
    reference = root / "git-apply"
    shutil.copytree(site, reference, symlinks=True)
    for name in ("omni", "zones"):
        git_apply(reference, patches / f"{name}.patch", strip=2)
    pristine, patched = package_tree(site), package_tree(reference)
    applied = cli("apply", "--site", site, "--patches", patches, "--json")
    assert applied.code == 0, applied.stdout
    assert len(applied.json()["actions"]) == WRITES
    assert package_tree(site) == patched, changed(patched, package_tree(site))
    assert cli("revert", "--site", site).code == 0
    assert package_tree(site) == pristine
    return site, patches, pristine, patched


def _settle(site: Path, patches: Path, pristine: dict, patched: dict) -> str:
    """The next run (status) recovers; the tree is then exactly before apply or exactly as git apply
    leaves it (directories and modes included)."""
    assert cli("status", "--site", site, "--patches", patches).code == 0
    assert not (site / STATE / "journal.json").exists(), "the next run did not finish the recovery"
    assert debris(site) == []
    now = package_tree(site)
    if now == patched:
        assert cli("verify", "--site", site, "--patches", patches).code == 0
        return "patched"
    assert now == pristine, f"neither before apply nor as git apply leaves it: {changed(pristine, now)[:10]}"
    return "pristine"


@pytest.mark.parametrize("point", CHECKPOINTS)
def test_apply_killed_at_checkpoint(world, point: str):
    site, patches, pristine, patched = world
    killed = run("apply", "--site", site, "--patches", patches, env={KILL_ENV: point})
    assert killed.code == -9, f"the hook did not fire at {point}: {killed.stderr}"
    expected = "patched" if point == "journal-removed" else "pristine"
    assert _settle(site, patches, pristine, patched) == expected
    if expected == "patched":
        assert cli("revert", "--site", site).code == 0
        assert package_tree(site) == pristine


@pytest.mark.parametrize("point", CHECKPOINTS)
def test_revert_killed_at_checkpoint(world, point: str):
    site, patches, pristine, patched = world
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    killed = run("revert", "--site", site, env={KILL_ENV: point})
    assert killed.code == -9, f"the hook did not fire at {point}: {killed.stderr}"
    expected = "pristine" if point == "journal-removed" else "patched"
    assert _settle(site, patches, pristine, patched) == expected
    if expected == "patched":
        assert cli("revert", "--site", site).code == 0
    assert package_tree(site) == pristine
