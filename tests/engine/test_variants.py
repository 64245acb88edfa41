"""Versioned variants: several [[patch]] entries sharing one id, each with its own file and range.

Exactly one variant is used per id: the one whose range covers the installed version (two covering it:
the set is refused, exit 2; none: unsupported, exit 4, naming every range; with --allow-untested the
first in series order that fits). Patch sets of the tests' own, on the real diffusers 0.38.0 files.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from support.cli import DISPATCH, TRANSFORMER, cli
from support.patchsets import PatchDef, file_diff, insert_after, write_patchset
from support.tree import snapshot

ID = "mark"


def _variant(site: Path, letter: str, versions: str, relpath: str = DISPATCH) -> PatchDef:
    """A variant of patch `mark` adding MARK_<letter> to RELPATH, with a probe for it."""
    diff = file_diff(site, relpath, insert_after("import torch", f'MARK_{letter} = "mark-{letter}"\n'))
    return PatchDef(ID, "diffusers", "diffusers", diff, versions=versions, file=f"mark-{letter}.patch",
                    probes=[{"file": relpath, "kind": "string", "value": f"mark-{letter}"}])


def _conflicting(patch: PatchDef) -> PatchDef:
    """PATCH with the context of its last file changed so that it no longer matches the release."""
    head, sep, tail = patch.diff.rpartition(" import torch\n")
    patch.diff = head + sep.replace("torch", "torch_that_is_not_there") + tail
    return patch


def _entry(document: dict, patch_id: str = ID) -> dict:
    return next(p for p in document["patches"] if p["id"] == patch_id)


@pytest.mark.parametrize("covering", ["a", "b"])
def test_the_variant_covering_the_installed_version_is_used(site: Path, tmp_path: Path, covering: str):
    ranges = {"a": "<0.38", "b": "==0.38.0"} if covering == "b" else {"a": "==0.38.0", "b": ">=0.39,<0.40"}
    other = "a" if covering == "b" else "b"
    patches = write_patchset(tmp_path / "set", [
        _variant(site, "a", ranges["a"]), _variant(site, "b", ranges["b"]),
        PatchDef("user", "diffusers", "diffusers",
                 file_diff(site, TRANSFORMER, insert_after("import torch", "USER = 1\n")), extra={"requires": [ID]})])
    pristine = snapshot(site)

    status = cli("status", "--site", site, "--patches", patches, "--json").json()
    assert [p["id"] for p in status["patches"]] == [ID, "user"]
    mark = _entry(status)
    assert (mark["file"], mark["versions"], mark["state"]) == (f"mark-{covering}.patch", ranges[covering], "not-applied")
    assert mark["variants"] == [{"file": "mark-a.patch", "versions": ranges["a"]},
                                {"file": "mark-b.patch", "versions": ranges["b"]}]
    plain = cli("status", "--site", site, "--patches", patches).stdout
    assert f"{ID}: variant mark-{covering}.patch ({ranges[covering]}), covers the installed version" in plain

    applied = cli("apply", "--site", site, "--patches", patches, "--only", "user", "--json")
    assert applied.code == 0, applied.stdout
    assert any(f"also selected, as required: {ID}" in n for n in applied.json()["notes"])
    text = (site / DISPATCH).read_text()
    assert f"mark-{covering}" in text and f"mark-{other}" not in text
    manifest = json.loads((site / ".ernie-patcher" / "manifest.json").read_text())
    assert sorted(manifest["patches"]) == [ID, "user"]
    digest = hashlib.sha256((patches / f"mark-{covering}.patch").read_bytes()).hexdigest()
    assert manifest["patches"][ID]["patch_sha256"] == digest

    verified = cli("verify", "--site", site, "--patches", patches, "--only", ID, "--json").json()
    assert verified["exit_code"] == 0 and _entry(verified)["state"] == "applied"
    assert _entry(verified)["file"] == f"mark-{covering}.patch"
    assert cli("revert", "--site", site).code == 0
    assert snapshot(site) == pristine


def test_no_variant_covering_the_version_is_unsupported_naming_every_range(site: Path, tmp_path: Path):
    patches = write_patchset(tmp_path / "set", [_variant(site, "a", "<0.38"), _variant(site, "b", ">=0.39,<0.40")])
    before = snapshot(site)
    refused = cli("apply", "--site", site, "--patches", patches)
    assert refused.code == 4
    first = refused.stderr.splitlines()[0]
    assert "0.38.0" in first and "every variant" in first
    assert "<0.38 (mark-a.patch)" in first and ">=0.39,<0.40 (mark-b.patch)" in first
    assert snapshot(site) == before
    status = _entry(cli("status", "--site", site, "--patches", patches, "--json").json())
    assert (status["state"], status["fit"], status["file"]) == ("unsupported", "exact", "mark-a.patch")


def test_variants_both_covering_the_version_refuse_the_set(site: Path, tmp_path: Path):
    # No version named in either range lies in both, so loading accepts them; 0.38.0 is in both.
    patches = write_patchset(tmp_path / "set", [
        _variant(site, "a", ">0.37.9"), _variant(site, "b", "<0.38.1"),
        PatchDef("other", "diffusers", "diffusers",
                 file_diff(site, TRANSFORMER, insert_after("import torch", "OTHER = 1\n")))])
    before = snapshot(site)
    for command in (["status"], ["apply"], ["apply", "--only", "other"], ["verify"]):
        result = cli(*command, "--site", site, "--patches", patches)
        assert result.code == 2, (command, result.stdout, result.stderr)
        first = result.stderr.splitlines()[0]
        assert "ambiguous" in first and "diffusers 0.38.0" in first
        assert "mark-a.patch (>0.37.9)" in first and "mark-b.patch (<0.38.1)" in first
    assert snapshot(site) == before


def test_allow_untested_uses_the_first_variant_that_fits(site: Path, tmp_path: Path):
    # a: its first file fits, its second conflicts (tried, then taken back); b and c both fit.
    a = _variant(site, "a", "<0.38", relpath=TRANSFORMER)
    a.diff += _conflicting(_variant(site, "a", "<0.38")).diff
    patches = write_patchset(tmp_path / "set", [
        a, _variant(site, "b", ">=0.39,<0.40", relpath=TRANSFORMER), _variant(site, "c", ">=0.40,<0.41")])
    pristine = snapshot(site)

    status = _entry(cli("status", "--site", site, "--patches", patches, "--json").json())
    assert (status["state"], status["fit"], status["file"]) == ("unsupported", "exact", "mark-b.patch")
    assert cli("apply", "--site", site, "--patches", patches).code == 4

    applied = cli("apply", "--site", site, "--patches", patches, "--allow-untested", "--json")
    assert applied.code == 0, applied.stdout
    assert _entry(applied.json())["file"] == "mark-b.patch"
    assert any("trying variant mark-b.patch (>=0.39,<0.40), the first that fits" in n for n in applied.json()["notes"])
    transformer = (site / TRANSFORMER).read_text()
    assert "mark-b" in transformer and "mark-a" not in transformer, "a variant tried and not used left its bytes"
    assert "mark-c" not in (site / DISPATCH).read_text()

    after = _entry(cli("status", "--site", site, "--patches", patches, "--json").json())
    assert (after["state"], after["file"]) == ("applied", "mark-b.patch")
    assert cli("verify", "--site", site, "--patches", patches).code == 0
    assert cli("revert", "--site", site).code == 0
    assert snapshot(site) == pristine


@pytest.mark.parametrize(("second", "message"), [
    (dict(file="mark-a.patch", versions=">=0.39"), "same file"),
    (dict(versions="==0.38.0"), "overlapping"),
    (dict(versions="<=0.38.0"), "overlapping"),
    (dict(package="vllm-omni", module="vllm_omni", versions=">=0.39"), "variant #2 is for vllm-omni"),
], ids=["same-file", "same-range", "shared-boundary", "other-package"])
def test_invalid_variants_are_refused_when_the_set_loads(site: Path, tmp_path: Path, second: dict, message: str):
    b = _variant(site, "b", second.get("versions", ">=0.39"))
    b.file = second.get("file", b.file)
    b.package, b.module = second.get("package", b.package), second.get("module", b.module)
    b.probes = [] if b.package != "diffusers" else b.probes
    patches = write_patchset(tmp_path / "set", [_variant(site, "a", "==0.38.0"), b])
    result = cli("status", "--site", site, "--patches", patches)
    assert result.code == 2
    first = result.stderr.splitlines()[0]
    assert "invalid series file" in first and f"patch '{ID}'" in first and message in first
