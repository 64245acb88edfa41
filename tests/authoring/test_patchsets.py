"""User patch sets (--patches DIR): -p0 and git-style paths, declared vs inferred strip, the fit column."""
from __future__ import annotations

from pathlib import Path

from support.cli import DISPATCH, OMNI_PIPELINE, TRANSFORMER, cli
from support.patchsets import PatchDef, file_diff, insert_after, write_patchset
from support.tree import file_record_digest, record_sha256, snapshot


def status_rows(stdout: str) -> dict[str, dict[str, str]]:
    """The plain status table as {patch id: {column: value}}, cut at the header's column starts."""
    lines = stdout.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("patch "))
    header = lines[header_at]
    names = header.split()
    starts = [header.index(" " + n + " ") + 1 if i else 0 for i, n in enumerate(names[:-1])] + [header.rindex(names[-1])]
    rows = {}
    for line in lines[header_at + 1:]:
        if not line.strip() or line.startswith(("note:", " ")):
            break
        cells = [line[s:e].strip() for s, e in zip(starts, starts[1:] + [None])]
        rows[cells[0]] = dict(zip(names, cells))
    return rows


def marker_edit(marker: str):
    return insert_after("import torch", f"{marker} = {marker!r}\n")


def p0_set(site: Path, directory: Path, strip: int | None = None) -> Path:
    """Patches written as `patch -p0` inside site-packages expects: paths start with the module."""
    extra = {} if strip is None else {"strip": strip}
    return write_patchset(directory, [
        PatchDef("p0-rope", "diffusers", "diffusers", file_diff(site, TRANSFORMER, marker_edit("P0_ROPE"), prefix=False),
                 extra=extra, probes=[{"file": TRANSFORMER, "kind": "string", "value": "P0_ROPE"}]),
        PatchDef("p0-omni", "vllm-omni", "vllm_omni",
                 file_diff(site, OMNI_PIPELINE, marker_edit("P0_OMNI"), prefix=False), versions="==0.20.0",
                 extra=extra, probes=[{"file": OMNI_PIPELINE, "kind": "string", "value": "P0_OMNI"}]),
    ])


def test_p0_style_set_infers_strip_0_and_goes_through_the_lifecycle(site: Path, tmp_path: Path):
    patches = p0_set(site, tmp_path / "p0")
    assert "--- diffusers/models/" in (patches / "p0-rope.patch").read_text()
    pristine = snapshot(site)
    status = cli("status", "--site", site, "--patches", patches, "--json").json()
    assert [(p["strip"], p["strip_inferred"]) for p in status["patches"]] == [(0, True), (0, True)]
    applied = cli("apply", "--site", site, "--patches", patches, "--json")
    assert applied.code == 0, applied.stdout
    assert any("strip level 0 inferred" in n for n in applied.json()["notes"])
    assert b"P0_OMNI" in (site / OMNI_PIPELINE).read_bytes()
    assert cli("verify", "--site", site, "--patches", patches).code == 0
    assert cli("revert", "--site", site).code == 0
    assert snapshot(site) == pristine


def test_git_style_set_with_declared_strip(site: Path, tmp_path: Path):
    patches = write_patchset(tmp_path / "git", [
        PatchDef("git-rope", "diffusers", "diffusers", file_diff(site, TRANSFORMER, marker_edit("GIT_ROPE")),
                 extra={"strip": 1}),
    ])
    status = cli("status", "--site", site, "--patches", patches, "--json").json()
    assert (status["patches"][0]["strip"], status["patches"][0]["strip_inferred"]) == (1, False)
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    assert b"GIT_ROPE" in (site / TRANSFORMER).read_bytes()
    assert cli("revert", "--site", site).code == 0
    assert file_record_digest(site / TRANSFORMER) == record_sha256(site, "diffusers-0.38.0.dist-info", TRANSFORMER)


