"""The whole `git diff --binary` of two real vllm-omni releases (0.20.0 -> 0.30.0: 1 641 files, new
subpackages with empty __init__.py, deleted subpackages, renames, binary assets) as a user patch set on
a virtual environment holding 0.20.0: apply leaves exactly the tree `git apply` leaves, verify passes,
revert gives 0.20.0 back byte for byte, and `pip uninstall` removes every file apply created.
One test, run once: it is the slowest of the core tier (1.5 to 4.5 minutes, with the machine's load)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from support.cli import cli
from support.realpkgs import VLLM_OMNI, install_target, make_venv
from support.releasediff import git_apply, git_diff, package_tree, write_set
from support.tree import snapshot

NEW = ("vllm-omni", "0.30.0")


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def test_whole_release_git_diff_applies_as_git_apply_and_reverts(tmp_path: Path):
    for label, spec in (("a", VLLM_OMNI), ("b", NEW)):
        install_target(tmp_path / f"site-{label}", spec)
        shutil.move(str(tmp_path / f"site-{label}" / "vllm_omni"), str(tmp_path / label / "vllm_omni"))
    diff = git_diff(tmp_path, "a/vllm_omni", "b/vllm_omni")
    for header in (b"\nnew file mode ", b"\ndeleted file mode ", b"\nrename from ", b"\nGIT binary patch\n",
                   b"\nindex 0000000..e69de29"):
        assert header in diff, header
    patches = write_set(tmp_path / "set", [{"id": "upgrade", "package": "vllm-omni", "module": "vllm_omni",
                                             "version": VLLM_OMNI[1], "diff": diff}])
    python = make_venv(tmp_path / "venv", VLLM_OMNI)
    site = _site_packages(tmp_path / "venv")
    pristine = snapshot(site)
    reference = tmp_path / "git-apply"
    shutil.copytree(site / "vllm_omni", reference / "vllm_omni")
    git_apply(reference, patches / "upgrade.patch", strip=2)

    applied = cli("apply", "--python", python, "--patches", patches, "--json")
    assert applied.code == 0, applied.stdout[-3000:]
    assert package_tree(site / "vllm_omni") == package_tree(reference / "vllm_omni")
    emptied = [a for a in applied.json()["actions"] if "the director" in a["detail"] and a["action"] == "remove"]
    assert emptied, "no deleted subpackage's directory was removed"
    assert cli("verify", "--python", python, "--patches", patches).code == 0

    manifest = json.loads((site / ".ernie-patcher" / "manifest.json").read_text())
    created = sorted(e["relpath"] for e in manifest["files"].values() if e["action"] == "create")
    record = (site / "vllm_omni-0.20.0.dist-info" / "RECORD").read_text()
    assert all(f"\n{relpath}," in record for relpath in created)

    assert cli("revert", "--python", python).code == 0
    assert snapshot(site) == pristine

    assert cli("apply", "--python", python, "--patches", patches).code == 0
    done = subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "vllm-omni"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    left = [relpath for relpath in created if (site / relpath).exists()]
    assert left == [], f"pip uninstall left files apply created: {left[:10]}"
