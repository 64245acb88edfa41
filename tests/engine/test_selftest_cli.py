"""`ernie-patch selftest` in the ernie-patch process: it never imports torch, and it treats the target
interpreter's answer as hostile (bounded, timed, validated). The target here is a stand-in interpreter
(a shell script) printing a chosen answer; the real checks run in the numerics tier."""
from __future__ import annotations

import json
from importlib import resources
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

REPO = Path(__file__).resolve().parents[2]


def _check(name: str, status: str, error: float | None = None, tolerance: float | None = None,
           detail: str = "") -> dict:
    return {"name": name, "status": status, "error": error, "tolerance": tolerance, "unit": "abs",
            "detail": detail, "seconds": 0.1}


def _document(*checks: dict) -> dict:
    return {"schema": 1, "python": "/opt/venv/bin/python", "python_version": "3.11.0", "error": None,
            "device": "cpu (fake npu device)", "dtype": "bf16", "versions": {"torch": "2.13.0"},
            "checks": list(checks), "seconds": 1.5}


GOOD = _document(_check("rope", "passed", 1e-3, 1e-1), _check("sp", "skipped", detail="not requested"))


def _interpreter(tmp_path: Path, body: str) -> Path:
    """An executable standing in for the target's Python: runs BODY (sh) whatever its arguments."""
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return script


def _answering(tmp_path: Path, answer: str | dict) -> Path:
    payload = tmp_path / "answer.json"
    payload.write_text(answer if isinstance(answer, str) else json.dumps(answer))
    return _interpreter(tmp_path, f"cat '{payload}'")


def _torch_trap(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """An environment whose `import torch` (and diffusers, vllm_omni, torch_npu) leaves a marker file."""
    trap, marker = tmp_path / "trap", tmp_path / "imported"
    for name in ("torch", "torch_npu", "diffusers", "vllm_omni"):
        (trap / name).mkdir(parents=True)
        (trap / name / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write({name!r} + '\\n')\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(trap), str(REPO)])), marker


