"""A user patch set that adds a subpackage (two levels) the installed diffusers 0.38.0 does not have:
apply creates the directories, the new modules import, verify passes, revert leaves the tree as
it was (directories and bytecode included); what is in the way is refused before anything is
written, and what the user added since apply is kept."""
from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from support.cli import DISPATCH, cli, run
from support.patchsets import PatchDef, file_diff, insert_after, write_patchset
from support.realpkgs import DIFFUSERS, make_venv, wheel
from support.subpackage import NEW_FILES, RECORD, SUB, TOP, import_depth, subpackage_set
from support.tree import snapshot


def test_new_subpackage_applies_imports_verifies_and_reverts_to_the_same_tree(site: Path, tmp_path: Path):
    patches = subpackage_set(site, tmp_path / "set")
    (site / "diffusers").chmod(0o2751)  # not what mkdir and the umask give: the mode must be copied
    pristine = snapshot(site)

    status = cli("status", "--site", site, "--patches", patches, "--json").json()
    files = {f["relpath"]: f for f in status["patches"][0]["files"]}
    assert status["patches"][0]["state"] == "not-applied"
    assert files[f"{TOP}/__init__.py"]["detail"] == f"creates directory {TOP}"
    assert files[f"{SUB}/rope.py"]["detail"] == f"creates directories {TOP}, {SUB}"
    dry = cli("apply", "--site", site, "--patches", patches, "--dry-run", "--json").json()
    details = {Path(a["path"]).relative_to(site).as_posix(): a["detail"] for a in dry["actions"]}
    assert details[f"{SUB}/rope.py"].endswith(f"; creates directories {TOP}, {SUB}")
    assert snapshot(site) == pristine, "a dry run wrote something"

    applied = cli("apply", "--site", site, "--patches", patches, "--json")
    assert applied.code == 0, applied.stdout
    assert {a["action"] for a in applied.json()["actions"]} == {"patch", "create", "register"}
    parent_mode = (site / "diffusers").stat().st_mode
    for directory in (TOP, SUB):
        assert (site / directory).is_dir() and not (site / directory).is_symlink()
        assert (site / directory).stat().st_mode == parent_mode, "a new directory has not its parent's mode"
    record = (site / RECORD).read_text()
    assert all(f"{relpath},sha256=" in record for relpath in NEW_FILES), "created files not registered"
    manifest = json.loads((site / ".ernie-patcher" / "manifest.json").read_text())
    assert manifest["files"][f"{SUB}/rope.py"]["dirs"] == [TOP, SUB]
    assert manifest["files"][DISPATCH]["dirs"] == []

    imported = import_depth(site)
    assert imported.returncode == 0 and imported.stdout.strip() == "2", imported.stderr
    assert (site / SUB / "__pycache__").is_dir(), "the import wrote no bytecode: the revert check proves less"
    verified = cli("verify", "--site", site, "--patches", patches, "--json")
    assert verified.code == 0, verified.stdout + verified.stderr
    files = {f["relpath"]: f for f in verified.json()["patches"][0]["files"]}
    assert files[f"{SUB}/rope.py"]["detail"] == f"apply created directories {TOP}, {SUB}"
    assert files[DISPATCH]["detail"] == ""
    quick = run("verify", "--site", site, "--patches", patches, "--json")  # the fast path, from the manifest
    assert (quick.code, quick.stdout) == (verified.code, verified.stdout)

    reverted = cli("revert", "--site", site, "--json")
    assert reverted.code == 0, reverted.stdout
    assert not reverted.json()["notes"], reverted.json()["notes"]
    assert snapshot(site) == pristine, "revert left the tree different (directories, bytecode, files)"


