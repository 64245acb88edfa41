"""A read-only image (the container's health check): status and verify work without writing."""
from __future__ import annotations

from pathlib import Path

from faultkit import cli, fault_set
from support.tree import snapshot


def test_verify_and_status_on_a_read_only_site(site: Path, tmp_path: Path, mounts) -> None:
    patches = fault_set(site, tmp_path / "set")
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    before = snapshot(site)
    mounts.readonly(site)
    verified = cli("verify", "--site", site, "--patches", patches)
    assert verified.code == 0, verified.stderr
    assert cli("status", "--site", site, "--patches", patches).code == 0
    refused = cli("revert", "--site", site)
    assert refused.code == 7 and "read-only" in (refused.stderr + refused.stdout)
    mounts.undo()
    assert snapshot(site) == before
