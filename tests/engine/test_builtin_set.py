"""The built-in patch set against the real diffusers 0.38.0 and vllm-omni 0.20.0 files, its diffusers
0.41+ variant against the real diffusers 0.41.0 and 0.42.1, its vllm-omni 0.30 variant against the real
vllm-omni 0.30.0, and the whole set's lifecycle on every vllm-omni release with the diffusers it pins."""
from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Callable

import pytest

from support.cli import cli
from ernie_patcher.patchset.probes import run_probe
from ernie_patcher.patchset.series import load_series
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target, wheel
from support.tree import file_record_digest, record_sha256, snapshot

SERIES = load_series()
VARIANT = "diffusers_attention_dispatch.v0_41.patch"
OMNI_VARIANT = "vllm_omni_ernie_image_transformer.v0_30.patch"
NEWER_DIFFUSERS = ("diffusers", "0.42.1")
NEWER_OMNI = ("vllm-omni", "0.30.0")
# The release each entry is proven on: diffusers 0.38.0 and vllm-omni 0.20.0, the releases the patches
# were written for; each variant the top of its range.
RELEASES = {spec.file: {VARIANT: (NEWER_DIFFUSERS,), OMNI_VARIANT: (NEWER_OMNI,)}.get(spec.file, (DIFFUSERS, VLLM_OMNI))
            for spec in SERIES.patches}
