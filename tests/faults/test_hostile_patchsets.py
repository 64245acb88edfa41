"""User patch sets (--patches DIR) that are malformed or reach outside the package: refused before
anything is written, and nothing created anywhere on disk (site, patch dir, outside dirs)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from faultkit import DISPATCH, cli
from support.patchsets import PatchDef, file_diff, insert_after, new_file_diff, write_patchset
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target
from support.tree import snapshot

GOOD_PROBE = {"file": DISPATCH, "kind": "string", "value": "dispatch-mark"}


@dataclass
class Place:
    root: Path
    site: Path
    outside: Path


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Place:
    root = tmp_path_factory.mktemp("hostile")
    site = install_target(root / "site", DIFFUSERS, VLLM_OMNI)
    outside = root / "outside"
    outside.mkdir()
    (outside / "victim.py").write_text("VICTIM = 1\n")
    return Place(root, site, outside)


def _good_diff(place: Place) -> str:
    return file_diff(place.site, DISPATCH, insert_after("import torch", "FAULT_MARK = \"dispatch-mark\"\n"))


def _set(place: Place, name: str, diff: str, package: str = "diffusers", module: str = "diffusers",
         probes: list[dict] | None = None, extra: dict | None = None) -> Path:
    return write_patchset(place.root / f"set-{name}", [
        PatchDef("hostile", package, module, diff, probes=probes if probes is not None else [GOOD_PROBE],
                 extra=extra or {})])


def _series_edit(directory: Path, old: str, new: str) -> Path:
    series = directory / "series.toml"
    text = series.read_text()
    assert old in text
    series.write_text(text.replace(old, new, 1))
    return directory


BINARY_GIT = ("diff --git a/diffusers/models/blob.bin b/diffusers/models/blob.bin\n"
              "new file mode 100644\nindex 0000000..e69de29\nGIT binary patch\nliteral 4\nLcmZ?wbaVv#0Mh^t\n\n"
              "literal 0\nHcmV?d00001\n\n")
BINARY_PLAIN = "Binary files a/diffusers/models/blob.bin and b/diffusers/models/blob.bin differ\n"

Case = Callable[[Place], Path]
CASES: dict[str, tuple[Case, int, str]] = {
    "not-a-diff": (lambda p: _set(p, "not-a-diff", "this is not a diff\n"), 2, "malformed diff"),
    "broken-hunk": (lambda p: _set(p, "broken-hunk", _good_diff(p).replace("@@ -", "@@ -x", 1)), 2,
                    "no hunks"),
    "truncated-hunk": (lambda p: _set(p, "truncated-hunk", "".join(_good_diff(p).splitlines(True)[:5])), 2,
                       "malformed diff"),
    "dotdot-path": (lambda p: _set(p, "dotdot", new_file_diff("diffusers/../../outside/evil.py", ["X = 1\n"])),
                    2, "unsafe path"),
    "absolute-path": (lambda p: _set(p, "absolute", new_file_diff(f"{p.outside}/victim.py", ["X = 1\n"])
                                     .replace(f"b/{p.outside}", str(p.outside))), 2, "unsafe path"),
    "other-package": (lambda p: _set(p, "other", new_file_diff("vllm_omni/diffusion/evil.py", ["X = 1\n"]),
                                     probes=[]), 2, "do not point into package module 'diffusers'"),
    "dist-info": (lambda p: _set(p, "dist-info", new_file_diff("diffusers-0.38.0.dist-info/evil", ["X\n"]),
                                 probes=[]), 2, "do not point into package module 'diffusers'"),
    "binary-git": (lambda p: _set(p, "binary-git", BINARY_GIT, probes=[]), 2, "binary patch"),
    "binary-plain": (lambda p: _set(p, "binary-plain", BINARY_PLAIN, probes=[]), 2, "binary patch"),
    "unknown-series-key": (lambda p: _set(p, "unknown-key", _good_diff(p), extra={"post_apply": "rm -rf /"}),
                           2, "unknown key(s) post_apply"),
    "unknown-top-key": (lambda p: _series_edit(_set(p, "unknown-top", _good_diff(p)), "schema = 1",
                                               "schema = 1\nhooks = [\"x\"]"), 2, "unknown key(s) hooks"),
    "unknown-probe-kind": (lambda p: _set(p, "probe-kind", _good_diff(p),
                                          probes=[{"file": DISPATCH, "kind": "exec", "value": "x"}]),
                           2, "unknown probe kind 'exec'"),
    "probe-outside": (lambda p: _set(p, "probe-outside", _good_diff(p),
                                     probes=[{"file": "../outside/victim.py", "kind": "string", "value": "x"}]),
                      2, "unsafe path"),
    "patch-file-outside": (lambda p: _series_edit(_set(p, "file-outside", _good_diff(p)),
                                                  'file = "hostile.patch"', 'file = "../outside/victim.py"'),
                           2, "must be a plain file name"),
    "future-schema": (lambda p: _series_edit(_set(p, "schema", _good_diff(p)), "schema = 1", "schema = 9"),
                      2, "schema 9 is not supported"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_patch_set_refused_before_any_write(place: Place, name: str):
    build, code, reason = CASES[name]
    patches = build(place)
    before = snapshot(place.root)
    for command in ("status", "apply"):
        result = cli(command, "--site", place.site, "--patches", patches)
        assert result.code == code, (command, result.stdout, result.stderr)
        assert reason in result.reason, result.reason
        assert "hostile" in result.reason or "series" in result.reason, "the reason must name the patch"
    assert snapshot(place.root) == before, "something was written"


@pytest.mark.parametrize("shape", ["directory", "file"])
def test_symlink_in_package_pointing_outside_is_refused(place: Place, shape: str):
    models = place.site / "diffusers" / "models"
    link = models / ("escape" if shape == "directory" else "escape.py")
    link.symlink_to(place.outside if shape == "directory" else place.outside / "victim.py")
    try:
        relpath = "diffusers/models/escape/" + ("evil.py" if shape == "directory" else "")
        diff = (new_file_diff(relpath + "evil.py" if shape == "file" else relpath, ["X = 1\n"]) if shape == "directory"
                else file_diff(place.site, "diffusers/models/escape.py", insert_after("VICTIM", "X = 2\n")))
        patches = _set(place, f"symlink-{shape}", diff, probes=[])
        before = snapshot(place.root)
        result = cli("apply", "--site", place.site, "--patches", patches)
        assert result.code == 7, result.stdout + result.stderr
        assert "outside package diffusers" in result.reason and str(link) in result.reason
        assert snapshot(place.root) == before
        assert (place.outside / "victim.py").read_text() == "VICTIM = 1\n"
    finally:
        os.unlink(link)
