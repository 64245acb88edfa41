"""`ernie-patch diff ID`: the exact patch text when piped, highlighted on request, --patches respected."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from support.cli import ROOT, TRANSFORMER, cli
from support.patchsets import PatchDef, file_diff, insert_after, write_patchset


def one_patch_set(site: Path, directory: Path) -> Path:
    diff = file_diff(site, TRANSFORMER, insert_after("import torch", "SHOWN_MARK = 1\n"), prefix=False)
    return write_patchset(directory, [PatchDef("shown", "diffusers", "diffusers", diff)])


def test_plain_output_is_the_exact_patch_file(site: Path, tmp_path: Path):
    patches = one_patch_set(site, tmp_path / "set")
    result = cli("diff", "shown", "--patches", patches)
    assert result.code == 0
    assert result.stdout == (patches / "shown.patch").read_text()
    assert "\x1b[" not in result.stdout


def test_color_always_highlights_under_a_header(site: Path, tmp_path: Path):
    patches = one_patch_set(site, tmp_path / "set")
    result = cli("diff", "shown", "--patches", patches, "--color", "always")
    assert result.code == 0
    assert "\x1b[" in result.stdout
    header = result.stdout.splitlines()[0]
    assert "shown: diffusers ==0.38.0, strip 0 (inferred)" in header
    assert "SHOWN_MARK" in result.stdout


def test_builtin_set_is_the_default():
    result = cli("diff", "diffusers-rope")
    assert result.code == 0
    assert result.stdout == (ROOT / "patches" / "diffusers_transformer_ernie_image.patch").read_text()


def test_unknown_id_names_the_known_ones(site: Path, tmp_path: Path):
    patches = one_patch_set(site, tmp_path / "set")
    result = cli("diff", "nope", "--patches", patches)
    assert result.code == 2
    assert "unknown patch id 'nope'" in result.stderr.splitlines()[0] and "shown" in result.stderr


def test_a_malformed_patch_is_shown_and_reported(tmp_path: Path):
    patches = write_patchset(tmp_path / "bad", [PatchDef("bad", "diffusers", "diffusers", "--- a/x\n+++ b/x\n@@ nonsense\n")])
    result = cli("diff", "bad", "--patches", patches)
    assert result.code == 2
    assert "@@ nonsense" in result.stdout
    assert result.stderr.startswith("error: patch bad (bad.patch): no hunks for x")


def test_plain_diff_does_not_import_rich_or_the_targets(site: Path, tmp_path: Path):
    patches = one_patch_set(site, tmp_path / "set")
    script = ("import sys\nfrom ernie_patcher.cli.commands import main\n"
              f"sys.argv = ['ernie-patch', 'diff', 'shown', '--patches', {str(patches)!r}]\n"
              "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
              "loaded = sorted(m for m in ('rich', 'torch', 'diffusers', 'vllm_omni') if m in sys.modules)\n"
              "print('LOADED', loaded, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stderr


def test_diff_of_a_patch_with_variants_names_the_others_and_shows_one_by_file():
    first = cli("diff", "diffusers-attention")
    assert first.code == 0
    assert first.stdout == (ROOT / "patches" / "diffusers_attention_dispatch.patch").read_text()
    assert "diffusers_attention_dispatch.v0_41.patch" in first.stderr
    variant = cli("diff", "diffusers_attention_dispatch.v0_41.patch")
    assert variant.code == 0
    assert variant.stdout == (ROOT / "patches" / "diffusers_attention_dispatch.v0_41.patch").read_text()
    assert "diffusers_attention_dispatch.patch (" in variant.stderr