def test_new_modules_get_bytecode_as_the_release_has_and_importing_compiles_nothing(site: Path, tmp_path: Path):
    """A release compiled at install (as pip does) gets bytecode for the modules apply creates in
    new directories too, in the same mode; revert takes it away with the directories."""
    import importlib.util
    import sys

    from ernie_patcher.fs.bytecode import compile_source

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(site / "diffusers" / "__init__.py")], check=True)
    patches = subpackage_set(site, tmp_path / "set")
    pristine = snapshot(site)
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    caches = {relpath: Path(importlib.util.cache_from_source(str(site / relpath))) for relpath in NEW_FILES}
    written = {}
    for relpath, pyc in caches.items():
        assert pyc.is_file(), f"no bytecode for {relpath}, created in a new directory"
        written[relpath] = pyc.read_bytes()
        assert written[relpath][16:] == compile_source((site / relpath).read_bytes(), site / relpath)
    imported = import_depth(site)
    assert imported.returncode == 0 and imported.stdout.strip() == "2", imported.stderr
    assert {relpath: pyc.read_bytes() for relpath, pyc in caches.items()} == written, \
        "importing the new modules compiled them again: their bytecode was stale"
    assert cli("revert", "--site", site).code == 0
    assert snapshot(site) == pristine


def test_pip_uninstall_removes_the_new_subpackage_too(tmp_path: Path):
    python = make_venv(tmp_path / "venv", DIFFUSERS)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    patches = subpackage_set(site, tmp_path / "set")
    assert cli("apply", "--python", python, "--patches", patches).code == 0
    assert (site / SUB / "rope.py").is_file()
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "-q", "diffusers"], check=True)
    assert not (site / "diffusers").exists(), sorted(str(p) for p in (site / "diffusers").rglob("*"))[:10]


def test_revert_keeps_a_new_directory_the_user_added_files_to(site: Path, tmp_path: Path):
    patches = subpackage_set(site, tmp_path / "set")
    pristine = snapshot(site)
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    assert import_depth(site).returncode == 0
    (site / SUB / "mine.py").write_text("MINE = True\n")
    reverted = cli("revert", "--site", site, "--json")
    assert reverted.code == 0, reverted.stdout
    note = " ".join(reverted.json()["notes"])
    assert "kept 2 directories" in note and str(site / SUB) in note and str(site / TOP) in note, note
    assert (site / SUB / "mine.py").read_text() == "MINE = True\n"
    assert sorted(p.name for p in (site / SUB).iterdir()) == ["mine.py"], "created files or bytecode left"
    assert sorted(p.name for p in (site / TOP).iterdir()) == ["kernels"]
    (site / SUB / "mine.py").unlink()
    (site / SUB).rmdir()
    (site / TOP).rmdir()
    assert snapshot(site) == pristine


@pytest.mark.parametrize("target", ["outside", "inside-dangling"])
def test_symlink_where_a_directory_is_to_be_created_is_refused(site: Path, tmp_path: Path, target: str):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = site / TOP
    link.symlink_to(outside if target == "outside" else site / "diffusers" / "not_there")
    patches = subpackage_set(site, tmp_path / "set")
    before = snapshot(tmp_path)
    for command in ("status", "apply"):
        result = cli(command, "--site", site, "--patches", patches)
        assert result.code == 7, (command, result.stdout, result.stderr)
        assert str(link) in result.reason, result.reason
    assert snapshot(tmp_path) == before, "something was written"
    assert list(outside.iterdir()) == []


def test_regular_file_where_a_directory_is_to_be_created_is_refused(site: Path, tmp_path: Path):
    (site / TOP).write_text("not a directory\n")
    patches = subpackage_set(site, tmp_path / "set")
    before = snapshot(site)
    status = cli("status", "--site", site, "--patches", patches, "--json").json()
    assert status["patches"][0]["state"] == "conflict"
    applied = cli("apply", "--site", site, "--patches", patches)
    assert applied.code == 5, applied.stdout + applied.stderr
    assert f"{site / TOP} is not a directory" in applied.reason, applied.reason
    assert snapshot(site) == before


