"""verify and status of an applied, unchanged environment answer from the manifest (fastpath) with
the engine's exact output, import neither the engine nor click, and leave every other case to
the engine."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli import DISPATCH, ROOT, cli, environ

HEAVY = ("ernie_patcher.core.engine", "ernie_patcher.patchset.series", "click", "unidiff", "rich", "packaging", "tomllib",
         "dataclasses", "importlib.metadata")
PROBE = ("import sys, atexit, json\n"
         "atexit.register(lambda: sys.stderr.write('LOADED=' + json.dumps(sorted(m for m in sys.modules "
         "if m.split('.')[0] in {h.split('.')[0] for h in HEAVY} and any(m == h or m.startswith(h + '.') "
         "for h in HEAVY))) + '\\n'))\n"
         "from ernie_patcher.cli.quick import main\n"
         "sys.argv = ['ernie-patch'] + sys.argv[1:]\n"
         "main()\n")


def run_quick(*args: str | Path, env: dict[str, str] | None = None) -> tuple[int, str, list[str]]:
    """`ernie-patch ARGS` through the installed entry point, as a process; the heavy modules it loaded."""
    code = f"HEAVY = {HEAVY!r}\n{PROBE}"
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=environ(env), cwd=ROOT, timeout=300)
    loaded = next(json.loads(line[7:]) for line in done.stderr.splitlines() if line.startswith("LOADED="))
    return done.returncode, done.stdout, loaded


@pytest.mark.parametrize("args", [("verify",), ("status",), ("verify", "--json"), ("status", "--json"),
                                  ("verify", "-q"), ("status", "--quiet"),
                                  ("verify", "--only", "omni-ulysses"), ("status", "--json", "--only=diffusers-rope")])
def test_applied_environment_is_answered_without_the_engine_and_exactly_as_the_engine(site: Path, args):
    assert cli("apply", "--site", site).code == 0
    code, out, loaded = run_quick(*args, "--site", site)
    assert loaded == [], f"the fast path imported {loaded}"
    engine = cli(*args, "--site", site)
    assert (code, out) == (engine.code, engine.stdout)


def _documented_settings() -> list[str]:
    """The variables of the README's table that set a number, not an option."""
    import re

    table = (ROOT / "README.md").read_text(encoding="utf-8").split("### Environment variables", 1)[1]
    table = table.split("\n\n", 2)[1]
    names = re.findall(r"^\| `(ERNIE_PATCHER_[A-Z_]+)` \| (.*)$", table, re.MULTILINE)
    return [name for name, meaning in names if not meaning.startswith("`--")]


def test_every_documented_setting_keeps_the_fast_path(site: Path):
    settings = _documented_settings()
    assert "ERNIE_PATCHER_JOBS" in settings and "ERNIE_PATCHER_PYTHON_TIMEOUT" in settings
    assert cli("apply", "--site", site).code == 0
    for name in settings:
        code, _, loaded = run_quick("verify", "--site", site, env={name: "3"})
        assert code == 0 and loaded == [], f"{name} set sends verify to the engine: {loaded}"
    code, _, loaded = run_quick("verify", "--site", site, env={"ERNIE_PATCHER_UNKNOWN": "1"})
    assert "click" in loaded, "an unknown variable must go to the click CLI, which knows every one"


def test_a_hand_edit_goes_to_the_engine_which_reports_it(site: Path):
    assert cli("apply", "--site", site).code == 0
    (site / DISPATCH).write_bytes((site / DISPATCH).read_bytes() + b"# edited\n")
    code, out, loaded = run_quick("verify", "--json", "--site", site)
    assert "ernie_patcher.core.engine" in loaded
    assert code == 6 and json.loads(out)["patches"][1]["state"] == "drifted"


def test_a_changed_series_file_goes_to_the_engine(site: Path, tmp_path: Path):
    patches = tmp_path / "set"
    subprocess.run(["cp", "-r", str(ROOT / "patches"), str(patches)], check=True)
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    assert run_quick("verify", "--site", site, "--patches", patches)[2] == []
    with open(patches / "series.toml", "a", encoding="utf-8") as handle:
        handle.write("\n# a comment changes the digest, not the meaning\n")
    code, _, loaded = run_quick("verify", "--site", site, "--patches", patches)
    assert code == 0 and "ernie_patcher.core.engine" in loaded


def test_before_apply_and_unknown_options_go_to_the_engine_and_click(site: Path):
    code, _, loaded = run_quick("status", "--site", site)
    assert code == 0 and "ernie_patcher.core.engine" in loaded
    assert cli("apply", "--site", site).code == 0
    code, _, loaded = run_quick("verify", "--site", site, "--no-such-option")
    assert code == 2 and "click" in loaded
    code, _, loaded = run_quick("verify", "--reparse", "--site", site)
    assert code == 0 and "ernie_patcher.core.engine" in loaded and "click" not in loaded


@pytest.mark.parametrize("args", [("apply", "--dry-run"), ("apply", "--dry-run", "--json", "--only", "omni-ulysses")])
def test_apply_dry_run_starts_without_click_and_reports_as_the_click_cli(site: Path, args):
    code, out, loaded = run_quick(*args, "--site", site)
    assert "click" not in loaded
    engine = cli(*args, "--site", site)
    assert (code, out) == (engine.code, engine.stdout)
    assert not (site / ".ernie-patcher").exists()


def test_python_option_is_answered_from_the_manifest_too(tmp_path: Path):
    """--python: the other interpreter describes its environment (envprobe run by it), then the
    manifest answers, as the engine would."""
    from support.cli import OMNI_PIPELINE
    from support.patchsets import PatchDef, file_diff, insert_after, write_patchset
    from support.realpkgs import VLLM_OMNI, make_venv

    python = make_venv(tmp_path / "venv", VLLM_OMNI)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    diff = file_diff(site, OMNI_PIPELINE, insert_after("import torch", "OMNI_MARK = 'omni-mark'\n"))
    patches = write_patchset(tmp_path / "set", [PatchDef("omni", "vllm-omni", "vllm_omni", diff, versions="==0.20.0",
                             probes=[{"file": OMNI_PIPELINE, "kind": "string", "value": "omni-mark"}])])
    assert cli("apply", "--python", python, "--patches", patches).code == 0
    code, out, loaded = run_quick("verify", "--json", "--python", python, "--patches", patches)
    assert loaded == []
    engine = cli("verify", "--json", "--python", python, "--patches", patches)
    assert (code, out) == (engine.code, engine.stdout) and json.loads(out)["ok"]
