"""Every exit path says what happened, the same way in each form: the process's exit code is the JSON
document's `exit_code`, `ok` is true only for 0, `error` is set on every non-zero exit and names the
first real cause (the patch whose state gave the code), the plain output's first error line is that
reason, `-q` prints exactly that one line, and a failure after the environment is known still names
its interpreter and state directory."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Callable

import pytest

from support.cli import TRANSFORMER, cli, run
from support.patchsets import PatchDef, file_diff, insert_after, write_patchset
from support.realpkgs import DIFFUSERS, install_target

Setup = Callable[[Path, Path], list[str]]


def _edit(site: Path, relpath: str = TRANSFORMER) -> None:
    path = site / relpath
    path.write_text(path.read_text() + "# edited\n")


def _applied(site: Path) -> None:
    assert cli("apply", "--site", site).code == 0


def _applied_then_edited(site: Path) -> None:
    _applied(site)
    _edit(site)


def _diffusers_only(site: Path, tmp: Path) -> list[str]:
    only = install_target(tmp / "diffusers-only", DIFFUSERS)
    return ["verify", "--site", str(only)]


def _unsupported(site: Path, tmp: Path) -> list[str]:
    diff = file_diff(site, TRANSFORMER, insert_after("import torch", "EDITED = 1\n"))
    patches = write_patchset(tmp / "set", [PatchDef("rope", "diffusers", "diffusers", diff, versions="==0.39.0")])
    return ["apply", "--site", str(site), "--patches", str(patches)]


def _conflict(site: Path, tmp: Path) -> list[str]:
    diff = file_diff(site, TRANSFORMER, insert_after("context", "EDITED = 1\n"),
                     base_lines=["no such\n", "context\n", "in the release\n"])
    patches = write_patchset(tmp / "set", [PatchDef("rope", "diffusers", "diffusers", diff)])
    return ["apply", "--site", str(site), "--patches", str(patches)]


def _site_file(site: Path, tmp: Path) -> list[str]:
    (tmp / "file").write_text("")
    return ["status", "--site", str(tmp / "file")]


# (name, setup -> argv, exit code, the start of the error's reason, whether the environment is known)
CASES: list[tuple[str, Setup, int, str, bool]] = [
    ("status", lambda s, t: ["status", "--site", str(s)], 0, "", True),
    ("status-gate-not-applied", lambda s, t: ["status", "--site", str(s), "--exit-code"], 1,
     "status: diffusers-rope: patch is not-applied", True),
    ("status-gate-drifted", lambda s, t: (_applied_then_edited(s), ["status", "--site", str(s), "--exit-code"])[1], 6,
     "status: diffusers-rope: ", True),
    ("verify-not-applied", lambda s, t: ["verify", "--site", str(s)], 1,
     "verify failed: diffusers-rope: patch is not-applied", True),
    ("verify-package-missing", _diffusers_only, 3, "verify failed: omni-latent-sync: vllm-omni is not installed", True),
    ("verify-drifted", lambda s, t: (_applied_then_edited(s), ["verify", "--site", str(s)])[1], 6,
     "verify failed: diffusers-rope: ", True),
    ("verify-unknown-id", lambda s, t: ["verify", "--site", str(s), "--only", "diffusers-rop"], 2,
     "unknown patch id 'diffusers-rop'", True),
    ("apply-unsupported", _unsupported, 4, "rope: diffusers 0.38.0 is outside the tested range", True),
    ("apply-conflict", _conflict, 5, "rope: ", True),
    ("apply-missing", lambda s, t: (t.joinpath("empty").mkdir(), ["apply", "--site", str(t / "empty")])[1], 3,
     "diffusers-rope: diffusers is not installed", True),
    ("revert-drifted", lambda s, t: (_applied_then_edited(s), ["revert", "--site", str(s)])[1], 6, "/", True),
    ("revert-patches", lambda s, t: ["revert", "--site", str(s), "--patches", "/nonexistent"], 2,
     "revert takes no --patches", False),
    ("site-file", _site_file, 3, "--site ", False),
    ("usage", lambda s, t: ["status", "--site", str(s), "--bogus"], 2, "No such option", False),
    ("bad-python", lambda s, t: ["apply", "--python", "/bin/true"], 7, "interpreter /bin/true", False),
]


@pytest.mark.parametrize("name,setup,code,reason,known", CASES, ids=[c[0] for c in CASES])
def test_exit_code_json_and_text_agree(site: Path, tmp_path: Path, name: str, setup: Setup, code: int, reason: str,
                                       known: bool):
    args = setup(site, tmp_path)
    document = run(*args, "--json")
    data = json.loads(document.stdout)
    assert document.code == data["exit_code"] == code, (document.code, data["exit_code"], data["error"])
    assert data["ok"] is (code == 0)
    assert (data["error"] is None) is (code == 0), data["error"]
    if code:
        assert data["error"]["code"] == code and data["error"]["reason"].startswith(reason), data["error"]
    if known:
        assert data["python"] and data["state_dir"], (data["python"], data["state_dir"])
    plain = run(*args)
    assert plain.code == code, plain.stderr
    quiet = run(*args, "-q")
    assert quiet.code == code
    if code:
        first = f"error: {data['error']['reason']}"
        assert quiet.stderr.splitlines() == [first] and quiet.stdout == "", (quiet.stdout, quiet.stderr)
        if not plain.stderr.startswith("Usage:"):
            assert plain.reason == first, plain.stderr
    else:
        assert quiet.stdout.count("\n") == 1 and quiet.stderr == ""


def test_lock_held_keeps_the_environment_in_the_document(site: Path):
    _applied(site)
    lock = os.open(site / ".ernie-patcher" / "lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run("revert", "--site", site, "--json")
    finally:
        os.close(lock)
    data = json.loads(result.stdout)
    assert result.code == data["exit_code"] == 7 and data["error"]["reason"].startswith("another ernie-patch run")
    assert data["python"] == f"site:{site.resolve()}" and data["state_dir"] == str(site.resolve() / ".ernie-patcher")


def test_manifest_patches_is_always_a_list(site: Path):
    """[] where no manifest records anything (or none was read), the recorded ids otherwise: never null."""
    for args in (("list",), ("status", "--site", site), ("status", "--bogus")):
        assert json.loads(run(*args, "--json").stdout)["manifest_patches"] == []
    applied = cli("apply", "--site", site, "--only", "diffusers-rope", "--json").json()
    assert applied["manifest_patches"] == ["diffusers-rope"]
    assert cli("revert", "--site", site, "--json").json()["manifest_patches"] == []


def test_quiet_counts_patches_and_files(site: Path):
    assert cli("apply", "--site", site, "--dry-run", "-q").stdout == \
        "apply (dry run): 5 patches would be applied; 4 files patched, 1 created, 1 RECORD updated (planned)\n"
    assert cli("apply", "--site", site, "-q", "--only", "diffusers-rope").stdout == \
        "apply: 1 patch applied; 1 file patched\n"
    assert cli("apply", "--site", site, "-q").stdout == \
        "apply: 4 patches applied (1 already were); 3 files patched, 1 created, 1 RECORD updated\n"
    assert cli("apply", "--site", site, "-q").stdout == "apply: nothing to do, 5 patches already applied\n"
    assert cli("status", "--site", site, "-q").stdout == "status: 5 patches: 5 applied\n"
    assert cli("revert", "--site", site, "-q").stdout == \
        "revert: 5 patches reverted; 4 files restored, 1 removed, 1 RECORD restored\n"
    assert cli("revert", "--site", site, "-q").stdout == "revert: nothing to do\n"