def ernie_patch(*args: str, env: dict[str, str] | None = None, timeout: float = 60
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ernie_patcher", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env=env or dict(os.environ, PYTHONPATH=str(REPO)))


def test_trap_catches_an_import(tmp_path: Path) -> None:
    """The trap used below works: a process importing torch from that environment leaves the marker."""
    env, marker = _torch_trap(tmp_path)
    subprocess.run([sys.executable, "-c", "import torch"], env=env, check=True)
    assert marker.read_text() == "torch\n"


@pytest.mark.parametrize("args", [("--help",), ("--json",), ()], ids=["help", "json", "plain"])
def test_selftest_process_never_imports_torch(tmp_path: Path, args: tuple[str, ...]) -> None:
    env, marker = _torch_trap(tmp_path)
    target = _answering(tmp_path, GOOD)
    run = ernie_patch("selftest", *args, *(() if args == ("--help",) else ("--python", str(target))), env=env)
    assert run.returncode == 0, run.stderr
    assert not marker.exists(), marker.read_text()


def test_good_answer_is_rendered_and_exit_0(tmp_path: Path) -> None:
    run = ernie_patch("selftest", "--python", str(_answering(tmp_path, GOOD)), "--json")
    assert run.returncode == 0, run.stderr
    document = json.loads(run.stdout)
    assert document["command"] == "selftest" and document["ok"] and document["exit_code"] == 0
    assert [c["status"] for c in document["selftest"]["checks"]] == ["passed", "skipped"]
    schema = json.loads(resources.files("ernie_patcher.schema").joinpath("report.schema.json").read_text())
    assert not list(Draft202012Validator(schema).iter_errors(document))
    plain = ernie_patch("selftest", "--python", str(_answering(tmp_path, GOOD)))
    assert "1 passed, 0 failed, 1 skipped" in plain.stdout


def test_failed_check_is_exit_8_naming_it(tmp_path: Path) -> None:
    answer = _document(_check("rope", "failed", 7.3, 0.12), _check("model[x]", "passed", 0.01, 0.06))
    run = ernie_patch("selftest", "--python", str(_answering(tmp_path, answer)))
    assert run.returncode == 8
    assert run.stderr.splitlines()[0] == "error: selftest failed: rope (rope: 7.3 > tolerance 0.12)"
    document = json.loads(ernie_patch("selftest", "--python", str(_answering(tmp_path, answer)), "--json").stdout)
    assert document["exit_code"] == 8 and document["error"]["kind"] == "selftest_failed"


HOSTILE = {
    "nothing": "",
    "garbage": "Traceback (most recent call last): boom",
    "a list": "[1, 2]",
    "wrong schema": json.dumps(dict(GOOD, schema=2)),
    "no checks": json.dumps(_document()),
    "passed above tolerance": json.dumps(_document(_check("rope", "passed", 1.0, 0.1))),
    "passed without error": json.dumps(_document(_check("rope", "passed"))),
    "unknown status": json.dumps(_document(_check("rope", "ok", 0.0, 0.1))),
    "skipped without reason": json.dumps(_document(_check("sp", "skipped"))),
    "nan error": json.dumps(_document(_check("rope", "failed", 0.1, 0.1))).replace("0.1,", "NaN,", 1),
    "name not a string": json.dumps(_document(dict(_check("rope", "failed", 1.0, 0.1), name=["x"]))),
    "deep nesting": "[" * 100000 + "]" * 100000,
}


@pytest.mark.parametrize("answer", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_answer_is_one_line_exit_7(tmp_path: Path, answer: str) -> None:
    run = ernie_patch("selftest", "--python", str(_answering(tmp_path, answer)))
    assert run.returncode == 7, (run.stdout, run.stderr)
    assert run.stderr.startswith("error: selftest in interpreter ")
    document = json.loads(ernie_patch("selftest", "--python", str(_answering(tmp_path, answer)), "--json").stdout)
    assert document["exit_code"] == 7 and not document["ok"]


def test_runtime_error_reported_by_the_target_is_exit_7(tmp_path: Path) -> None:
    answer = dict(GOOD, error="torch does not import in /opt/venv/bin/python: No module named 'torch'")
    run = ernie_patch("selftest", "--python", str(_answering(tmp_path, answer)))
    assert run.returncode == 7
    assert "torch does not import" in run.stderr.splitlines()[0]


def test_crashing_interpreter_is_exit_7_with_its_last_words(tmp_path: Path) -> None:
    run = ernie_patch("selftest", "--python", str(_interpreter(tmp_path, "echo 'ModuleNotFoundError: torch' >&2; exit 1")))
    assert run.returncode == 7
    assert run.stderr.splitlines()[0] == ("error: selftest in interpreter " + str(tmp_path / "python")
                                          + " failed (exit 1): it printed 'ModuleNotFoundError: torch' on stderr")


def test_endless_output_is_capped(tmp_path: Path) -> None:
    run = ernie_patch("selftest", "--python", str(_interpreter(tmp_path, "exec yes '{}'")), timeout=120)
    assert run.returncode == 7
    assert "printed more than" in run.stderr.splitlines()[0] or "did not finish" in run.stderr.splitlines()[0]


def test_hanging_interpreter_is_ended_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    target = _interpreter(tmp_path, f"sleep 300 & echo $! > '{pid_file}'; sleep 300")
    env = dict(os.environ, PYTHONPATH=str(REPO), ERNIE_PATCHER_SELFTEST_TIMEOUT="2")
    started = time.monotonic()
    run = ernie_patch("selftest", "--python", str(target), env=env)
    assert time.monotonic() - started < 30
    assert run.returncode == 7
    assert "did not finish within 2 s" in run.stderr.splitlines()[0]
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_missing_interpreter_is_exit_7(tmp_path: Path) -> None:
    run = ernie_patch("selftest", "--python", str(tmp_path / "nope"))
    assert run.returncode == 7
    assert run.stderr.startswith(f"error: cannot run interpreter {tmp_path / 'nope'}")