def test_status_shows_declared_and_inferred_strip(site: Path, tmp_path: Path):
    patches = write_patchset(tmp_path / "mixed", [
        PatchDef("declared-git", "diffusers", "diffusers", file_diff(site, TRANSFORMER, marker_edit("A_MARK")),
                 extra={"strip": 1}),
        PatchDef("inferred-git", "diffusers", "diffusers", file_diff(site, DISPATCH, marker_edit("B_MARK"))),
        PatchDef("inferred-p0", "vllm-omni", "vllm_omni",
                 file_diff(site, OMNI_PIPELINE, marker_edit("C_MARK"), prefix=False), versions="==0.20.0"),
    ])
    result = cli("status", "--site", site, "--patches", patches)
    assert result.code == 0, result.stderr
    rows = status_rows(result.stdout)
    assert rows["declared-git"]["strip"] == "1"
    assert rows["inferred-git"]["strip"] == "1 (inferred)"
    assert rows["inferred-p0"]["strip"] == "0 (inferred)"


def test_declared_strip_that_does_not_fit_the_paths_is_refused(site: Path, tmp_path: Path):
    patches = p0_set(site, tmp_path / "wrong", strip=1)
    before = snapshot(site)
    result = cli("apply", "--site", site, "--patches", patches)
    assert result.code == 2
    first = result.stderr.splitlines()[0]
    assert "p0-rope" in first and "outside package module 'diffusers'" in first
    assert snapshot(site) == before


def test_paths_outside_the_declared_module_are_refused_with_a_hint(site: Path, tmp_path: Path):
    moved = file_diff(site, TRANSFORMER, marker_edit("X"), prefix=False).replace("diffusers/models/", "models/")
    patches = write_patchset(tmp_path / "rel", [PatchDef("rel", "diffusers", "diffusers", moved)])
    result = cli("status", "--site", site, "--patches", patches)
    assert result.code == 2
    assert "do not point into package module 'diffusers'" in result.stderr.splitlines()[0]
    assert "strip" in result.stderr


def test_fit_column_exact_offset_conflict(site: Path, tmp_path: Path):
    real = (site / DISPATCH).read_text().splitlines(True)
    shifted = file_diff(site, DISPATCH, insert_after("def _native_npu_attention", "    SHIFTED = 1\n"),
                        base_lines=real[:20] + real[29:])
    conflicting = file_diff(site, OMNI_PIPELINE, marker_edit("NEVER")).replace(" import torch\n", " import torch_x\n", 1)
    patches = write_patchset(tmp_path / "fits", [
        PatchDef("fits-exactly", "diffusers", "diffusers", file_diff(site, TRANSFORMER, marker_edit("EXACT"))),
        PatchDef("fits-shifted", "diffusers", "diffusers", shifted),
        PatchDef("fits-not", "vllm-omni", "vllm_omni", conflicting, versions="==0.20.0"),
    ])
    result = cli("status", "--site", site, "--patches", patches)
    rows = status_rows(result.stdout)
    assert {i: r["fit"] for i, r in rows.items()} == {"fits-exactly": "exact", "fits-shifted": "offset",
                                                      "fits-not": "conflict"}
    document = cli("status", "--site", site, "--patches", patches, "--json").json()
    assert [p["fit"] for p in document["patches"]] == ["exact", "offset", "conflict"]
    assert document["patches"][1]["files"][0]["offsets"] == [9]


def test_fit_is_shown_for_a_release_outside_the_tested_range(site: Path, tmp_path: Path):
    patches = write_patchset(tmp_path / "untested", [
        PatchDef("newer-only", "diffusers", "diffusers", file_diff(site, TRANSFORMER, marker_edit("N")),
                 versions=">=0.39"),
    ])
    result = cli("status", "--site", site, "--patches", patches)
    row = status_rows(result.stdout)["newer-only"]
    assert (row["state"], row["fit"]) == ("unsupported", "exact")
