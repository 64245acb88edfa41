"""Root and `--python`: nothing of the target environment runs as root before a check refuses it. The
interpreter another user could replace (its directory, a directory on its way or on the way to the
file it resolves to, its pyvenv.cfg) is refused with one line naming it, unless
--allow-user-writable; the one that runs describes its environment isolated (-E -s -S), so a `.pth`
import line, a sitecustomize or a PYTHON* variable planted in the environment never runs, while the
environment's packages (a plain-path .pth one installed elsewhere included) are still found.

The environments are real venvs (python3.11 -m venv) with the real published wheels installed; the
other user is the unprivileged uid the root attack suite uses (test_root_races)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from faultkit import CREATED, OMNI_PIPELINE, fault_set, run
from support.cli import cli
from support.realpkgs import DIFFUSERS, VLLM_OMNI, install_target, make_venv

ATTACKER = 1001
ALLOW = "--allow-user-writable"
MARKER_CODE = "open({marker!r}, 'a').write({what!r} + '\\n')"


def _purelib(python: Path) -> Path:
    return python.parent.parent / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned directory (0755) under /tmp the attacker can reach (pytest's tmp_path is root's only)."""
    if os.geteuid() != 0:
        pytest.skip("the refusals are root's: they need a root ernie-patch and a second user")
    directory = Path(tempfile.mkdtemp(prefix="ernie-pytrust-", dir="/tmp"))
    directory.chmod(0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _planted(python: Path, marker: Path) -> Path:
    """The code another user could plant in a site-packages they can write: a `.pth` import line and
    a sitecustomize, each appending a line to MARKER when Python starts; and the directory, for
    PYTHONPATH, holding a sitecustomize, a usercustomize and a json module (which the probe imports)."""
    site = _purelib(python)
    (site / "zz-planted.pth").write_text("import os; " + MARKER_CODE.format(marker=str(marker), what="pth") + "\n")
    (site / "sitecustomize.py").write_text(MARKER_CODE.format(marker=str(marker), what="sitecustomize") + "\n")
    elsewhere = marker.parent / "pythonpath"
    elsewhere.mkdir()
    (elsewhere / "sitecustomize.py").write_text(MARKER_CODE.format(marker=str(marker), what="PYTHONPATH") + "\n")
    (elsewhere / "usercustomize.py").write_text(MARKER_CODE.format(marker=str(marker), what="usercustomize") + "\n")
    (elsewhere / "json.py").write_text(MARKER_CODE.format(marker=str(marker), what="PYTHONPATH json") + "\n")
    return elsewhere


def _ran(marker: Path) -> str:
    return marker.read_text() if marker.exists() else ""


def test_planted_pth_and_sitecustomize_never_run_and_the_answer_is_right(base: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    python = make_venv(base / "venv", DIFFUSERS, VLLM_OMNI)
    site = _purelib(python)
    patches = fault_set(site, base / "set")
    marker = base / "marker"
    elsewhere = _planted(python, marker)
    subprocess.run([str(python), "-c", "pass"], check=True, env={"PYTHONPATH": str(elsewhere)})
    assert {"pth", "PYTHONPATH"} <= set(_ran(marker).split()), "the planted code runs when this venv's Python starts"
    marker.unlink()

    status = run("status", "--python", python, "--patches", patches, "--json")
    assert status.code == 0, status.stdout + status.stderr
    assert [(p["installed_version"], p["state"]) for p in status.json()["patches"]] == \
        [("0.38.0", "not-applied"), ("0.38.0", "not-applied"), ("0.20.0", "not-applied")]
    assert run("apply", "--python", python, "--patches", patches, "--dry-run").code == 0
    applied = run("apply", "--python", python, "--patches", patches)
    assert applied.code == 0, applied.stdout + applied.stderr
    assert b"omni-mark" in (site / OMNI_PIPELINE).read_bytes() and (site / CREATED).is_file()
    for args in (("--json",), ("-q",), ("--reparse",)):  # the fast path (quick.py, fastpath) and the engine
        verified = run("verify", "--python", python, "--patches", patches, *args)
        assert verified.code == 0, verified.stdout + verified.stderr
    assert run("status", "--python", python, "--patches", patches, "--exit-code", "-q").code == 0
    # PYTHON* variables of root's environment pass to the interpreter (ernie-patch's own start
    # would run their sitecustomize, so they are set here, in this process, for it alone).
    from ernie_patcher.target.interpreter import describe

    monkeypatch.setenv("PYTHONPATH", str(elsewhere))
    monkeypatch.setenv("PYTHONSTARTUP", str(elsewhere / "sitecustomize.py"))
    described = describe(str(python), {"packages": [["vllm-omni", "vllm_omni"]]})
    assert described["distributions"]["vllm-omni"]["version"] == "0.20.0"
    assert described["modules"]["vllm_omni"]["module_dir"] == str(site / "vllm_omni")
    monkeypatch.delenv("PYTHONPATH")
    monkeypatch.delenv("PYTHONSTARTUP")
    assert run("revert", "--python", python).code == 0
    assert b"omni-mark" not in (site / OMNI_PIPELINE).read_bytes()
    assert _ran(marker) == "", f"root ran code planted in the environment: {_ran(marker)!r}"


def test_a_site_packages_another_user_owns_runs_nothing_and_apply_is_refused(base: Path):
    """The review's case: a root-owned interpreter whose site-packages a deploy user owns. Describing
    it runs none of that user's code; status names the directory; apply refuses to write there."""
    python = make_venv(base / "venv", DIFFUSERS, VLLM_OMNI)
    site = _purelib(python)
    patches = fault_set(site, base / "set")
    marker = base / "marker"
    (site / "zz-planted.pth").write_text("import os; " + MARKER_CODE.format(marker=str(marker), what="pth") + "\n")
    _attacker_owns(site)
    status = run("status", "--python", python, "--patches", patches, "--json")
    assert status.code == 0, status.stdout + status.stderr
    assert [p["installed_version"] for p in status.json()["patches"]] == ["0.38.0", "0.38.0", "0.20.0"]
    assert any(f"{site} (owned by uid {ATTACKER})" in note for note in status.json()["notes"]), status.stdout
    refused = run("apply", "--python", python, "--patches", patches)
    assert refused.code == 7 and refused.reason.startswith(f"error: refusing to write as root in {site}"), \
        refused.stderr
    assert b"omni-mark" not in (site / OMNI_PIPELINE).read_bytes()
    assert _ran(marker) == "", f"root ran code planted in the environment: {_ran(marker)!r}"


def test_a_plain_path_pth_still_finds_a_package_installed_outside_site_packages(base: Path):
    python = make_venv(base / "venv", DIFFUSERS)
    outside = install_target(base / "outside", VLLM_OMNI)
    (_purelib(python) / "outside.pth").write_text(f"# vllm-omni lives elsewhere\n\n{outside}\n")
    patches = fault_set(install_target(base / "pristine"), base / "set")
    status = run("status", "--python", python, "--patches", patches, "--json")
    assert status.code == 0, status.stdout + status.stderr
    omni = status.json()["patches"][2]
    assert omni["installed_version"] == "0.20.0"
    assert omni["files"][0]["path"] == str(outside / OMNI_PIPELINE)
    assert run("apply", "--python", python, "--patches", patches).code == 0
    assert b"omni-mark" in (outside / OMNI_PIPELINE).read_bytes()
    assert run("verify", "--python", python, "--patches", patches, "-q").code == 0


def _attacker_owns(path: Path) -> None:
    os.chown(path, ATTACKER, ATTACKER)


def _venv_in_attackers_directory(base: Path) -> tuple[Path, Path]:
    home = base / "home"
    home.mkdir()
    _attacker_owns(home)
    return make_venv(home / "venv", VLLM_OMNI), home


def _group_writable_bin(base: Path) -> tuple[Path, Path]:
    python = make_venv(base / "venv", VLLM_OMNI)
    python.parent.chmod(0o775)
    return python, python.parent


def _link_into_attackers_directory(base: Path) -> tuple[Path, Path]:
    """A root-owned venv whose bin/python resolves through a directory the attacker owns."""
    python = make_venv(base / "venv", VLLM_OMNI)
    theirs = base / "theirs"
    theirs.mkdir()
    (theirs / "python3").symlink_to(os.path.realpath(python))
    _attacker_owns(theirs)
    python.unlink()
    python.symlink_to(theirs / "python3")
    return python, theirs


def _attackers_pyvenv_cfg(base: Path) -> tuple[Path, Path]:
    python = make_venv(base / "venv", VLLM_OMNI)
    config = base / "venv" / "pyvenv.cfg"
    _attacker_owns(config)
    return python, config


SCENES = {"venv in a directory the other user owns": _venv_in_attackers_directory,
          "group-writable bin directory": _group_writable_bin,
          "bin/python resolves through the other user's directory": _link_into_attackers_directory,
          "pyvenv.cfg the other user owns": _attackers_pyvenv_cfg}


@pytest.mark.parametrize("scene", SCENES)
def test_an_interpreter_another_user_could_replace_is_refused_unless_allowed(base: Path, scene: str):
    python, culprit = SCENES[scene](base)
    patches = fault_set(install_target(base / "pristine"), base / "set")
    marker = base / "marker"
    (_purelib(python) / "zz-planted.pth").write_text("import os; " + MARKER_CODE.format(marker=str(marker),
                                                                                      what="pth") + "\n")
    for args in (("status", "--patches", patches), ("verify", "--patches", patches, "-q"),
                 ("apply", "--patches", patches, "--dry-run"), ("apply", "--patches", patches), ("revert",),
                 ("selftest",), ("create", "vllm-omni", OMNI_PIPELINE, "--name", "x", "--patches", base / "new")):
        refused = run(*args, "--python", python)
        assert refused.code == 7, f"{args[0]}: {refused.stdout + refused.stderr}"
        assert refused.reason == (f"error: refusing to run interpreter {python} as root: {culprit} is "
                                  f"{'writable by group 0' if 'group' in scene else f'owned by uid {ATTACKER}'}, "
                                  "so another user could make root run their code"), refused.stderr
        if "-q" not in args:  # quiet: the one line only
            assert "try: " in refused.stderr and ALLOW in refused.stderr, refused.stderr
    assert _ran(marker) == "", "the refused interpreter ran"
    only = ("--patches", patches, "--only", "omni")  # the venv holds vllm-omni alone
    dry = run("apply", "--python", python, *only, "--dry-run", ALLOW, "--json")
    assert dry.code == 0 and dry.json()["patches"][0]["installed_version"] == "0.20.0", dry.stdout + dry.stderr
    assert run("verify", "--python", python, *only, ALLOW, "-q").code == 1
    assert _ran(marker) == "", "the allowed interpreter still describes its environment isolated"
    selftest = run("selftest", "--python", python, ALLOW)  # imports the environment's packages: site runs
    assert "refusing to run interpreter" not in selftest.stderr, selftest.stderr


def test_status_json_names_the_refusal(base: Path):
    python, home = _venv_in_attackers_directory(base)
    refused = run("status", "--python", python, "--json")
    assert refused.code == 7
    error = refused.json()["error"]
    assert error["reason"].startswith(f"refusing to run interpreter {python} as root: {home} is owned by uid")
    assert ALLOW in error["hint"]


def test_the_fast_entry_takes_allow_user_writable():
    from ernie_patcher.cli.quick import parse

    for command in ("verify", "status"):
        options = parse([command, "--python", "/opt/venv", ALLOW, "--json"])
        assert options is not None and options["allow_user_writable"] is True
    assert parse(["apply", "--dry-run", ALLOW])["allow_user_writable"] is True
    assert parse(["verify", "--python", "/opt/venv"])["allow_user_writable"] is False


def test_in_process_allowance_reaches_every_interpreter_run(base: Path):
    """The engine's own calls (discovery, the bytecode of the patched files) carry the allowance."""
    from ernie_patcher.core import engine
    from ernie_patcher.core.report import Target
    from ernie_patcher.errors import PatcherError

    python, _ = _venv_in_attackers_directory(base)
    patches = fault_set(install_target(base / "pristine"), base / "set")
    with pytest.raises(PatcherError, match="refusing to run interpreter"):
        engine.status(Target(python=str(python), patches=patches), ("omni",))
    report = engine.apply(Target(python=str(python), patches=patches), ("omni",), allow_user_writable=True)
    assert int(report.exit_code) == 0, report
    verified = engine.verify(Target(python=str(python), patches=patches, allow_user_writable=True), ("omni",), True)
    assert int(verified.exit_code) == 0
    assert cli("revert", "--python", python, ALLOW).code == 0


def test_selftest_refuses_a_search_path_another_user_can_write(base: Path):
    """selftest imports torch and the patched packages and runs `site` (the environment probe does
    not): a root-owned interpreter whose site-packages another user owns is refused before it runs,
    naming the directory; nothing of that user's runs. With --allow-user-writable it runs."""
    python = make_venv(base / "venv", VLLM_OMNI)
    site = _purelib(python)
    marker = base / "marker"
    (site / "zz-planted.pth").write_text("import os; " + MARKER_CODE.format(marker=str(marker), what="pth") + "\n")
    _attacker_owns(site)
    refused = run("selftest", "--python", python)
    assert refused.code == 7, refused.stdout + refused.stderr
    assert refused.reason == (f"error: refusing to run selftest in {python} as root: {site} is owned by uid "
                              f"{ATTACKER}, and the selftest imports from {site}"), refused.stderr
    assert "try: " in refused.stderr and ALLOW in refused.stderr, refused.stderr
    assert _ran(marker) == "", f"root ran code planted in the environment: {_ran(marker)!r}"
    allowed = run("selftest", "--python", python, ALLOW)
    assert "refusing to run selftest" not in allowed.stderr, allowed.stderr
    assert "pth" in _ran(marker), "with --allow-user-writable the selftest's interpreter runs site"


def test_site_directories_are_the_venvs_and_the_bases_only_when_it_includes_them(tmp_path: Path):
    """What the selftest's refusal checks, found from the layout without running the interpreter."""
    from ernie_patcher.target.interpreter import site_directories

    said = subprocess.run(["python3.11", "-c", "import sys, sysconfig; print(sys.executable); "
                           "print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True)
    base_python, base_site = said.stdout.split()
    base_site = Path(base_site)
    assert base_site in site_directories(base_python)
    for name, options in (("plain", []), ("system", ["--system-site-packages"])):
        subprocess.run(["python3.11", "-m", "venv", "--without-pip", *options, str(tmp_path / name)], check=True)
        found = site_directories(str(tmp_path / name / "bin" / "python"))
        assert _purelib(tmp_path / name / "bin" / "python") in found, found
        assert (base_site in found) == (name == "system"), (name, found)
