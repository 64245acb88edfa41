"""Fixtures of the torch tier: real diffusers install trees, pristine and patched, and model runs.

Every fixture below is parametrized by the diffusers release (`diffusers_version`): 0.38.0, the release
the patches are written for, and 0.42.1, the top of the tested ranges of diffusers-rope and of the
0.41+ variant of diffusers-attention. The engine chooses each patch's variant for the installed
version, exactly as `ernie-patch apply` does.

diffusers is never imported from the test environment itself: each tree is a fresh
`pip install --no-deps --target` of the real wheel (tests/support/realpkgs.py), and model forwards run in
worker subprocesses whose PYTHONPATH starts with one tree (tests/numerics/worker.py).
"""
from __future__ import annotations

import base64
import csv
import hashlib
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Sequence

import pytest
import torch

from tests.support.realpkgs import install_target

REPO = Path(__file__).resolve().parents[2]
DIFFUSERS_RELEASES = ("0.38.0", "0.42.1")
DIFFUSERS_PATCHES = ("diffusers-rope", "diffusers-attention")
# The file of each patch the engine must choose per release (diffusers-attention has a 0.41+ variant).
EXPECTED_FILES = {
    "0.38.0": {"diffusers-rope": "diffusers_transformer_ernie_image.patch",
               "diffusers-attention": "diffusers_attention_dispatch.patch"},
    "0.42.1": {"diffusers-rope": "diffusers_transformer_ernie_image.patch",
               "diffusers-attention": "diffusers_attention_dispatch.v0_41.patch"},
}
TARGET_FILES = ("diffusers/models/transformers/transformer_ernie_image.py", "diffusers/models/attention_dispatch.py")
WORKER_TIMEOUT_S = 300


def apply_patches(site: Path, patch_ids: Sequence[str]) -> dict[str, str]:
    """Apply the built-in patches PATCH_IDS to the install tree SITE with the project's own engine (the one
    place the tests apply patches), all or nothing; the engine chooses each id's variant for the installed
    version. Checks that every one was applied; returns the patch file used per id."""
    from ernie_patcher.core.engine import Target, apply

    report = apply(Target(site=site), only=tuple(patch_ids))
    if report.error is not None:
        raise RuntimeError(f"ernie-patch apply failed: {report.error.reason}")
    applied = {p.spec.id: p.spec.file for p in report.patches if p.state == "applied"}
    assert set(applied) >= set(patch_ids), applied
    return applied


def record_digest(site: Path, relative: str) -> str:
    """The sha256 that the wheel's RECORD lists for RELATIVE."""
    (record,) = site.glob("diffusers-*.dist-info/RECORD")
    with record.open(newline="") as handle:
        for path, digest, _ in csv.reader(handle):
            if path == relative:
                return digest
    raise KeyError(f"{relative} is not in {record}")


def file_digest(path: Path) -> str:
    """sha256 of PATH in RECORD's notation."""
    raw = hashlib.sha256(path.read_bytes()).digest()
    return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.fixture(scope="session", params=DIFFUSERS_RELEASES, ids=lambda v: f"diffusers-{v}")
def diffusers_version(request: pytest.FixtureRequest) -> str:
    """The diffusers release the tests run on; every fixture below depends on it."""
    return request.param


@pytest.fixture(scope="session")
def pristine_site(tmp_path_factory: pytest.TempPathFactory, diffusers_version: str) -> Path:
    """The real diffusers files of DIFFUSERS_VERSION, checked against the wheel's RECORD."""
    site = install_target(tmp_path_factory.mktemp(f"pristine-{diffusers_version}") / "site",
                          ("diffusers", diffusers_version))
    for relative in TARGET_FILES:
        assert file_digest(site / relative) == record_digest(site, relative), f"{relative} is not pristine"
    return site


@pytest.fixture(scope="session")
def patched_site(tmp_path_factory: pytest.TempPathFactory, diffusers_version: str) -> Path:
    """The real diffusers of DIFFUSERS_VERSION with both diffusers patches applied (each id's variant for it)."""
    site = install_target(tmp_path_factory.mktemp(f"patched-{diffusers_version}") / "site",
                          ("diffusers", diffusers_version))
    assert apply_patches(site, DIFFUSERS_PATCHES) == EXPECTED_FILES[diffusers_version]
    for relative in TARGET_FILES:
        assert file_digest(site / relative) != record_digest(site, relative), f"{relative} was not patched"
    return site


def _start_worker(site: Path, scenario: str, output: Path) -> subprocess.Popen[str]:
    # The tier's PYTHONPATH (the mindiesd overlay) stays after the tree and the repository.
    paths = [str(site), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.numerics.worker", scenario, str(output)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="session")
def model_runs(
    pristine_site: Path, patched_site: Path, tmp_path_factory: pytest.TempPathFactory, diffusers_version: str
) -> dict[tuple[str, str], dict[str, Any]]:
    """Worker results keyed by (tree, scenario), tree in {"pristine", "patched"}, scenario in {"cpu", "npu"},
    plus ("patched", "npu_bf16"): the patched NPU path in bfloat16.

    The five workers run concurrently; each builds the same seeded tiny models (their weight digests
    are compared by the tests).
    """
    out_dir = tmp_path_factory.mktemp(f"runs-{diffusers_version}")
    sites = {"pristine": pristine_site, "patched": patched_site}
    runs = [(tree, scenario) for tree in sites for scenario in ("cpu", "npu")] + [("patched", "npu_bf16")]
    jobs = {
        (tree, scenario): (_start_worker(sites[tree], scenario, out_dir / f"{tree}-{scenario}.pt"), out_dir / f"{tree}-{scenario}.pt")
        for tree, scenario in runs
    }
    results: dict[tuple[str, str], dict[str, Any]] = {}
    for key, (process, output) in jobs.items():
        log, _ = process.communicate(timeout=WORKER_TIMEOUT_S)
        assert process.returncode == 0, f"worker {key} failed:\n{log}"
        results[key] = torch.load(output)
        assert Path(results[key]["diffusers_file"]).is_relative_to(sites[key[0]]), results[key]["diffusers_file"]
    return results


@pytest.fixture(scope="session")
def patched_dispatch(patched_site: Path) -> Iterator[ModuleType]:
    """diffusers.models.attention_dispatch imported, in this process, from the patched tree."""
    assert "diffusers" not in sys.modules, "diffusers was imported from somewhere else first"
    sys.path.insert(0, str(patched_site))
    try:
        module = importlib.import_module("diffusers.models.attention_dispatch")
        assert Path(module.__file__).is_relative_to(patched_site), module.__file__
        yield module
    finally:
        sys.path.remove(str(patched_site))
        for name in [name for name in sys.modules if name == "diffusers" or name.startswith("diffusers.")]:
            del sys.modules[name]
