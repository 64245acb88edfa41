"""`ernie-patch port`: a patch carried onto a newer release by a three-way merge of the real wheels'
files; a clean merge becomes a variant, a conflict stops naming its hunks; no environment touched."""
from __future__ import annotations

import difflib
import json
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from packaging.specifiers import SpecifierSet

from ernie_patcher.authoring.port import variant_file_name
from ernie_patcher.patchset.diffparse import parse_patch
from ernie_patcher.patchset.hunks import apply_hunks
from ernie_patcher.patchset.series import load_series
from support.cli import DISPATCH, OMNI_PIPELINE, OMNI_TRANSFORMER, cli
from support.patchsets import PatchDef, builtin_copy, write_patchset
from support.realpkgs import install_target, wheel
from support.tree import snapshot

OMNI = "vllm-omni"
SP_FILE = "vllm_omni_ernie_image_transformer.patch"
SP_V030 = "vllm_omni_ernie_image_transformer.v0_30.patch"
ATTENTION_FILE = "diffusers_attention_dispatch.patch"
ATTENTION_V041 = "diffusers_attention_dispatch.v0_41.patch"
VALIDATOR = Draft202012Validator(json.loads(resources.files("ernie_patcher.schema")
                                            .joinpath("report.schema.json").read_text()))


def valid(document: dict) -> dict:
    errors = list(VALIDATOR.iter_errors(document))
    assert not errors, [e.message for e in errors[:3]]
    return document


def release_file(name: str, version: str, relpath: str) -> str:
    with zipfile.ZipFile(wheel(name, version)) as archive:
        return archive.read(relpath).decode("utf-8")


def patched(patch_file: Path, module: str, text: str) -> tuple[str, list[int]]:
    """TEXT with the one-file patch PATCH_FILE applied, and the offsets its hunks needed."""
    (file,) = parse_patch(patch_file.read_text(encoding="utf-8"), module, 1, str(patch_file)).files
    result, placements = apply_hunks(text, file.hunks)
    return result, [p.offset for p in placements]