# Every published vllm-omni release the set supports (docs/patch-sets.md, the version matrix).
OMNI_RELEASES = ("0.20.0", "0.22.0", "0.24.0", "0.26.0", "0.28.0", "0.30.0")
PROBES = [(patch.file, index) for patch in SERIES.patches for index in range(len(patch.probes))]
DIST_INFO = {"diffusers": "diffusers-0.38.0.dist-info", "vllm-omni": "vllm_omni-0.20.0.dist-info"}
PRISTINE_RECORD = {  # from the diffusers 0.38.0 and vllm-omni 0.20.0 wheels' RECORD files
    "diffusers/models/transformers/transformer_ernie_image.py": "sha256=nlWYsseKaGFyGqAyAyVLEUZGxvPhPzyU96vINxH_PiU",
    "diffusers/models/attention_dispatch.py": "sha256=_JlnwNjbHRmJfIuHDlF89oKYIGc37MemJFM94JXiAhU",
    "vllm_omni/diffusion/models/ernie_image/ernie_image_transformer.py":
        "sha256=6afVgCcs7Yt-WSVZTZiEn4z8SOouPpi1CYGhRPNAWRc",
    "vllm_omni/diffusion/models/ernie_image/pipeline_ernie_image.py":
        "sha256=URQUVFnQj28wmCPESF8nfnZJP2Xnfwwmd7dIMtP2XKs",
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return install_target(tmp_path_factory.mktemp("pristine") / "site")


def _spec(file: str):
    return next(p for p in SERIES.patches if p.file == file)


def _only(releases: tuple[tuple[str, str], ...]) -> list[str]:
    """--only options for every patch of the packages in RELEASES."""
    packages = {name for name, _ in releases}
    return [arg for patch_id in SERIES.ids if SERIES.get(patch_id).package in packages for arg in ("--only", patch_id)]


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> Callable[[tuple[tuple[str, str], ...], bool], Path]:
    """Install trees of the real wheels of RELEASES, pristine or with every patch of their packages applied."""
    made: dict[tuple, Path] = {}

    def tree(releases: tuple[tuple[str, str], ...], applied: bool) -> Path:
        if (releases, applied) not in made:
            site = install_target(tmp_path_factory.mktemp("patched" if applied else "pristine") / "site", *releases)
            if applied:
                result = cli("apply", "--site", site, *_only(releases))
                assert result.code == 0, result.stdout + result.stderr
            made[(releases, applied)] = site
        return made[(releases, applied)]
    return tree


def test_the_set_has_the_five_patches_with_the_documents_file_names():
    assert SERIES.ids == ["diffusers-rope", "diffusers-attention", "omni-latent-sync", "omni-ulysses",
                          "omni-sp-transformer"]
    assert sorted(SERIES.get(i).file for i in SERIES.ids) == sorted([
        "diffusers_transformer_ernie_image.patch", "diffusers_attention_dispatch.patch",
        "vllm_omni_pipeline_ernie_image.patch", "vllm_omni_ernie_image_transformer.patch",
        "vllm_omni_ulysses_attention.patch"])
    assert [(p.id, p.tested) for p in SERIES.patches if p.file == VARIANT] == [("diffusers-attention", ">=0.41.0,<=0.42.1")]


@pytest.mark.parametrize("relpath", sorted(PRISTINE_RECORD))
def test_targets_are_the_pristine_release_files(pristine: Path, relpath: str):
    dist = DIST_INFO["diffusers" if relpath.startswith("diffusers/") else "vllm-omni"]
    assert record_sha256(pristine, dist, relpath) == PRISTINE_RECORD[relpath]
    assert file_record_digest(pristine / relpath) == PRISTINE_RECORD[relpath]


def test_every_patch_applies_exactly_to_the_release(pristine: Path):
    status = cli("status", "--site", pristine, "--json").json()
    assert {p["id"]: (p["state"], p["fit"], p["file"]) for p in status["patches"]} == {
        i: ("not-applied", "exact", SERIES.get(i).file) for i in SERIES.ids}


@pytest.mark.parametrize(("version", "fit"), [("0.41.0", "exact"), ("0.42.1", "offset")])
def test_the_variant_is_chosen_on_newer_diffusers_and_fits(trees, version: str, fit: str):
    site = trees((("diffusers", version),), False)
    status = cli("status", "--site", site, "--only", "diffusers-attention", "--json").json()
    (attention,) = status["patches"]
    assert (attention["file"], attention["versions"], attention["state"], attention["fit"]) == (
        VARIANT, ">=0.41.0,<=0.42.1", "not-applied", fit)
    assert [v["file"] for v in attention["variants"]] == ["diffusers_attention_dispatch.patch", VARIANT]


@pytest.mark.parametrize("patch", SERIES.patches, ids=lambda p: p.id)
def test_every_patch_declares_probes_and_explains_itself(patch):
    assert patch.probes, f"{patch.id} has no probe: verify could not tell it is in place"
    header = patch.text.split("\n--- ", 1)[0]
    assert len(header.strip().splitlines()) >= 3, f"{patch.file} does not open with a comment saying what it does"


@pytest.mark.parametrize("file, index", PROBES)
def test_probe_fails_on_pristine_and_passes_on_patched(trees, file: str, index: int):
    probe = _spec(file).probes[index]
    pristine, patched = trees(RELEASES[file], False), trees(RELEASES[file], True)
    before = (pristine / probe.file).read_bytes() if (pristine / probe.file).exists() else None
    after = (patched / probe.file).read_bytes()
    assert not run_probe(probe, before).passed, f"{probe.describe()} cannot fail: it passes on the pristine file"
    assert run_probe(probe, after).passed, f"{probe.describe()} fails on the patched file"


@pytest.mark.parametrize("file", sorted(RELEASES))
def test_patched_files_compile(trees, file: str):
    patched = trees(RELEASES[file], True)
    for relpath in {p.file for p in _spec(file).probes}:
        compile((patched / relpath).read_bytes(), relpath, "exec", dont_inherit=True)


def test_builtin_lifecycle_is_byte_exact(tmp_path: Path):
    site = install_target(tmp_path / "site")
    before = snapshot(site)
    assert cli("apply", "--site", site).code == 0
    assert cli("verify", "--site", site).code == 0
    assert cli("apply", "--site", site).code == 0
    assert cli("revert", "--site", site).code == 0
    for relpath, digest in PRISTINE_RECORD.items():
        assert file_record_digest(site / relpath) == digest
    assert snapshot(site) == before


def test_builtin_lifecycle_with_the_variant_is_byte_exact(tmp_path: Path):
    site = install_target(tmp_path / "site", NEWER_DIFFUSERS)
    before = snapshot(site)
    only = _only((NEWER_DIFFUSERS,))
    applied = cli("apply", "--site", site, *only, "--json")
    assert applied.code == 0, applied.stdout
    assert {p["id"]: p["file"] for p in applied.json()["patches"]}["diffusers-attention"] == VARIANT
    manifest = json.loads((site / ".ernie-patcher" / "manifest.json").read_text())
    assert manifest["patches"]["diffusers-attention"]["patch_sha256"] == _spec(VARIANT).digest()
    assert cli("verify", "--site", site, *only).code == 0
    assert cli("revert", "--site", site).code == 0
    assert snapshot(site) == before


def pinned_diffusers(omni_version: str) -> tuple[str, str]:
    """The diffusers release a vllm-omni wheel pins (Requires-Dist: diffusers==X); diffusers
    0.38.0, the release the patches were written for, where vllm-omni only sets a lower bound (0.20.0)."""
    with zipfile.ZipFile(wheel("vllm-omni", omni_version)) as archive:
        metadata = archive.read(f"vllm_omni-{omni_version}.dist-info/METADATA").decode()
    pin = re.search(r"^Requires-Dist: diffusers==([\w.]+)\s*$", metadata, re.MULTILINE)
    return ("diffusers", pin.group(1) if pin else DIFFUSERS[1])


@pytest.mark.parametrize("omni_version", OMNI_RELEASES)
def test_lifecycle_on_each_vllm_omni_release_with_its_diffusers(tmp_path: Path, omni_version: str):
    """Apply without --allow-untested, verify, revert byte-exact: the whole set on each release's real files."""
    releases = (pinned_diffusers(omni_version), ("vllm-omni", omni_version))
    site = install_target(tmp_path / "site", *releases)
    before = snapshot(site)
    applied = cli("apply", "--site", site, "--json")
    assert applied.code == 0, applied.stdout + applied.stderr
    rows = {p["id"]: p for p in applied.json()["patches"]}
    assert {i: (r["state"], r["untested"]) for i, r in rows.items()} == {i: ("applied", False) for i in SERIES.ids}
    expected = OMNI_VARIANT if omni_version == NEWER_OMNI[1] else "vllm_omni_ernie_image_transformer.patch"
    assert rows["omni-sp-transformer"]["file"] == expected
    assert cli("verify", "--site", site).code == 0
    assert cli("revert", "--site", site).code == 0
    assert snapshot(site) == before
