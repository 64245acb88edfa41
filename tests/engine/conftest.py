from __future__ import annotations

from pathlib import Path

import pytest

from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A fresh pip --no-deps --target tree of the real diffusers 0.38.0 and vllm-omni 0.20.0."""
    return install_target(tmp_path / "site", DIFFUSERS, VLLM_OMNI)