def _dispatch_only(site: Path, directory: Path) -> Path:
    diff = file_diff(site, DISPATCH, insert_after("import torch", "EXTRA_MARK = \"extra-mark\"\n"))
    return write_patchset(directory, [PatchDef("extra", "diffusers", "diffusers", diff)])


def _rewrite(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _as_schema(schema: int, records: str):
    """A change making a state document look as the tool before `dirs` wrote it."""
    def change(document: dict) -> None:
        document["schema"] = schema
        for record in (document[records].values() if isinstance(document[records], dict) else document[records]):
            del record["dirs"]
    return change


def test_manifest_of_schema_1_is_still_read_and_a_newer_one_refused(site: Path, tmp_path: Path):
    patches = _dispatch_only(site, tmp_path / "set")
    pristine = snapshot(site)
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    manifest = site / ".ernie-patcher" / "manifest.json"
    _rewrite(manifest, _as_schema(1, "files"))
    for args in (("verify",), ("verify", "--reparse")):
        result = run(*args, "--site", site, "--patches", patches)
        assert result.code == 0, (args, result.stdout, result.stderr)
    saved = manifest.read_text()
    _rewrite(manifest, lambda d: d.update(schema=4))
    refused = cli("verify", "--site", site, "--patches", patches)
    assert refused.code == 7 and "manifest schema 4 is not one of 1, 2, 3" in refused.reason, refused.reason
    manifest.write_text(saved)
    assert cli("revert", "--site", site).code == 0
    assert snapshot(site) == pristine


def test_journal_of_schema_2_is_still_recovered(site: Path, tmp_path: Path):
    patches = _dispatch_only(site, tmp_path / "set")
    pristine = snapshot(site)
    killed = run("apply", "--site", site, "--patches", patches, env={"ERNIE_PATCHER_TEST_KILL_AT": "file-1-written"})
    assert killed.code == -9, killed.stderr
    _rewrite(site / ".ernie-patcher" / "journal.json", _as_schema(2, "restore"))
    status = cli("status", "--site", site, "--patches", patches)
    assert status.code == 0 and "recovered an interrupted apply" in status.stdout, status.stdout + status.stderr
    assert snapshot(site) == pristine


def test_whole_release_upgrade_diff_applies_and_reverts_to_the_same_tree(site: Path, tmp_path: Path):
    """diffusers 0.38.0 -> 0.39.0 as one user patch (diff -ruN of the two real wheels): 52 of its
    files lie in the 12 directories 0.39.0 adds."""
    for label, version in (("a", "0.38.0"), ("b", "0.39.0")):
        with zipfile.ZipFile(wheel("diffusers", version)) as archive:
            archive.extractall(tmp_path / label, [m for m in archive.namelist() if m.startswith("diffusers/")])
    patches = tmp_path / "set"
    patches.mkdir()
    with (patches / "upgrade.patch").open("wb") as out:
        assert subprocess.run(["diff", "-ruN", "a/diffusers", "b/diffusers"], cwd=tmp_path, stdout=out).returncode == 1
    (patches / "series.toml").write_text('schema = 1\nname = "upgrade"\n\n[[patch]]\nid = "upgrade"\n'
                                         'file = "upgrade.patch"\npackage = "diffusers"\nversions = "==0.38.0"\n'
                                         "strip = 1\n")
    pristine = snapshot(site)
    applied = cli("apply", "--site", site, "--patches", patches, "--json")
    assert applied.code == 0, applied.stdout
    made = [a for a in applied.json()["actions"] if "creates director" in a["detail"]]
    assert len(made) == 52, len(made)
    new = sorted(set(snapshot(site)) - set(pristine))
    assert "diffusers/modular_pipelines/stable_diffusion_3" in new
    assert cli("verify", "--site", site, "--patches", patches).code == 0
    assert cli("revert", "--site", site).code == 0
    assert snapshot(site) == pristine
