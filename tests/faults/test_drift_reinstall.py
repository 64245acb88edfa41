"""Files changed behind the tool's back: edited after apply, edited before apply, or replaced by pip."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from faultkit import DISPATCH, OMNI_PIPELINE, STATE, TRANSFORMER, changed, cli, fault_set, settled, tree
from support.patchsets import PatchDef, file_diff, insert_after, write_patchset
from support.realpkgs import VLLM_OMNI, wheel
from support.tree import file_record_digest, record_sha256


def _pip_over(site: Path, name: str, version: str) -> None:
    """Reinstall or upgrade a real wheel over SITE the way pip does it (files replaced)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
                    "--disable-pip-version-check", "--upgrade", "--force-reinstall", "--target", str(site),
                    str(wheel(name, version))], check=True, capture_output=True)


def test_hand_edit_after_apply(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    pristine = tree(site)
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    edited = (site / DISPATCH).read_bytes() + b"# tuned by hand\n"
    (site / DISPATCH).write_bytes(edited)

    verify = cli("verify", "--site", site, "--patches", patches)
    assert verify.code == 6
    assert any(DISPATCH in line and "changed after apply" in line for line in verify.stdout.splitlines()), verify.stdout

    before = settled(site)
    refused = cli("revert", "--site", site)
    assert refused.code == 6 and DISPATCH in refused.reason and "changed since apply" in refused.reason
    assert settled(site) == before

    forced = cli("revert", "--site", site, "--force", "--json").json()
    assert forced["exit_code"] == 0
    note = next(n for n in forced["notes"] if n.startswith("--force"))
    assert DISPATCH in note and "saved to" in note
    saved = Path(note.rsplit("saved to ", 1)[1])
    assert saved.read_bytes() == edited, "the overwritten bytes must be kept"
    assert tree(site) == pristine, changed(pristine, tree(site))


def test_modified_by_someone_else_before_apply_is_refused(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    for edit in (lambda text: text.replace("import torch\n", "import torch  # local\n", 1),
                 lambda text: text + "# a local change far from any hunk\n"):
        original = (site / DISPATCH).read_text()
        (site / DISPATCH).write_text(edit(original))
        before = settled(site)
        result = cli("apply", "--site", site, "--patches", patches)
        assert result.code == 6, result.stdout + result.stderr
        assert "dispatch" in result.reason and DISPATCH in result.reason
        assert settled(site) == before, "nothing may be written"
        (site / DISPATCH).write_text(original)


def test_reinstall_after_apply_makes_manifest_stale_then_apply_works(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    _pip_over(site, *VLLM_OMNI)
    assert file_record_digest(site / OMNI_PIPELINE) == record_sha256(site, "vllm_omni-0.20.0.dist-info", OMNI_PIPELINE)

    status = {p["id"]: p for p in cli("status", "--site", site, "--patches", patches, "--json").json()["patches"]}
    assert status["omni"]["state"] == "not-applied" and status["omni"]["manifest_stale"] is True
    assert status["rope"]["state"] == "applied" and status["rope"]["manifest_stale"] is False
    assert cli("verify", "--site", site, "--patches", patches).code == 1

    assert cli("apply", "--site", site, "--patches", patches).code == 0
    assert cli("verify", "--site", site, "--patches", patches).code == 0
    assert cli("revert", "--site", site).code == 0
    for rel, dist in ((TRANSFORMER, "diffusers-0.38.0.dist-info"), (OMNI_PIPELINE, "vllm_omni-0.20.0.dist-info")):
        assert file_record_digest(site / rel) == record_sha256(site, dist, rel)
    assert not (site / STATE).exists()


def test_upgrade_to_another_release_after_apply(site: Path, tmp_path: Path):
    """diffusers 0.38.0 -> 0.39.0 (real wheel) over a patched site."""
    patches = write_patchset(tmp_path / "set", [
        PatchDef("dispatch", "diffusers", "diffusers",
                 file_diff(site, DISPATCH, insert_after("import torch", "FAULT_MARK = \"dispatch-mark\"\n")),
                 versions=">=0.38,<0.40", probes=[{"file": DISPATCH, "kind": "string", "value": "dispatch-mark"}]),
    ])
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    _pip_over(site, "diffusers", "0.39.0")
    assert file_record_digest(site / DISPATCH) == record_sha256(site, "diffusers-0.39.0.dist-info", DISPATCH)

    status = cli("status", "--site", site, "--patches", patches, "--json").json()["patches"][0]
    assert status["state"] == "not-applied" and status["manifest_stale"] is True
    assert status["installed_version"] == "0.39.0" and "0.38.0" in status["reason"]
    assert cli("verify", "--site", site, "--patches", patches).code == 1

    assert cli("apply", "--site", site, "--patches", patches).code == 0
    assert cli("verify", "--site", site, "--patches", patches).code == 0
    assert cli("revert", "--site", site).code == 0
    assert file_record_digest(site / DISPATCH) == record_sha256(site, "diffusers-0.39.0.dist-info", DISPATCH)


def test_patch_file_edited_after_apply_marks_the_patch_drifted(site: Path, tmp_path: Path):
    """The installed files still match, but the patch in --patches DIR is no longer what was applied."""
    patches = fault_set(site, tmp_path / "set")
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    patch_file = patches / "dispatch.patch"
    patch_file.write_text("A note added to the patch after it was applied.\n" + patch_file.read_text())

    before = settled(site)
    verify = cli("verify", "--site", site, "--patches", patches)
    assert verify.code == 6, verify.stdout + verify.stderr
    assert "dispatch.patch changed since it was applied" in verify.stdout, verify.stdout
    status = cli("status", "--site", site, "--patches", patches, "--json").json()
    states = {p["id"]: p["state"] for p in status["patches"]}
    assert states["dispatch"] == "drifted" and states["rope"] == "applied", states
    assert settled(site) == before
