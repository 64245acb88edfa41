"""Fixtures of the torch tier: real diffusers 0.38.0 install trees, pristine and patched, and model runs.

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

from tests.support.realpkgs import DIFFUSERS, install_target

REPO = Path(__file__).resolve().parents[2]
PATCHES = REPO / "patches"
DIFFUSERS_PATCHES = ("diffusers_transformer_ernie_image.patch", "diffusers_attention_dispatch.patch")
TARGET_FILES = ("diffusers/models/transformers/transformer_ernie_image.py", "diffusers/models/attention_dispatch.py")
WORKER_TIMEOUT_S = 300


def apply_patches(site: Path, patch_files: Sequence[Path]) -> None:
    """Apply PATCH_FILES to the install tree SITE with the project's own engine (the one place
    the tests apply patches), all or nothing, and check that it applied every one of them."""
    from ernie_patcher.engine import Target, apply
    from ernie_patcher.series import load_series

    series = load_series()
    by_file = {spec.path.resolve(): spec.id for spec in series.patches}
    ids = tuple(by_file[Path(p).resolve()] for p in patch_files)
    report = apply(Target(site=site), only=ids)
    if report.error is not None:
        raise RuntimeError(f"ernie-patch apply failed: {report.error.reason}")
    assert {p.spec.id for p in report.patches if p.state == "applied"} >= set(ids)


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


@pytest.fixture(scope="session")
def pristine_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real diffusers 0.38.0 files, checked against the wheel's RECORD."""
    site = install_target(tmp_path_factory.mktemp("pristine") / "site", DIFFUSERS)
    for relative in TARGET_FILES:
        assert file_digest(site / relative) == record_digest(site, relative), f"{relative} is not pristine"
    return site


@pytest.fixture(scope="session")
def patched_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real diffusers 0.38.0 with both diffusers patches applied."""
    site = install_target(tmp_path_factory.mktemp("patched") / "site", DIFFUSERS)
    apply_patches(site, [PATCHES / name for name in DIFFUSERS_PATCHES])
    for relative in TARGET_FILES:
        assert file_digest(site / relative) != record_digest(site, relative), f"{relative} was not patched"
    return site


def _start_worker(site: Path, scenario: str, output: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), PYTHONDONTWRITEBYTECODE="1")
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
    pristine_site: Path, patched_site: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], dict[str, Any]]:
    """Worker results keyed by (tree, scenario), tree in {"pristine", "patched"}, scenario in {"cpu", "npu"}.

    The four workers run concurrently; each builds the same seeded tiny models (their weight digests
    are compared by the tests).
    """
    out_dir = tmp_path_factory.mktemp("runs")
    sites = {"pristine": pristine_site, "patched": patched_site}
    jobs = {
        (tree, scenario): (_start_worker(site, scenario, out_dir / f"{tree}-{scenario}.pt"), out_dir / f"{tree}-{scenario}.pt")
        for tree, site in sites.items()
        for scenario in ("cpu", "npu")
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
