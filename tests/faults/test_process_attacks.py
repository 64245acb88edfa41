"""Attacks through the process: a --python that lies or hangs, a patched file too deep to compile,
Ctrl-C / SIGTERM during a write, and an internal error. Each gives its documented exit code and a
one-line reason, leaves nothing behind, and the site all pristine or all patched."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from faultkit import (PAUSE_ENV, STATE, TRANSFORMER, changed, cli, fault_set, run, spawn, states, tree,
                      wait_stopped)
from support.patchsets import PatchDef, file_diff, insert_after, write_patchset
from support.tree import snapshot

ANSWERS = {
    "silent": "exit 0",
    "garbage": "echo 'Python 2.7.18 says hello'",
    "json-list": "echo '[1, 2]'",
    "wrong-shape": "echo '{\"python\": 1}'",
    "old-python": "echo '{\"python\": \"/x\", \"python_version\": \"2.7.18\", \"purelib\": \"/x\", "
                  "\"distributions\": {}, \"modules\": {}}'",
    "crashes": "echo 'SyntaxError: invalid syntax' >&2; exit 1",
}


def _interpreter(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("kind", sorted(ANSWERS))
def test_bad_interpreter_answer_is_one_line_exit_7(tmp_path: Path, kind: str):
    python = _interpreter(tmp_path, ANSWERS[kind])
    plain = cli("status", "--python", python)
    assert plain.code == 7, (plain.stdout, plain.stderr)
    assert plain.reason.startswith(f"error: interpreter {python} "), plain.reason
    as_json = cli("status", "--python", python, "--json")
    document = json.loads(as_json.stdout)
    assert as_json.code == 7 and document["exit_code"] == 7
    assert document["error"]["reason"].startswith(f"interpreter {python} ")


def test_true_as_interpreter(tmp_path: Path):
    result = cli("verify", "--python", "/bin/true", "--json")
    assert result.code == 7 and json.loads(result.stdout)["error"]["reason"].startswith(
        "interpreter /bin/true printed no JSON description of its environment: it printed nothing")


def test_hanging_interpreter_is_ended_with_its_children(tmp_path: Path):
    pidfile = tmp_path / "child.pid"
    python = _interpreter(tmp_path, f"sleep 300 &\necho $! > {pidfile}\nsleep 300")
    started = time.monotonic()
    result = run("status", "--python", python, env={"ERNIE_PATCHER_PYTHON_TIMEOUT": "2"})
    assert result.code == 7 and "did not answer within 2 s" in result.reason, result.stderr
    assert time.monotonic() - started < 60
    child = int(pidfile.read_text())
    time.sleep(0.5)
    state = Path(f"/proc/{child}/status")
    alive = state.exists() and "State:\tZ" not in state.read_text()
    assert not alive, "the interpreter's child kept running after the timeout"


def test_patched_file_too_deep_to_compile_is_refused_leaving_nothing(site: Path, tmp_path: Path):
    deep = "X = " + "+".join(["1"] * 60000) + "\n"
    patches = write_patchset(tmp_path / "deep", [PatchDef(
        "deep", "diffusers", "diffusers", file_diff(site, TRANSFORMER, insert_after("import torch", deep)))])
    before = snapshot(site)
    result = cli("apply", "--site", site, "--patches", patches)
    assert result.code == 5, result.stderr
    assert f"patched {site / TRANSFORMER} would not compile: RecursionError" in result.reason, result.reason
    assert not (site / STATE).exists(), "a lock file or state directory was left behind"
    assert snapshot(site) == before


def test_internal_error_is_one_line_with_a_traceback_file(site: Path, tmp_path: Path, monkeypatch):
    from ernie_patcher.core import engine

    def broken(*args, **kwargs):
        raise RuntimeError("planted bug")

    monkeypatch.setattr(engine, "load_series", broken)
    result = cli("status", "--site", site)
    assert result.code == 70, result.stderr
    assert result.reason.startswith("error: internal error in ernie-patch status: RuntimeError: planted bug "
                                    "(traceback in "), result.reason
    saved = Path(result.reason.split("traceback in ")[1].rstrip(")"))
    assert "planted bug" in saved.read_text()
    saved.unlink()
    document = json.loads(cli("status", "--site", site, "--json").stdout)
    assert document["exit_code"] == 70 and document["error"]["kind"] == "internal"


SIGNALS = [(signal.SIGINT, 130, "SIGINT"), (signal.SIGTERM, 143, "SIGTERM")]


def _interrupt(process, number: int) -> None:
    wait_stopped(process)
    os.kill(process.pid, number)
    os.kill(process.pid, signal.SIGCONT)


@pytest.mark.parametrize("number,code,name", SIGNALS, ids=[s[2] for s in SIGNALS])
def test_signal_during_apply_rolls_back_in_the_process(site: Path, tmp_path: Path, number: int, code: int, name: str):
    patches = fault_set(site, tmp_path / "set")
    pristine = snapshot(site)
    process = spawn("apply", "--site", site, "--patches", patches, "--json", env={PAUSE_ENV: "file-2-written"})
    _interrupt(process, number)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    document = json.loads(out)
    assert document["exit_code"] == code
    assert document["error"]["reason"] == f"interrupted by {name} during apply; every file written so far was put back"
    assert snapshot(site) == pristine, changed(pristine, snapshot(site))


def test_sigint_during_revert_plain_output(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    assert cli("apply", "--site", site, "--patches", patches).code == 0
    patched = tree(site)
    process = spawn("revert", "--site", site, env={PAUSE_ENV: "file-2-written"})
    _interrupt(process, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert err.splitlines()[0] == "error: interrupted by SIGINT during revert; every file written so far was put back"
    assert tree(site) == patched
    assert states(site, patches) == ["applied"] * 3


def test_second_signal_during_rollback_leaves_the_journal(site: Path, tmp_path: Path):
    patches = fault_set(site, tmp_path / "set")
    pristine = tree(site)
    process = spawn("apply", "--site", site, "--patches", patches, env={PAUSE_ENV: "file-2-written,restore-1"})
    _interrupt(process, signal.SIGINT)
    _interrupt(process, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted again while putting files back: the journal is left for the next run" in err.splitlines()[0]
    assert (site / STATE / "journal.json").exists()
    assert states(site, patches) == ["not-applied"] * 3
    assert tree(site) == pristine
