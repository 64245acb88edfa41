"""The built-in patch set against the real diffusers 0.38.0 and vllm-omni 0.20.0 files."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli
from ernie_patcher.probes import run_probe
from ernie_patcher.series import load_series
from support.realpkgs import install_target
from support.tree import file_record_digest, record_sha256, snapshot

SERIES = load_series()
PROBES = [(patch.id, index) for patch in SERIES.patches for index in range(len(patch.probes))]
DIST_INFO = {"diffusers": "diffusers-0.38.0.dist-info", "vllm-omni": "vllm_omni-0.20.0.dist-info"}
PRISTINE_RECORD = {  # BRIEF section 2, from the wheels' RECORD files
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


@pytest.fixture(scope="module")
def patched(tmp_path_factory) -> Path:
    site = install_target(tmp_path_factory.mktemp("patched") / "site")
    result = cli("apply", "--site", site)
    assert result.code == 0, result.stdout + result.stderr
    return site


def test_the_set_has_the_five_patches_with_the_documents_file_names():
    assert sorted(p.file for p in SERIES.patches) == sorted([
        "diffusers_transformer_ernie_image.patch", "diffusers_attention_dispatch.patch",
        "vllm_omni_pipeline_ernie_image.patch", "vllm_omni_ernie_image_transformer.patch",
        "vllm_omni_ulysses_attention.patch"])


@pytest.mark.parametrize("relpath", sorted(PRISTINE_RECORD))
def test_targets_are_the_pristine_release_files(pristine: Path, relpath: str):
    dist = DIST_INFO["diffusers" if relpath.startswith("diffusers/") else "vllm-omni"]
    assert record_sha256(pristine, dist, relpath) == PRISTINE_RECORD[relpath]
    assert file_record_digest(pristine / relpath) == PRISTINE_RECORD[relpath]


def test_every_patch_applies_exactly_to_the_release(pristine: Path):
    status = cli("status", "--site", pristine, "--json").json()
    assert {p["id"]: (p["state"], p["fit"]) for p in status["patches"]} == {
        p.id: ("not-applied", "exact") for p in SERIES.patches}


@pytest.mark.parametrize("patch", SERIES.patches, ids=lambda p: p.id)
def test_every_patch_declares_probes_and_explains_itself(patch):
    assert patch.probes, f"{patch.id} has no probe: verify could not tell it is in place"
    header = patch.text.split("\n--- ", 1)[0]
    assert len(header.strip().splitlines()) >= 3, f"{patch.file} does not open with a comment saying what it does"


@pytest.mark.parametrize("patch_id, index", PROBES)
def test_probe_fails_on_pristine_and_passes_on_patched(pristine: Path, patched: Path, patch_id: str, index: int):
    probe = SERIES.get(patch_id).probes[index]
    before = (pristine / probe.file).read_bytes() if (pristine / probe.file).exists() else None
    after = (patched / probe.file).read_bytes()
    assert not run_probe(probe, before).passed, f"{probe.describe()} cannot fail: it passes on the pristine file"
    assert run_probe(probe, after).passed, f"{probe.describe()} fails on the patched file"


def test_patched_files_compile(patched: Path):
    for patch in SERIES.patches:
        for relpath in {p.file for p in patch.probes}:
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
