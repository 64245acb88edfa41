"""git's extended headers and binary patches, parsed from what git itself writes for real release files
(tzdata 2025.1 -> 2025.2 zone files: a new one and two changed ones; vllm-omni 0.20.0 modules), and
applied to the exact bytes git apply makes."""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ernie_patcher.errors import PatcherError
from ernie_patcher.patchset.diffparse import EXECUTABLE, REGULAR, parse_patch
from ernie_patcher.patchset.gitbinary import _b85, apply_delta, decode85, object_id
from ernie_patcher.patchset.hunks import HunkConflict, apply_binary, apply_hunks
from support.realpkgs import VLLM_OMNI, install_target
from support.releasediff import git_diff

TZ_OLD, TZ_NEW = ("tzdata", "2025.1"), ("tzdata", "2025.2")
MODULE_FILE = "vllm_omni/entrypoints/cli/main.py"


@pytest.fixture(scope="module")
def zones(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """The real tzdata/ of both releases side by side as a/ and b/, and git's binary diff of them."""
    root = tmp_path_factory.mktemp("zones")
    for side, spec in (("a", TZ_OLD), ("b", TZ_NEW)):
        install_target(root / f"site-{side}", spec)
        shutil.copytree(root / f"site-{side}" / "tzdata", root / side / "tzdata")
    return root, git_diff(root, "a/tzdata", "b/tzdata")


def _file(parsed, relpath: str):
    return next(f for f in parsed.files if str(f.path) == relpath)


def test_binary_literal_and_delta_give_the_new_release_bytes(zones):
    root, diff = zones
    assert b"\ndelta " in diff and b"\nliteral " in diff, "git no longer writes both kinds for this pair"
    parsed = parse_patch(diff, "tzdata", None, "zones")
    assert parsed.strip == 2
    binaries = [f for f in parsed.files if f.binary is not None]
    assert {f.binary.method for f in binaries} == {"literal", "delta"}
    for file in binaries:
        old = root / "a" / file.path
        before = old.read_bytes() if old.exists() else None
        assert apply_binary(before, file.binary) == (root / "b" / file.path).read_bytes(), file.path
        assert file.creates == (before is None)


def test_binary_patch_refuses_a_file_it_was_not_made_from(zones):
    root, diff = zones
    parsed = parse_patch(diff, "tzdata", None, "zones")
    delta = next(f for f in parsed.files if f.binary is not None and f.binary.method == "delta")
    other = (root / "a" / "tzdata" / "zoneinfo" / "UTC").read_bytes()
    with pytest.raises(HunkConflict, match="not the one the binary patch was made from"):
        apply_binary(other, delta.binary)


def test_damaged_binary_patch_is_a_usage_error(zones):
    _, diff = zones
    lines = diff.split(b"\n")
    at = next(i for i, line in enumerate(lines) if line.startswith(b"literal ")) + 1
    lines[at] = lines[at][:1] + b"!" * (len(lines[at]) - 1)
    with pytest.raises(PatcherError, match="malformed diff.*binary patch") as raised:
        parse_patch(b"\n".join(lines), "tzdata", None, "zones")
    assert raised.value.code == 2


def test_plain_diff_of_binary_files_is_refused(zones):
    root, _ = zones
    done = subprocess.run(["diff", "-ruN", "a/tzdata", "b/tzdata"], cwd=root, capture_output=True)
    assert b"Binary files " in done.stdout
    with pytest.raises(PatcherError, match="not supported without its bytes") as raised:
        parse_patch(done.stdout, "tzdata", None, "plain")
    assert raised.value.code == 2 and "git diff --binary" in (raised.value.hint or "")


def test_base85_as_git_frames_it():
    data = os.urandom(1001) + b"\0\0\0"  # 1004 bytes: whole groups for b85encode
    assert _b85(base64.b85encode(data)) == data
    # git's lines: a length character (A-Z = 1-26, a-z = 27-52), then the bytes padded to 4
    body = b"".join((b"z" if len(chunk) == 52 else bytes([64 + len(chunk) if len(chunk) <= 26 else 70 + len(chunk)]))
                    + base64.b85encode(chunk.ljust((len(chunk) + 3) // 4 * 4, b"\0")) + b"\n"
                    for chunk in (data[i:i + 52] for i in range(0, len(data), 52)))
    assert decode85(body) == data
    assert decode85(body[:-1] + b"\n") == data  # the last line partial (1004 = 19 * 52 + 16)


def test_git_delta_copy_and_insert():
    source = bytes(range(256)) * 4
    # header: source 1024, target 11; copy offset 1 size 5; insert "HELLO"; copy offset 0 size 1
    delta = bytes([0x80, 0x08, 11, 0x91, 1, 5, 5]) + b"HELLO" + bytes([0x90, 1])
    assert apply_delta(source, delta) == bytes([1, 2, 3, 4, 5]) + b"HELLO" + bytes([0])
    assert object_id(b"", 40) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's empty blob


@pytest.fixture
def module_pair(tmp_path: Path) -> Path:
    """a/ and b/ copies of a real vllm-omni 0.20.0 module directory, for git to diff."""
    site = install_target(tmp_path / "site", VLLM_OMNI)
    for side in ("a", "b"):
        shutil.copytree(site / "vllm_omni" / "entrypoints", tmp_path / side / "vllm_omni" / "entrypoints")
    return tmp_path


def test_mode_change_empty_file_and_rename_headers(module_pair: Path):
    b = module_pair / "b" / "vllm_omni" / "entrypoints"
    os.chmod(b / "cli" / "main.py", 0o755)
    (b / "cli" / "empty_marker.py").write_bytes(b"")
    os.rename(b / "cli" / "serve.py", b / "cli" / "serving.py")
    parsed = parse_patch(git_diff(module_pair, "a/vllm_omni", "b/vllm_omni"), "vllm_omni", None, "headers")
    mode = _file(parsed, "vllm_omni/entrypoints/cli/main.py")
    assert (mode.new_mode, mode.hunks, mode.creates) == (EXECUTABLE, (), False)
    empty = _file(parsed, "vllm_omni/entrypoints/cli/empty_marker.py")
    assert (empty.creates, empty.hunks, empty.new_mode) == (True, (), REGULAR)
    moved = _file(parsed, "vllm_omni/entrypoints/cli/serving.py")
    assert moved.renames and str(moved.source) == "vllm_omni/entrypoints/cli/serve.py" and not moved.hunks


def test_quoted_names_are_unquoted(module_pair: Path):
    b = module_pair / "b" / "vllm_omni" / "entrypoints"
    os.rename(b / "cli" / "logo.py", b / "cli" / "logo é.py")
    diff = git_diff(module_pair, "a/vllm_omni", "b/vllm_omni")
    assert b'"' in diff
    parsed = parse_patch(diff, "vllm_omni", None, "quoted")
    assert "vllm_omni/entrypoints/cli/logo é.py" in {str(f.path) for f in parsed.files}


def test_symlink_is_refused(module_pair: Path):
    b = module_pair / "b" / "vllm_omni" / "entrypoints"
    (b / "cli" / "link.py").symlink_to("main.py")
    with pytest.raises(PatcherError, match="symlink change") as raised:
        parse_patch(git_diff(module_pair, "a/vllm_omni", "b/vllm_omni"), "vllm_omni", None, "link")
    assert raised.value.code == 2


def test_text_hunks_parse_as_before_and_apply(module_pair: Path):
    b = module_pair / "b" / "vllm_omni" / "entrypoints" / "cli" / "main.py"
    original = b.read_text()
    b.write_text(original.replace("def main", "def main_entry", 1) + "\n# tail\n")
    parsed = parse_patch(git_diff(module_pair, "a/vllm_omni", "b/vllm_omni"), "vllm_omni", None, "text")
    file = _file(parsed, MODULE_FILE)
    patched, _ = apply_hunks(original, file.hunks)
    assert patched == b.read_text()
    assert apply_hunks(patched, file.hunks, reverse=True)[0] == original
