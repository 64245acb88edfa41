"""State left behind is named: after `pip uninstall` of the patched packages, status says the
`.ernie-patcher/` directory keeps originals of packages that are gone and that revert clears it (and
revert does); `revert --force` keeps its copies in one place, `.ernie-patcher/overwritten/`, says so,
and leaves nothing else of the state behind; status names that directory while it is there."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from support.cli import TRANSFORMER, cli, run
from support.realpkgs import DIFFUSERS, VLLM_OMNI, make_venv


def test_state_of_uninstalled_packages_is_named_and_revert_clears_it(tmp_path: Path):
    python = make_venv(tmp_path / "venv", DIFFUSERS, VLLM_OMNI)
    assert run("apply", "--python", python, "-q").code == 0
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "diffusers", "vllm-omni"], check=True)
    state = next((tmp_path / "venv").glob("lib/python3.*/site-packages/.ernie-patcher"))
    status = run("status", "--python", python)
    assert status.code == 0
    notes = [line for line in status.stdout.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: {state} keeps the originals of 5 patch(es) (diffusers-attention, diffusers-rope, "
                     "omni-latent-sync, omni-sp-transformer, omni-ulysses) of diffusers, vllm-omni, no longer "
                     "installed; `ernie-patch revert` clears it"], status.stdout
    reverted = run("revert", "--python", python)
    assert reverted.code == 0, reverted.stderr
    assert "note: diffusers is no longer installed: nothing to restore for its 2 recorded file(s); the state kept " \
           "for them is removed" in reverted.stdout
    assert not state.exists()


def test_revert_force_keeps_its_copies_in_one_named_place(site: Path):
    assert cli("apply", "--site", site).code == 0
    path = site / TRANSFORMER
    path.write_text(path.read_text() + "# edited after apply\n")
    edited = path.read_bytes()
    state = site.resolve() / ".ernie-patcher"
    refused = cli("revert", "--site", site)
    assert refused.code == 6 and f"a copy of the edited files in {state / 'overwritten'}" in refused.stderr
    forced = cli("revert", "--site", site, "--force")
    assert forced.code == 0, forced.stderr
    saved = list((state / "overwritten").iterdir())
    assert [p.read_bytes() for p in saved] == [edited]
    assert f"its bytes were saved to {saved[0]}" in forced.stdout
    assert f"remove it when they are no longer needed" in forced.stdout
    assert sorted(p.name for p in state.iterdir()) == ["lock", "overwritten"]  # no manifest, no originals left
    status = cli("status", "--site", site)
    assert f"note: {state / 'overwritten'} holds 1 file(s) `revert --force` saved before overwriting them; " \
           "remove it when they are no longer needed" in status.stdout
    assert cli("apply", "--site", site).code == 0
    fast, engine = run("verify", "--site", site, "--json"), cli("verify", "--site", site, "--json")
    assert json.loads(fast.stdout)["notes"] == engine.json()["notes"] != []  # the fast path leaves it to the engine
    assert cli("revert", "--site", site).code == 0
    assert [p.read_bytes() for p in (state / "overwritten").iterdir()] == [edited]
