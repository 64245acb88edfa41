"""The series key `fixed-in` and the state `upstream`: a release that carries an equivalent fix needs no
patch. Through status, apply, verify, revert, list, --json (the shipped schema) and --exit-code; the
fast path never answers for it; and a patch that does not fit but whose probes already pass on the
release's own files is reported the same way, as a hint to set the key."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from support.cli import OMNI_PIPELINE, cli
from support.patchsets import PatchDef, builtin_copy, file_diff, insert_after, write_patchset
from support.tree import snapshot
from test_fastpath import run_quick

LATENT = "vllm_omni_pipeline_ernie_image.patch"
VALIDATOR = Draft202012Validator(json.loads(resources.files("ernie_patcher.schema")
                                            .joinpath("report.schema.json").read_text()))


def valid(document: dict) -> dict:
    errors = list(VALIDATOR.iter_errors(document))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:3]]
    return document


def states(document: dict) -> dict[str, str]:
    return {p["id"]: p["state"] for p in document["patches"]}


@pytest.fixture
def fixed_set(tmp_path: Path) -> Path:
    """The built-in set with omni-latent-sync declared fixed upstream before 0.22.0 (the site has 0.20.0)."""
    return builtin_copy(tmp_path / "set", versions={LATENT: ">=0.22.0,<=0.30.0"},
                        keys={LATENT: {"fixed-in": "<0.22.0"}})


def test_fixed_in_through_every_command(site: Path, fixed_set: Path):
    pipeline = (site / OMNI_PIPELINE).read_bytes()
    target = ("--site", site, "--patches", fixed_set)
    unapplied = cli("verify", *target, "--only", "omni-latent-sync", "--only", "omni-ulysses")
    assert unapplied.code == 1 and unapplied.reason.startswith("error: verify failed: omni-ulysses: ")

    status = valid(cli("status", *target, "--json").json())
    assert states(status)["omni-latent-sync"] == "upstream"
    latent = next(p for p in status["patches"] if p["id"] == "omni-latent-sync")
    assert latent["reason"] == "not needed: vllm-omni 0.20.0 carries an equivalent fix (fixed-in <0.22.0)"
    assert latent["fit"] is None and latent["files"] == [] and latent["probes"] == []
    assert cli("status", *target, "--exit-code").code == 1  # the others are not applied yet

    applied = cli("apply", *target, "--json")
    assert applied.code == 0, applied.stdout
    document = valid(applied.json())
    assert "omni-latent-sync: skipped, not needed: vllm-omni 0.20.0 carries an equivalent fix (fixed-in <0.22.0)" \
        in document["notes"]
    assert (site / OMNI_PIPELINE).read_bytes() == pipeline
    assert "omni-latent-sync" not in document["manifest_patches"]

    verified = cli("verify", *target, "--json")
    assert verified.code == 0 and states(valid(verified.json()))["omni-latent-sync"] == "upstream"
    plain = cli("verify", *target)
    assert plain.code == 0 and "verified: 4/5 patches applied, 1 fixed upstream," in plain.stdout
    assert "upstream" in next(line for line in plain.stdout.splitlines() if line.startswith("omni-latent-sync"))
    assert cli("status", *target, "--exit-code").code == 0
    again = cli("apply", *target, "--only", "omni-latent-sync")
    assert again.code == 0 and "nothing to do: every selected patch is already applied or fixed upstream" in again.stdout

    listed = valid(cli("list", "--patches", fixed_set, "--json").json())
    assert next(e for e in listed["series"] if e["id"] == "omni-latent-sync")["fixed_in"] == "<0.22.0"
    assert next(e for e in listed["series"] if e["id"] == "omni-ulysses")["fixed_in"] is None
    assert "fixed upstream in <0.22.0 (not applied there)" in cli("list", "--patches", fixed_set).stdout

    reverted = cli("revert", "--site", site)  # revert takes no --patches
    assert reverted.code == 0 and (site / OMNI_PIPELINE).read_bytes() == pipeline


@pytest.mark.parametrize("args", [("verify",), ("status", "--json"), ("verify", "--only", "omni-latent-sync")])
def test_the_fast_path_leaves_an_upstream_patch_to_the_engine(site: Path, fixed_set: Path, args: tuple[str, ...]):
    """Apply records only the patches it applied, so the fast path (every series id applied as
    recorded) misses and the engine answers: the same output, exit 0."""
    target = ("--site", site, "--patches", fixed_set)
    assert cli("apply", *target).code == 0
    code, out, loaded = run_quick(*args, *target)
    assert "ernie_patcher.core.engine" in loaded
    engine = cli(*args, *target)
    assert (code, out) == (engine.code, engine.stdout) and code == 0


def test_applied_as_recorded_stays_applied_when_the_key_is_added_later(site: Path, tmp_path: Path):
    """An environment patched before the series said `fixed-in` is reported as it is (applied, or drifted
    once edited); the key only decides for releases ernie-patch has not patched."""
    plain = builtin_copy(tmp_path / "plain")
    assert cli("apply", "--site", site, "--patches", plain).code == 0
    fixed = builtin_copy(tmp_path / "fixed", versions={LATENT: ">=0.22.0,<=0.30.0"},
                         keys={LATENT: {"fixed-in": "<0.22.0"}})
    status = cli("status", "--site", site, "--patches", fixed, "--json").json()
    assert states(status)["omni-latent-sync"] == "applied"
    path = site / OMNI_PIPELINE
    path.write_text(path.read_text(encoding="utf-8") + "# edited by hand\n", encoding="utf-8")
    status = cli("status", "--site", site, "--patches", fixed, "--json").json()
    latent = next(p for p in status["patches"] if p["id"] == "omni-latent-sync")
    assert latent["state"] == "unsupported" and latent["files"][0]["state"] == "drifted"  # never hidden as upstream
    assert cli("revert", "--site", site, "--force").code == 0


@pytest.mark.parametrize("keys,reason", [
    ({"fixed-in": "later"}, "'fixed-in' is not a PEP 440 specifier"),
    ({"fixed-in": ">=0.30.0"}, "'fixed-in' >=0.30.0 overlaps the tested range >=0.20.0,<=0.30.0"),
    ({"fixed-in": ""}, "'fixed-in' must be a non-empty string"),
], ids=["not-pep440", "overlaps-versions", "empty"])
def test_invalid_fixed_in_is_refused(tmp_path: Path, keys: dict, reason: str):
    patches = builtin_copy(tmp_path / "set", keys={LATENT: keys})
    result = cli("list", "--patches", patches, "--json")
    assert result.code == 2 and reason in result.json()["error"]["reason"]


def test_variants_share_one_fixed_in(tmp_path: Path):
    """`fixed-in` is the patch id's: given on one variant it holds for all; two different ones are refused."""
    one = builtin_copy(tmp_path / "one", keys={"vllm_omni_ernie_image_transformer.v0_30.patch": {"fixed-in": ">=0.32"}})
    listed = cli("list", "--patches", one, "--json").json()
    assert next(e for e in listed["series"] if e["id"] == "omni-sp-transformer")["fixed_in"] == ">=0.32"
    two = builtin_copy(tmp_path / "two", keys={"vllm_omni_ernie_image_transformer.v0_30.patch": {"fixed-in": ">=0.32"},
                                               "vllm_omni_ernie_image_transformer.patch": {"fixed-in": ">=0.34"}})
    result = cli("list", "--patches", two, "--json")
    assert result.code == 2 and "variants give different 'fixed-in' ranges" in result.json()["error"]["reason"]


