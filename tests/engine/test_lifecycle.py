"""Issue contract 1-3 and 8: apply / verify / revert on the real files, all or nothing, version gate."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from ernie_patcher.cli.jsondoc import SCHEMA
from support.cli import DISPATCH, OMNI_PIPELINE, TRANSFORMER, cli, run
from support.patchsets import PatchDef, file_diff, insert_after, new_file_diff, write_patchset
from support.tree import file_record_digest, record_sha256, snapshot

CREATED = "vllm_omni/diffusion/models/ernie_image/extra_helpers.py"


def own_set(site: Path, directory: Path, *, omni_version: str = "==0.20.0", last_conflicts: bool = False) -> Path:
    """Three patches of our own against the real files: two diffusers edits, one vllm-omni file pair."""
    omni_edit = insert_after("import torch", "TEST_MARKER_OMNI = True\n")
    omni_diff = file_diff(site, OMNI_PIPELINE, omni_edit) + new_file_diff(CREATED, ["def helper():\n", "    return 1\n"])
    if last_conflicts:
        omni_diff = omni_diff.replace(" import torch\n", " import torch_that_is_not_there\n", 1)
    return write_patchset(directory, [
        PatchDef("rope", "diffusers", "diffusers", file_diff(site, TRANSFORMER, insert_after("import torch", "ROPE_MARK = \"rope-mark\"\n")),
                 probes=[{"file": TRANSFORMER, "kind": "string", "value": "rope-mark"}]),
        PatchDef("dispatch", "diffusers", "diffusers", file_diff(site, DISPATCH, insert_after("import torch", "DISPATCH_MARK = \"dispatch-mark\"\n")),
                 probes=[{"file": DISPATCH, "kind": "string", "value": "dispatch-mark"}]),
        PatchDef("omni", "vllm-omni", "vllm_omni", omni_diff, versions=omni_version,
                 probes=[{"file": CREATED, "kind": "function", "name": "helper", "params": []}]),
    ])


def test_full_lifecycle_restores_every_byte(site: Path, tmp_path: Path):
    patches = own_set(site, tmp_path / "set")
    pristine = snapshot(site)

    status = cli("status", "--site", site, "--patches", patches, "--json").json()
    assert [p["state"] for p in status["patches"]] == ["not-applied"] * 3
    assert not (site / ".ernie-patcher").exists(), "status must not write"

    applied = cli("apply", "--site", site, "--patches", patches, "--json")
    assert applied.code == 0, applied.stdout
    assert b"ROPE_MARK" in (site / TRANSFORMER).read_bytes()
    assert (site / CREATED).exists()
    assert (site / ".ernie-patcher" / "manifest.json").exists()

    assert cli("verify", "--site", site, "--patches", patches).code == 0
    again = cli("apply", "--site", site, "--patches", patches, "--json").json()
    assert again["exit_code"] == 0 and again["actions"] == []

    reverted = cli("revert", "--site", site, "--json")
    assert reverted.code == 0, reverted.stdout
    for rel, dist in ((TRANSFORMER, "diffusers-0.38.0.dist-info"), (DISPATCH, "diffusers-0.38.0.dist-info"),
                      (OMNI_PIPELINE, "vllm_omni-0.20.0.dist-info")):
        assert file_record_digest(site / rel) == record_sha256(site, dist, rel)
    assert not (site / CREATED).exists()
    assert not (site / ".ernie-patcher").exists()
    assert snapshot(site) == pristine
    assert cli("revert", "--site", site).code == 0


def test_manifest_records_what_was_done(site: Path, tmp_path: Path):
    import json

    patches = own_set(site, tmp_path / "set")
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    manifest = json.loads((site / ".ernie-patcher" / "manifest.json").read_text())
    assert manifest["schema"] == 3 and manifest["tool"] == "ernie-patcher" and manifest["tool_version"]
    assert set(manifest["patches"]) == {"rope", "dispatch", "omni"}
    assert all(len(p["patch_sha256"]) == 64 for p in manifest["patches"].values())
    files = {entry["relpath"]: entry for entry in manifest["files"].values()}
    assert files[TRANSFORMER]["action"] == "modify" and files[TRANSFORMER]["version"] == "0.38.0"
    assert files[CREATED]["action"] == "create" and files[CREATED]["before"] is None
    assert files["vllm_omni-0.20.0.dist-info/RECORD"]["action"] == "register"
    assert files[TRANSFORMER]["before"] != files[TRANSFORMER]["after"]


def test_conflict_in_last_patch_writes_nothing(site: Path, tmp_path: Path):
    patches = own_set(site, tmp_path / "set", last_conflicts=True)
    before = snapshot(site)
    result = cli("apply", "--site", site, "--patches", patches)
    assert result.code == 5
    assert "omni" in result.stderr.splitlines()[0] and "does not match" in result.stderr
    assert snapshot(site) == before, "diffusers files must stay untouched; no manifest, no state dir"


def test_version_gate_refuses_then_allow_untested_tries(site: Path, tmp_path: Path):
    patches = own_set(site, tmp_path / "set", omni_version=">=0.21,<0.22")
    before = snapshot(site)
    refused = cli("apply", "--site", site, "--patches", patches)
    assert refused.code == 4
    assert "0.20.0" in refused.stderr and ">=0.21" in refused.stderr.replace("<0.22,", "")
    assert snapshot(site) == before
    allowed = cli("apply", "--site", site, "--patches", patches, "--allow-untested", "--json")
    assert allowed.code == 0
    assert any("--allow-untested" in n for n in allowed.json()["notes"])


def test_allow_untested_still_refuses_conflicts(site: Path, tmp_path: Path):
    patches = own_set(site, tmp_path / "set", omni_version="==9.9", last_conflicts=True)
    before = snapshot(site)
    assert cli("apply", "--site", site, "--patches", patches, "--allow-untested").code == 5
    assert snapshot(site) == before


def test_offsets_are_found_and_reported(site: Path, tmp_path: Path):
    real = (site / TRANSFORMER).read_text().splitlines(True)
    shifted_base = real[:5] + real[12:]
    diff = file_diff(site, TRANSFORMER, insert_after("class ErnieImageSingleStreamAttnProcessor", "    MARK = 1\n"),
                     base_lines=shifted_base)
    patches = write_patchset(tmp_path / "set", [PatchDef("shifted", "diffusers", "diffusers", diff)])
    status = cli("status", "--site", site, "--patches", patches, "--json").json()
    assert status["patches"][0]["fit"] == "offset"
    assert status["patches"][0]["files"][0]["offsets"] == [7]
    result = cli("apply", "--site", site, "--patches", patches, "--json").json()
    assert "offsets +7" in result["actions"][0]["detail"]


def test_mode_and_owner_are_kept(site: Path, tmp_path: Path):
    patches = own_set(site, tmp_path / "set")
    target = site / TRANSFORMER
    os.chmod(target, 0o640)
    if os.geteuid() == 0:
        os.chown(target, 4321, 4322)
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    st = target.stat()
    assert st.st_mode & 0o7777 == 0o640
    if os.geteuid() == 0:
        assert (st.st_uid, st.st_gid) == (4321, 4322)
    assert cli("revert", "--site", site).code == 0
    assert target.stat().st_mode & 0o7777 == 0o640


def test_crash_between_files_is_recovered(site: Path, tmp_path: Path):
    patches = own_set(site, tmp_path / "set")
    pristine = snapshot(site)
    killed = run("apply", "--site", site, "--patches", patches, env={"ERNIE_PATCHER_TEST_KILL_AT": "file-2-written"})
    assert killed.code == -9
    assert b"ROPE_MARK" in (site / TRANSFORMER).read_bytes(), "the crash left a half-patched environment"
    assert (site / ".ernie-patcher" / "journal.json").exists()
    status = cli("status", "--site", site, "--patches", patches, "--json").json()
    assert any("recovered an interrupted apply" in n for n in status["notes"])
    assert [p["state"] for p in status["patches"]] == ["not-applied"] * 3
    assert snapshot(site) == pristine
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    assert cli("verify", "--site", site, "--patches", patches).code == 0


def test_verify_fails_when_not_applied_and_when_a_probe_fails(site: Path, tmp_path: Path):
    patches = own_set(site, tmp_path / "set")
    missing = cli("verify", "--site", site, "--patches", patches)
    assert missing.code == 1
    assert missing.stderr.startswith("error: verify failed: rope: "), "a failed build step must say why on stderr"
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    series = (patches / "series.toml").read_text()
    (patches / "series.toml").write_text(series.replace('value = "rope-mark"', 'value = "NOT_THERE"'))
    result = cli("verify", "--site", site, "--patches", patches, "--json").json()
    assert result["exit_code"] == 1
    rope = next(p for p in result["patches"] if p["id"] == "rope")
    assert rope["state"] == "applied" and rope["probes"][0]["passed"] is False


def test_only_selects_patches_and_apply_adds_the_rest_later(site: Path, tmp_path: Path):
    patches = own_set(site, tmp_path / "set")
    assert cli("apply", "--site", site, "--patches", patches, "--only", "rope").code == 0
    states = {p["id"]: p["state"] for p in cli("status", "--site", site, "--patches", patches, "--json").json()["patches"]}
    assert states == {"rope": "applied", "dispatch": "not-applied", "omni": "not-applied"}
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    assert cli("verify", "--site", site, "--patches", patches).code == 0
    assert cli("revert", "--site", site).code == 0
    assert cli("status", "--site", site, "--patches", patches, "--json").json()["patches"][0]["state"] == "not-applied"


def test_dry_run_writes_nothing(site: Path, tmp_path: Path):
    patches = own_set(site, tmp_path / "set")
    before = snapshot(site)
    result = cli("apply", "--site", site, "--patches", patches, "--dry-run", "--json").json()
    assert result["dry_run"] and {a["action"] for a in result["actions"]} == {"patch", "create", "register"}
    assert snapshot(site) == before
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    applied = snapshot(site)
    assert cli("revert", "--site", site, "--dry-run").code == 0
    assert snapshot(site) == applied


def test_unknown_only_id_is_a_usage_error(site: Path, tmp_path: Path):
    patches = own_set(site, tmp_path / "set")
    result = cli("apply", "--site", site, "--patches", patches, "--only", "nope")
    assert result.code == 2 and "unknown patch id" in result.stderr


@pytest.mark.parametrize("command", ["status", "apply", "verify", "revert"])
def test_json_is_one_schema_versioned_document(site: Path, tmp_path: Path, command: str):
    patches = own_set(site, tmp_path / "set")
    extra = [] if command == "revert" else ["--patches", patches]
    document = cli(command, "--site", site, *extra, "--json").json()
    assert document["schema"] == SCHEMA and document["command"] == command
    for patch in document["patches"]:
        assert {"id", "package", "installed_version", "state", "files", "probes"} <= set(patch)
        assert patch["state"] in {"applied", "not-applied", "drifted", "conflict", "unsupported", "missing"}


def test_a_copied_environment_is_reverted_in_place_never_at_the_old_path(site: Path, tmp_path: Path):
    import shutil

    patches = own_set(site, tmp_path / "set")
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    copy = tmp_path / "copied-site"
    shutil.copytree(site, copy, symlinks=True)
    original_applied = snapshot(site)
    assert cli("verify", "--site", copy, "--patches", patches).code == 0
    assert cli("revert", "--site", copy).code == 0
    assert b"rope-mark" not in (copy / TRANSFORMER).read_bytes()
    assert snapshot(site) == original_applied, "revert of the copy wrote to the original environment"


def test_verify_reuses_a_probe_result_only_for_identical_bytes(site: Path, tmp_path: Path):
    import json

    patches = own_set(site, tmp_path / "set")
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    document = cli("verify", "--site", site, "--patches", patches, "--json").json()
    rope = next(p for p in document["patches"] if p["id"] == "rope")
    assert rope["probes"][0]["detail"].endswith("(file unchanged since apply)")
    fresh = cli("verify", "--site", site, "--patches", patches, "--json", "--reparse").json()
    assert not next(p for p in fresh["patches"] if p["id"] == "rope")["probes"][0]["detail"].endswith("apply)")
    manifest_path = site / ".ernie-patcher" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for memo in manifest["patches"]["rope"]["probes"].values():
        memo["file_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    again = cli("verify", "--site", site, "--patches", patches, "--json").json()
    assert not next(p for p in again["patches"] if p["id"] == "rope")["probes"][0]["detail"].endswith("apply)"), \
        "a result recorded for other bytes must not be reused"
