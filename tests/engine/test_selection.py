"""One selection from apply to the health check: what `apply --only` was given is recorded in the
manifest; verify, `status --exit-code` and revert default to it (the fast path hands that case to the
engine and gives the same answer); `revert --only ID` takes out ID and the applied patches requiring
it, byte for byte; a selection that cannot be reverted alone is refused."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from support.cli import OMNI_DIR, TRANSFORMER, cli, run
from support.patchsets import PatchDef, file_diff, insert_after, write_patchset

SERVE_ONLY = ("omni-latent-sync", "omni-sp-transformer")  # omni-sp-transformer requires omni-ulysses


def _only(*ids: str) -> list[str]:
    return [word for patch_id in ids for word in ("--only", patch_id)]


def _manifest(site: Path) -> dict:
    return json.loads((site / ".ernie-patcher" / "manifest.json").read_text())


def _digests(site: Path) -> dict[str, str]:
    return {str(p.relative_to(site)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(site.rglob("*"))
            if p.is_file() and ".ernie-patcher" not in p.parts and "__pycache__" not in p.parts}


def test_apply_only_then_verify_and_gate_check_that_selection(site: Path):
    assert cli("apply", "--site", site, *_only(*SERVE_ONLY)).code == 0
    assert _manifest(site)["selected"] == ["omni-latent-sync", "omni-ulysses", "omni-sp-transformer"]
    for result in (cli("verify", "--site", site, "--json"), run("verify", "--site", site, "--json")):
        document = json.loads(result.stdout)
        assert result.code == 0 and document["ok"], document["error"]
        assert [p["id"] for p in document["patches"]] == ["omni-latent-sync", "omni-ulysses", "omni-sp-transformer"]
    assert run("verify", "--site", site, "--quiet").stdout == \
        "verified: 3/3 patches applied, 3 files as recorded, 10/10 probes pass\n"
    assert cli("status", "--site", site, "--exit-code").code == 0
    shown = cli("status", "--site", site, "--json").json()  # plain status still shows the whole set
    assert len(shown["patches"]) == 5 and any("apply was given --only" in note for note in shown["notes"])
    explicit = cli("verify", "--site", site, "--only", "diffusers-rope")
    assert explicit.code == 1  # an explicit --only checks what it names


def test_selections_add_up_and_a_whole_apply_clears_them(site: Path):
    assert cli("apply", "--site", site, "--only", "diffusers-rope").code == 0
    assert cli("apply", "--site", site, "--only", "omni-latent-sync").code == 0
    assert _manifest(site)["selected"] == ["diffusers-rope", "omni-latent-sync"]
    assert cli("verify", "--site", site).code == 0
    assert cli("apply", "--site", site).code == 0
    assert _manifest(site)["selected"] is None
    assert cli("apply", "--site", site, "--only", "diffusers-rope").code == 0  # nothing to do; still the whole set
    assert _manifest(site)["selected"] is None
    assert run("verify", "--site", site, "-q").stdout.startswith("verified: 5/5 patches applied")


def test_revert_only_takes_out_the_patch_and_those_requiring_it(site: Path):
    pristine = _digests(site)
    assert cli("apply", "--site", site).code == 0
    applied = _digests(site)
    reverted = cli("revert", "--site", site, "--only", "omni-ulysses", "--json").json()
    assert reverted["ok"] and reverted["manifest_patches"] == ["diffusers-attention", "diffusers-rope",
                                                               "omni-latent-sync"]
    assert any("also reverted, as they require it: omni-sp-transformer" in note for note in reverted["notes"])
    now = _digests(site)
    taken_out = {f"{OMNI_DIR}/ernie_image_transformer.py", "vllm_omni-0.20.0.dist-info/RECORD"}
    assert now == {path: (pristine if path in taken_out else applied)[path] for path in now}
    assert f"{OMNI_DIR}/ulysses_attention.py" not in now
    assert cli("verify", "--site", site).code == 0  # the rest, as the recorded selection now says
    assert _manifest(site)["selected"] == ["diffusers-rope", "diffusers-attention", "omni-latent-sync"]
    again = cli("revert", "--site", site, "--only", "omni-ulysses", "-q")
    assert again.code == 0 and again.stdout == "revert: nothing to do\n"
    assert cli("revert", "--site", site).code == 0
    assert _digests(site) == pristine and not (site / ".ernie-patcher").exists()


def test_revert_only_unknown_id_is_a_usage_error(site: Path):
    assert cli("apply", "--site", site, "--only", "diffusers-rope").code == 0
    result = cli("revert", "--site", site, "--only", "diffusers-rop")
    assert result.code == 2 and result.reason == "error: unknown patch id 'diffusers-rop' (did you mean 'diffusers-rope'?)"


def test_revert_only_refuses_a_file_another_patch_changed_too(site: Path, tmp_path: Path):
    one = file_diff(site, TRANSFORMER, insert_after("import torch", "FIRST = 1\n"))
    two = file_diff(site, TRANSFORMER, insert_after("FIRST = 1", "SECOND = 2\n"),
                    base_lines=(site / TRANSFORMER).read_text().replace("import torch\n", "import torch\nFIRST = 1\n", 1)
                    .splitlines(True))
    patches = write_patchset(tmp_path / "set", [PatchDef("first", "diffusers", "diffusers", one),
                                                PatchDef("second", "diffusers", "diffusers", two)])
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    refused = cli("revert", "--site", site, "--only", "first")
    assert refused.code == 2 and refused.reason == f"error: cannot revert first alone: {TRANSFORMER} is also changed by second"
    assert cli("verify", "--site", site, "--patches", patches).code == 0
    assert cli("revert", "--site", site, "--only", "first", "--only", "second").code == 0


def test_a_forged_selection_is_a_corrupt_manifest(site: Path):
    assert cli("apply", "--site", site, "--only", "diffusers-rope").code == 0
    path = site / ".ernie-patcher" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["selected"] = ["diffusers-rope", "not-applied-here"]
    path.write_text(json.dumps(manifest))
    result = cli("verify", "--site", site)
    assert result.code == 7 and "field 'selected'" in result.reason