def _stale_context_patch(site: Path, probes: list[dict]) -> PatchDef:
    """A patch to the real pipeline file whose context the release does not have (it conflicts)."""
    lines = (site / OMNI_PIPELINE).read_text(encoding="utf-8").splitlines(True)
    marker = next(i for i, line in enumerate(lines) if "class ErnieImagePipeline" in line)
    other_base = lines[:marker] + ["# a line this release does not have\n"] + lines[marker:]
    diff = file_diff(site, OMNI_PIPELINE, insert_after("# a line this release does not have", "FIX = 1\n"),
                     base_lines=other_base)
    return PatchDef("already-there", "vllm-omni", "vllm_omni", diff, versions=">=0.20.0", probes=probes)


PASSING_PROBE = {"file": OMNI_PIPELINE, "kind": "class", "name": "ErnieImagePipeline"}


def test_probes_passing_on_a_release_it_does_not_fit_are_a_hint_to_set_fixed_in(site: Path, tmp_path: Path):
    patches = write_patchset(tmp_path / "set", [_stale_context_patch(site, [PASSING_PROBE])])
    target = ("--site", site, "--patches", patches)
    before = snapshot(site)
    status = valid(cli("status", *target, "--json").json())
    (patch,) = status["patches"]
    assert patch["state"] == "upstream" and patch["fit"] == "conflict"
    assert patch["reason"].startswith("not needed, it seems: the patch does not fit vllm-omni 0.20.0, but its 1 "
                                      "probe(s) already pass on the files as released; set fixed-in = \">=0.20.0\"")
    assert "and take it out of 'versions'" in patch["reason"]
    applied = cli("apply", *target)
    assert applied.code == 0 and "note: already-there: skipped, not needed, it seems" in applied.stdout
    assert cli("verify", *target).code == 0 and cli("status", *target, "--exit-code").code == 0
    assert snapshot(site) == before


def test_no_hint_when_a_probe_fails_or_the_file_is_not_as_released(site: Path, tmp_path: Path):
    failing = write_patchset(tmp_path / "failing", [_stale_context_patch(
        site, [PASSING_PROBE, {"file": OMNI_PIPELINE, "kind": "function", "name": "not_in_the_release"}])])
    assert cli("status", "--site", site, "--patches", failing, "--json").json()["patches"][0]["state"] == "conflict"
    assert cli("apply", "--site", site, "--patches", failing).code == 5

    passing = write_patchset(tmp_path / "passing", [_stale_context_patch(site, [PASSING_PROBE])])
    path = site / OMNI_PIPELINE
    path.write_text(path.read_text(encoding="utf-8") + "# edited by hand\n", encoding="utf-8")
    assert cli("status", "--site", site, "--patches", passing, "--json").json()["patches"][0]["state"] == "drifted"
