"""CRLF, latin-1 and no-final-newline targets: patched and reverted byte-exactly, or refused clearly.

The real wheels ship UTF-8 files with LF line ends, so each case re-ships one real file in another
form and updates its RECORD line to match, as a release that ships the file that way would.
"""
from __future__ import annotations

import base64
import difflib
import hashlib
from pathlib import Path

import pytest

from faultkit import OMNI_PIPELINE, TRANSFORMER, cli, settled
from support.patchsets import PatchDef, write_patchset

DIST_INFO = "diffusers-0.38.0.dist-info"
OMNI_DIST_INFO = "vllm_omni-0.20.0.dist-info"
OMNI = ("vllm-omni", "vllm_omni", "==0.20.0")
MARK = "FAULT_MARK = \"rope-mark\"\n"


def reship(site: Path, relpath: str, data: bytes, dist_info: str = DIST_INFO) -> bytes:
    """Put DATA at RELPATH and make RECORD list it, as if the release shipped these bytes."""
    (site / relpath).write_bytes(data)
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record = site / dist_info / "RECORD"
    lines = [f"{relpath},sha256={digest},{len(data)}" if line.startswith(relpath + ",") else line
             for line in record.read_text().splitlines()]
    record.write_text("\n".join(lines) + "\n")
    return data


def unified(old: list[str], new: list[str], relpath: str) -> str:
    """A unified diff with the '\\ No newline at end of file' markers difflib leaves out."""
    out = []
    for line in difflib.unified_diff(old, new, f"a/{relpath}", f"b/{relpath}"):
        out.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(out)


def lf_lines(site: Path) -> list[str]:
    return (site / TRANSFORMER).read_text(encoding="utf-8").splitlines(True)


def with_mark(lines: list[str]) -> list[str]:
    at = next(i for i, line in enumerate(lines) if line.startswith("import torch"))
    return lines[:at + 1] + [MARK] + lines[at + 1:]


def patch_set(tmp_path: Path, diff: str | bytes, package: tuple[str, str, str] = ("diffusers", "diffusers", "==0.38.0")) -> Path:
    name, module, versions = package
    directory = write_patchset(tmp_path / "set", [PatchDef("rope", name, module, "", versions=versions)])
    patch = directory / "rope.patch"
    patch.write_bytes(diff if isinstance(diff, bytes) else diff.encode("utf-8"))
    return directory


def round_trip(site: Path, patches: Path, original: bytes, relpath: str = TRANSFORMER) -> bytes:
    applied = cli("apply", "--site", site, "--patches", patches)
    assert applied.code == 0, applied.stdout + applied.stderr
    assert cli("verify", "--site", site, "--patches", patches).code == 0
    patched = (site / relpath).read_bytes()
    assert cli("revert", "--site", site).code == 0
    assert (site / relpath).read_bytes() == original, "revert must restore every byte"
    return patched


def test_crlf_target_is_patched_in_crlf(site: Path, tmp_path: Path):
    lines = lf_lines(site)
    original = reship(site, TRANSFORMER, "".join(lines).replace("\n", "\r\n").encode())
    patched = round_trip(site, patch_set(tmp_path, unified(lines, with_mark(lines), TRANSFORMER)), original)
    assert patched == "".join(with_mark(lines)).replace("\n", "\r\n").encode()
    assert b"\n" not in patched.replace(b"\r\n", b""), "no bare LF may be mixed in"


def test_target_without_final_newline(site: Path, tmp_path: Path):
    lines = lf_lines(site)
    lines[-1] = lines[-1].rstrip("\n")
    original = reship(site, TRANSFORMER, "".join(lines).encode())
    middle = round_trip(site, patch_set(tmp_path, unified(lines, with_mark(lines), TRANSFORMER)), original)
    assert middle == "".join(with_mark(lines)).encode() and not middle.endswith(b"\n")
    tail = lines[:-1] + [lines[-1] + "\n", "FAULT_TAIL = 1\n"]
    appended = round_trip(site, patch_set(tmp_path, unified(lines, tail, TRANSFORMER)), original)
    assert appended == "".join(tail).encode()


def test_latin1_target_keeps_its_bytes(site: Path, tmp_path: Path):
    """A latin-1 file with a coding line (the real pipeline file is ASCII, so it re-encodes as is)."""
    lines = ["# -*- coding: latin-1 -*-\n", "# caf\xe9 cr\xe8me\n"] + \
        (site / OMNI_PIPELINE).read_text(encoding="ascii").splitlines(True)
    original = reship(site, OMNI_PIPELINE, "".join(lines).encode("latin-1"), OMNI_DIST_INFO)
    utf8_patch = unified(lines[2:], with_mark(lines[2:]), OMNI_PIPELINE)
    patched = round_trip(site, patch_set(tmp_path, utf8_patch, OMNI), original, OMNI_PIPELINE)
    assert patched == "".join(with_mark(lines)).encode("latin-1")
    latin_added = with_mark(lines)
    latin_added.insert(3, "# d\xe9j\xe0 vu\n")
    latin_patch = unified(lines, latin_added, OMNI_PIPELINE).encode("latin-1")
    patched = round_trip(site, patch_set(tmp_path, latin_patch, OMNI), original, OMNI_PIPELINE)
    assert patched == "".join(latin_added).encode("latin-1")


def test_latin1_bytes_into_a_utf8_file_are_refused(site: Path, tmp_path: Path):
    lines = lf_lines(site)
    bad = with_mark(lines)
    bad[bad.index(MARK)] = "# d\xe9j\xe0 vu\n"
    patches = patch_set(tmp_path, unified(lines, bad, TRANSFORMER).encode("latin-1"))
    before = settled(site)
    result = cli("apply", "--site", site, "--patches", patches)
    assert result.code == 5 and TRANSFORMER in result.reason and "would not compile" in result.reason
    assert settled(site) == before


@pytest.mark.parametrize("form", ["mixed-line-ends-target", "crlf-patch"])
def test_line_end_mismatch_is_refused(site: Path, tmp_path: Path, form: str):
    lines = lf_lines(site)
    diff = unified(lines, with_mark(lines), TRANSFORMER)
    if form == "mixed-line-ends-target":
        at = next(i for i, line in enumerate(lines) if line.startswith("import torch"))
        mixed = lines[:at] + [line.replace("\n", "\r\n") for line in lines[at:at + 3]] + lines[at + 3:]
        reship(site, TRANSFORMER, "".join(mixed).encode())
    else:
        diff = diff.replace("\n", "\r\n")
    patches = patch_set(tmp_path, diff)
    before = settled(site)
    result = cli("apply", "--site", site, "--patches", patches)
    code, reason = (5, "does not match") if form == "mixed-line-ends-target" else (2, "CRLF line ends")
    assert result.code == code, result.stdout + result.stderr
    assert "rope" in result.reason and reason in result.reason
    assert form == "crlf-patch" or TRANSFORMER in result.reason
    assert settled(site) == before
