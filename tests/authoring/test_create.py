"""`ernie-patch create`: edits of installed files become a patch against the pristine release files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import DISPATCH, OMNI_DIR, OMNI_PIPELINE, ROOT, TRANSFORMER, cli
from support.patchsets import file_diff, insert_after
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target, wheel
from support.tree import file_record_digest, record_sha256, snapshot

DIFFUSERS_DIST = "diffusers-0.38.0.dist-info"
NEW_FILE = f"{OMNI_DIR}/npu_helpers.py"


def edit(site: Path, relpath: str, old: str, new: str) -> bytes:
    path = site / relpath
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path.read_bytes()


def reinstalled(tmp_path: Path, name: str) -> Path:
    """The pristine release again: a fresh `pip install --no-deps --target` of the real wheels."""
    return install_target(tmp_path / name, DIFFUSERS, VLLM_OMNI)


def test_create_then_apply_to_a_reinstalled_release(site: Path, tmp_path: Path, local_index: Path):
    edited = edit(site, TRANSFORMER, "\nclass ErnieImageSingleStreamAttnProcessor",
                  "\ndef rope_marker():\n    return 'created'\n\n\nclass ErnieImageSingleStreamAttnProcessor")
    patches = tmp_path / "mine"
    result = cli("create", "diffusers", TRANSFORMER, "--site", site, "--name", "my-rope", "--patches", patches,
                 "--summary", "marker function")
    assert result.code == 0, result.stderr
    text = (patches / "my-rope.patch").read_text()
    assert text.startswith(f"--- a/{TRANSFORMER}\n+++ b/{TRANSFORMER}\n@@ ")
    assert "+def rope_marker():" in text
    series = (patches / "series.toml").read_text()
    for line in ('id = "my-rope"', 'file = "my-rope.patch"', 'package = "diffusers"', 'module = "diffusers"',
                 'versions = "==0.38.0"', "strip = 1", 'summary = "marker function"'):
        assert line in series
    assert "diffusers-0.38.0-py3-none-any.whl" in result.stdout

    fresh = reinstalled(tmp_path, "fresh")
    assert file_record_digest(fresh / TRANSFORMER) == record_sha256(fresh, DIFFUSERS_DIST, TRANSFORMER)
    status = cli("status", "--site", fresh, "--patches", patches, "--json").json()
    assert status["patches"][0]["fit"] == "exact" and status["patches"][0]["strip_inferred"] is False
    assert cli("apply", "--site", fresh, "--patches", patches).code == 0
    assert (fresh / TRANSFORMER).read_bytes() == edited
    assert cli("verify", "--site", fresh, "--patches", patches).code == 0
    assert cli("revert", "--site", fresh).code == 0
    assert file_record_digest(fresh / TRANSFORMER) == record_sha256(fresh, DIFFUSERS_DIST, TRANSFORMER)


def test_new_file_and_missing_final_newline_round_trip(site: Path, tmp_path: Path, local_index: Path):
    (site / NEW_FILE).write_text("def npu_helper():\n    return 42")
    edited = edit(site, OMNI_PIPELINE, "import torch\n", "import torch\nLATENT_SYNC = True\n")
    patches = tmp_path / "omni"
    result = cli("create", "vllm-omni", OMNI_PIPELINE, site / NEW_FILE, "--site", site, "--name", "omni-mine",
                 "--patches", patches, "--json")
    assert result.code == 0, result.stderr
    created = result.json()["created"]
    assert [(f["relpath"], f["action"]) for f in created["files"]] == [(OMNI_PIPELINE, "modify"), (NEW_FILE, "create")]
    assert created["versions"] == "==0.20.0" and created["module"] == "vllm_omni"
    text = (patches / "omni-mine.patch").read_text()
    assert f"--- /dev/null\n+++ b/{NEW_FILE}\n" in text
    assert text.endswith("+    return 42\n\\ No newline at end of file\n")

    fresh = reinstalled(tmp_path, "fresh")
    assert cli("apply", "--site", fresh, "--patches", patches).code == 0
    assert (fresh / NEW_FILE).read_bytes() == b"def npu_helper():\n    return 42"
    assert (fresh / OMNI_PIPELINE).read_bytes() == edited
    assert cli("verify", "--site", fresh, "--patches", patches).code == 0


def test_appends_to_an_existing_series_keeping_its_comments(site: Path, tmp_path: Path):
    patches = tmp_path / "set"
    patches.mkdir()
    original = "# my team's patches, keep this comment\nschema = 1\nname = \"team\"\n\n[[patch]]\nid = \"first\"\n" \
               "file = \"first.patch\"\npackage = \"diffusers\"\nversions = \"==0.38.0\"\n\n[[patch.probe]]\n" \
               f"file = \"{DISPATCH}\"\nkind = \"string\"\nvalue = \"FIRST\"\n"
    (patches / "series.toml").write_text(original)
    (patches / "first.patch").write_text(file_diff(site, DISPATCH, insert_after("import torch", "FIRST = 'FIRST'\n")))
    edit(site, TRANSFORMER, "import torch\n", "import torch\nSECOND = 2\n")
    result = cli("create", "diffusers", TRANSFORMER, "--site", site, "--name", "second", "--patches", patches,
                 "--wheel", wheel(*DIFFUSERS))
    assert result.code == 0, result.stderr
    series = (patches / "series.toml").read_text()
    assert series.startswith(original)
    status = cli("status", "--site", reinstalled(tmp_path, "fresh"), "--patches", patches, "--json").json()
    assert [p["id"] for p in status["patches"]] == ["first", "second"]
    assert [p["fit"] for p in status["patches"]] == ["exact", "exact"]


def test_existing_name_is_refused_and_force_replaces_the_diff(site: Path, tmp_path: Path):
    patches = tmp_path / "set"
    edit(site, TRANSFORMER, "import torch\n", "import torch\nONE = 1\n")
    args = ("create", "diffusers", TRANSFORMER, "--site", site, "--name", "again", "--patches", patches,
            "--wheel", wheel(*DIFFUSERS))
    assert cli(*args).code == 0
    series = (patches / "series.toml").read_text()
    edit(site, TRANSFORMER, "ONE = 1\n", "ONE = 1\nTWO = 2\n")
    refused = cli(*args)
    assert refused.code == 2 and "already exists" in refused.stderr.splitlines()[0] and "--force" in refused.stderr
    assert "TWO" not in (patches / "again.patch").read_text()
    forced = cli(*args, "--force")
    assert forced.code == 0 and "replaced the diff" in forced.stdout
    assert "+TWO = 2" in (patches / "again.patch").read_text()
    assert (patches / "series.toml").read_text() == series


def test_record_digest_mismatch_is_refused(site: Path, tmp_path: Path):
    edit(site, TRANSFORMER, "import torch\n", "import torch\nX = 1\n")
    record = site / DIFFUSERS_DIST / "RECORD"
    good = record_sha256(site, DIFFUSERS_DIST, TRANSFORMER)
    record.write_text(record.read_text().replace(good, "sha256=" + "A" * 43))
    result = cli("create", "diffusers", TRANSFORMER, "--site", site, "--name", "x", "--patches", tmp_path / "set",
                 "--wheel", wheel(*DIFFUSERS))
    assert result.code == 6
    first = result.stderr.splitlines()[0]
    assert TRANSFORMER in first and "does not match the installed RECORD" in first
    assert not (tmp_path / "set").exists()


def test_refusals_write_nothing(site: Path, tmp_path: Path):
    patches = tmp_path / "set"
    common = ("--site", site, "--patches", patches, "--wheel", wheel(*DIFFUSERS))
    unchanged = cli("create", "diffusers", TRANSFORMER, "--name", "n", *common)
    assert unchanged.code == 2 and "unchanged from diffusers 0.38.0" in unchanged.stderr
    outside = cli("create", "diffusers", OMNI_PIPELINE, "--name", "n", *common)
    assert outside.code == 2 and "not a file of module diffusers" in outside.stderr
    bad_name = cli("create", "diffusers", TRANSFORMER, "--name", "../evil", *common)
    assert bad_name.code == 2 and "not a valid id" in bad_name.stderr
    edit(site, OMNI_PIPELINE, "import torch\n", "import torch\nY = 1\n")
    wrong_wheel = cli("create", "vllm-omni", OMNI_PIPELINE, "--name", "n", *common)
    assert wrong_wheel.code == 2 and "vllm-omni 0.20.0 is installed" in wrong_wheel.stderr
    missing = cli("create", "torch", "torch/x.py", "--name", "n", *common)
    assert missing.code == 3 and "torch is not installed" in missing.stderr
    assert not patches.exists()


def test_never_writes_into_the_installed_builtin_set(site: Path):
    edit(site, TRANSFORMER, "import torch\n", "import torch\nZ = 1\n")
    builtin = ROOT / "ernie_patcher" / "builtin"
    result = cli("create", "diffusers", TRANSFORMER, "--site", site, "--name", "z", "--patches", builtin,
                 "--wheel", wheel(*DIFFUSERS))
    assert result.code == 2 and "built-in patch set" in result.stderr.splitlines()[0]
    assert not builtin.exists()


def test_pip_download_failure_says_what_to_try(site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    edit(site, TRANSFORMER, "import torch\n", "import torch\nW = 1\n")
    empty = tmp_path / "empty-index"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    result = cli("create", "diffusers", TRANSFORMER, "--site", site, "--name", "w", "--patches", tmp_path / "set")
    assert result.code == 7
    assert "pip download diffusers==0.38.0" in result.stderr.splitlines()[0]
    assert "--wheel FILE" in result.stderr
    assert not (tmp_path / "set").exists()


def test_files_changed_by_apply_are_refused(site: Path, tmp_path: Path):
    edit(site, TRANSFORMER, "import torch\n", "import torch\nV = 1\n")
    patches = tmp_path / "set"
    common = ("--site", site, "--patches", patches, "--wheel", wheel(*DIFFUSERS))
    assert cli("create", "diffusers", TRANSFORMER, "--name", "v", *common).code == 0
    fresh = reinstalled(tmp_path, "fresh")
    assert cli("apply", "--site", fresh, "--patches", patches).code == 0
    before = snapshot(patches)
    result = cli("create", "diffusers", TRANSFORMER, "--name", "w", "--site", fresh, "--patches", patches,
                 "--wheel", wheel(*DIFFUSERS))
    assert result.code == 6 and "applied by ernie-patch (v)" in result.stderr.splitlines()[0]
    assert snapshot(patches) == before


def test_python_without_pip_uses_the_running_pip(tmp_path: Path, local_index: Path):
    """--python: find the package in another interpreter's environment; it has no pip, so ours downloads."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    install_target(Path(purelib + ".tmp"), DIFFUSERS)
    for entry in Path(purelib + ".tmp").iterdir():
        os.replace(entry, Path(purelib) / entry.name)
    edited = edit(Path(purelib), DISPATCH, "import torch\n", "import torch\nFROM_VENV = 1\n")
    patches = tmp_path / "set"
    result = cli("create", "diffusers", Path(purelib) / DISPATCH, "--python", python, "--name", "venv-edit",
                 "--patches", patches, "--json")
    assert result.code == 0, result.stderr
    assert result.json()["created"]["python"] == str(python)
    fresh = install_target(tmp_path / "fresh", DIFFUSERS)
    assert cli("apply", "--site", fresh, "--patches", patches).code == 0
    assert (fresh / DISPATCH).read_bytes() == edited
    assert json.loads(cli("status", "--site", fresh, "--patches", patches, "--json").stdout)["patches"][0]["state"] == "applied"