def diff_body(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    return text[text.index("--- a/"):]


def port(*args: str | Path, patches: Path, json_doc: bool = True):
    return cli("port", *args, "--patches", patches, *(["--json"] if json_doc else []))


def test_sp_transformer_ported_from_0_28_onto_0_30_is_the_builtin_0_30_variant(tmp_path: Path):
    """The 0.28 patch merged onto 0.30.0 (which moved and rewrote code around its hunks) gives exactly the
    diff of the hand-rebased built-in 0.30 variant that the SP tier proves; the variant applies to the
    real 0.30.0 files, exactly, and the installed environment is not touched."""
    patches = builtin_copy(tmp_path / "set", drop=(SP_V030,))
    site = install_target(tmp_path / "site", (OMNI, "0.28.0"))
    before = snapshot(site)
    result = port("omni-sp-transformer", "--to", "0.30.0", "--from-wheel", wheel(OMNI, "0.28.0"),
                  "--to-wheel", wheel(OMNI, "0.30.0"), patches=patches)
    assert result.code == 0, result.stdout
    ported = valid(result.json())["ported"]
    assert ported["from_version"] == "0.28.0" and ported["source_file"] == SP_FILE
    assert [f["outcome"] for f in ported["files"]] == ["clean"] and all(p["passed"] for p in ported["probes"])
    variant = patches / SP_V030
    assert ported["variant_file"] == str(variant) and ported["versions"] == "==0.30.0"
    builtin = load_series().directory / SP_V030
    assert diff_body(variant) == diff_body(builtin)
    entry = [v for v in load_series(patches).variants("omni-sp-transformer") if v.file == SP_V030][0]
    assert entry.tested == "==0.30.0" and entry.requires == ("omni-ulysses",) and len(entry.probes) == 4
    pristine = release_file(OMNI, "0.30.0", OMNI_TRANSFORMER)
    assert patched(variant, "vllm_omni", pristine) == patched(builtin, "vllm_omni", pristine)
    assert snapshot(site) == before


def test_moved_context_merges_where_plain_apply_needs_an_offset(tmp_path: Path):
    """0.22.0 inserted lines above the latent-sync hunks: plain apply finds them only at an offset,
    the three-way merge places them by the base and the new variant fits exactly."""
    patches = builtin_copy(tmp_path / "set", versions={"vllm_omni_pipeline_ernie_image.patch": "==0.20.0"})
    new_release = release_file(OMNI, "0.22.0", OMNI_PIPELINE)
    plain, offsets = patched(patches / "vllm_omni_pipeline_ernie_image.patch", "vllm_omni", new_release)
    assert any(offsets)
    result = port("omni-latent-sync", "--to", "0.22.0", "--from-wheel", wheel(OMNI, "0.20.0"),
                  "--to-wheel", wheel(OMNI, "0.22.0"), patches=patches)
    assert result.code == 0, result.stdout
    variant = patches / "vllm_omni_pipeline_ernie_image.v0_22.patch"
    merged, offsets = patched(variant, "vllm_omni", new_release)
    assert not any(offsets) and merged == plain


def test_conflict_stops_naming_the_hunk_and_writes_markers_to_scratch(tmp_path: Path):
    """diffusers 0.41.0 rewrote the code the attention patch's first hunk changes: no variant, the merged
    file with markers in the scratch directory, hunk #1 named, exit 5; the series is left as it was.
    Resolved by hand (here: as the built-in 0.41 variant resolves it), --resolved makes the variant."""
    patches = builtin_copy(tmp_path / "set", drop=(ATTENTION_V041,))
    series_before = (patches / "series.toml").read_bytes()
    wheels = ("--from-wheel", wheel("diffusers", "0.40.0"), "--to-wheel", wheel("diffusers", "0.41.0"))
    scratch = tmp_path / "scratch"
    result = port("diffusers-attention", "--to", "0.41.0", *wheels, "--scratch", scratch, patches=patches)
    assert result.code == 5, result.stdout
    document = valid(result.json())
    ported = document["ported"]
    assert ported["variant_file"] is None and ported["scratch_dir"] == str(scratch)
    (file,) = ported["files"]
    assert file["outcome"] == "conflict" and {c["hunk"] for c in file["conflicts"]} == {1}
    assert document["error"]["reason"].startswith("diffusers-attention does not merge cleanly onto diffusers 0.41.0: "
                                                  f"hunk #1 of {DISPATCH} meets changes")
    merged = (scratch / DISPATCH).read_text(encoding="utf-8").splitlines()
    for conflict in file["conflicts"]:
        assert merged[conflict["merged_line"] - 1].startswith("<<<<<<< diffusers_attention_dispatch.patch on ")
    assert (patches / "series.toml").read_bytes() == series_before
    assert not (patches / "diffusers_attention_dispatch.v0_41.patch").exists()

    half_done = cli("port", "diffusers-attention", "--to", "0.41.0", *wheels, "--resolved", scratch,
                    "--patches", patches)
    assert half_done.code == 5 and "still has a conflict marker" in half_done.reason
    resolution, _ = patched(load_series().directory / ATTENTION_V041, "diffusers",
                            release_file("diffusers", "0.41.0", DISPATCH))
    (scratch / DISPATCH).write_text(resolution, encoding="utf-8")
    done = port("diffusers-attention", "--to", "0.41.0", *wheels, "--resolved", scratch, patches=patches)
    assert done.code == 0, done.stdout
    assert diff_body(patches / ATTENTION_V041) == diff_body(load_series().directory / ATTENTION_V041)


def test_plain_output_names_what_it_did(tmp_path: Path):
    patches = builtin_copy(tmp_path / "set", drop=(SP_V030,))
    result = port("omni-sp-transformer", "--to", "0.30.0", "--to-wheel", wheel(OMNI, "0.30.0"),
                  "--from-wheel", wheel(OMNI, "0.28.0"), patches=patches, json_doc=False)
    assert result.code == 0, result.stderr
    assert f"clean     {OMNI_TRANSFORMER}" in result.stdout
    assert "probes on the merged files: 4/4 pass" in result.stdout
    assert f"added variant {SP_V030} (versions = \"==0.30.0\")" in result.stdout


@pytest.mark.parametrize("args,reason", [
    (("no-such-patch", "--to", "0.30.0"), "unknown patch id 'no-such-patch'"),
    (("omni-ulysses", "--to", "0.30.0"), "patch 'omni-ulysses' already has a variant for vllm-omni 0.30.0"),
    (("omni-sp-transformer", "--to", "x.y"), "--to 'x.y' is not a PEP 440 version"),
    (("diffusers-rope", "--to", "0.43.0", "--from", "0.37.0"), "no variant of patch 'diffusers-rope' covers"),
], ids=["unknown-id", "covered", "bad-version", "from-outside"])
def test_usage_errors(tmp_path: Path, args: tuple[str, ...], reason: str):
    patches = builtin_copy(tmp_path / "set")
    result = port(*args, patches=patches)
    assert result.code == 2, result.stdout
    assert valid(result.json())["error"]["reason"].startswith(reason)


def test_a_wheel_of_another_release_is_refused(tmp_path: Path):
    patches = builtin_copy(tmp_path / "set", drop=(SP_V030,))
    result = port("omni-sp-transformer", "--to", "0.30.0", "--from-wheel", wheel(OMNI, "0.28.0"),
                  "--to-wheel", wheel(OMNI, "0.28.0"), patches=patches)
    assert result.code == 2 and "is vllm-omni 0.28.0, not vllm-omni 0.30.0" in result.json()["error"]["reason"]


def test_the_release_a_patch_was_written_for_defaults_to_its_newest_bound(tmp_path: Path, monkeypatch):
    """Without --from, the newest release a variant's range names below --to (0.28.0 for <=0.28.0),
    downloaded by pip (here from the cached real wheels, no index)."""
    wheel(OMNI, "0.28.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel(OMNI, "0.30.0").parent))
    patches = builtin_copy(tmp_path / "set", drop=(SP_V030,))
    result = port("omni-sp-transformer", "--to", "0.30.0", patches=patches)
    assert result.code == 0, result.stdout
    assert result.json()["ported"]["from_version"] == "0.28.0"


def test_variant_file_names():
    assert variant_file_name(SP_FILE, "0.30.0") == SP_V030
    assert variant_file_name(SP_V030, "0.32.1") == "vllm_omni_ernie_image_transformer.v0_32_1.patch"
    assert variant_file_name("x.patch", "1.0") == "x.v1_0.patch"


def test_a_conflict_at_the_end_of_a_file_names_the_hunk_there():
    """Both sides append different lines at the end of the file: the hunk whose context ends there is named."""
    from ernie_patcher.authoring.port import CONFLICTS, _merge_file
    from ernie_patcher.patchset.series import PatchSpec

    base = "".join(f"line {i}\n" for i in range(30))
    ours = base.replace("line 2\n", "line 2 patched\n") + "appended by the patch\n"
    diff = "".join(difflib.unified_diff(base.splitlines(True), ours.splitlines(True), "a/m/x.py", "b/m/x.py"))
    (file,) = parse_patch(diff, "m", 1, "test").files
    assert len(file.hunks) == 2
    spec = PatchSpec("p", "p.patch", "m", "m", SpecifierSet("==1.0"), Path("p.patch"))
    merged = _merge_file(file, base.encode(), (base + "appended by the release\n").encode(), spec, "1.0",
                         ("ours", "base", "theirs"))
    assert merged.outcome == CONFLICTS and [c.hunk for c in merged.conflicts] == [2]


def test_probes_already_passing_on_the_new_release_are_noted(tmp_path: Path):
    """A probe that passes on the new release as released cannot show the patch is in: port says the
    release may carry the fix (fixed-in) while it still writes the variant."""
    old = release_file(OMNI, "0.20.0", OMNI_PIPELINE).splitlines(True)
    index = next(i for i, line in enumerate(old) if line.startswith("class ErnieImagePipeline"))
    new = old[:index] + ["PORT_MARKER = 1\n", "\n", "\n"] + old[index:]
    diff = "".join(difflib.unified_diff(old, new, f"a/{OMNI_PIPELINE}", f"b/{OMNI_PIPELINE}"))
    patches = write_patchset(tmp_path / "set", [PatchDef(
        "marker", OMNI, "vllm_omni", diff, versions="==0.20.0",
        probes=[{"file": OMNI_PIPELINE, "kind": "class", "name": "ErnieImagePipeline"}])])
    result = port("marker", "--to", "0.22.0", "--from-wheel", wheel(OMNI, "0.20.0"), "--to-wheel",
                  wheel(OMNI, "0.22.0"), patches=patches)
    assert result.code == 0, result.stdout
    assert any("every probe of marker already passes on vllm-omni 0.22.0 as released" in note
               for note in valid(result.json())["notes"])
