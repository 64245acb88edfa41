"""Fixtures for the authoring tests: real wheels installed with --no-deps, and the CLI in-process."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.realpkgs import DIFFUSERS, VLLM_OMNI, WHEELS, install_target, wheel

@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A fresh pip --no-deps --target tree of the real diffusers 0.38.0 and vllm-omni 0.20.0."""
    return install_target(tmp_path / "site", DIFFUSERS, VLLM_OMNI)


@pytest.fixture
def local_index(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make `pip download` find the cached real wheels without the network (pip reads PIP_* vars)."""
    wheel(*DIFFUSERS)
    wheel(*VLLM_OMNI)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(WHEELS))
    return WHEELS
