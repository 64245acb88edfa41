"""With ERNIE_SP_PORT_FROM=VERSION the tier runs on omni-sp-transformer as `ernie-patch port` carried it
from VERSION onto the release under test (conftest.patch_set): the patched tree holds that variant."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from .conftest import PORT_FROM, PORTED


@pytest.mark.skipif(not PORT_FROM, reason="ERNIE_SP_PORT_FROM is not set: the tier proves the built-in variants")
def test_the_patched_tree_holds_the_ported_variant(patched_site: Path, patch_set: Path):
    manifest = json.loads((patched_site / ".ernie-patcher" / "manifest.json").read_text(encoding="utf-8"))
    record = manifest["patches"][PORTED]
    variant = manifest["answer"]["patches"][PORTED]["file"]
    assert manifest["patch_dir"] == str(patch_set)
    assert "Ported by `ernie-patch port` from" in (patch_set / variant).read_text(encoding="utf-8")
    assert record["patch_sha256"] == hashlib.sha256((patch_set / variant).read_bytes()).hexdigest()
