"""What ernie-patch runs is bounded: a `--python` interpreter or the selftest's target that starts a
setsid or double-forked child holding its pipes, sleeps forever, or prints without end ends within its
timeout + 2 s, leaves no process of it alive, and costs ernie-patch at most the 1 MiB stdout cap plus
a few MB; a command pays an interpreter's timeout once; a malformed number in any setting means its
default (never exit 70); a stopped compile worker does not hold apply."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from faultkit import TRANSFORMER, command, environ, run
from support.cli import ROOT
from support.patchsets import PatchDef, file_diff, write_patchset

TIMEOUT = 3
CAP = 1 << 20
# Hostile target interpreters (sh). Each child records its own pid in $PIDS; a printer floods stderr and
# ignores SIGPIPE, so only being killed ends it; a "parent-gone" interpreter exits once its child is
# recorded, leaving it holding the pipes.
_SLEEPER = "setsid sh -c 'echo $$ >> \"$PIDS\"; exec sleep 1000' &"
_PRINTER = "(setsid sh -c 'trap \"\" PIPE; echo $$ >> \"$PIDS\"; while :; do echo noise >&2; done' &);"
_RECORDED = "while [ ! -s \"$PIDS\" ]; do sleep 0.01; done; echo started;"
HOSTILE = {
    "setsid-sleeper": f"{_SLEEPER} {_RECORDED} exec sleep 1000",
    "setsid-sleeper-parent-gone": f"{_SLEEPER} {_RECORDED} exit 0",
    "double-fork-printer": f"{_PRINTER} {_RECORDED} exec sleep 1000",
    "double-fork-printer-parent-gone": f"{_PRINTER} {_RECORDED} exit 0",
    "endless-stdout": "echo $$ >> \"$PIDS\"; exec yes",
    "endless-stderr": "echo $$ >> \"$PIDS\"; exec yes >&2",
}
SAID = {"setsid-sleeper": f"within {TIMEOUT} s", "double-fork-printer": f"within {TIMEOUT} s",
        "endless-stderr": f"within {TIMEOUT} s", "endless-stdout": f"printed more than {CAP} bytes on stdout",
        "setsid-sleeper-parent-gone": "printed no", "double-fork-printer-parent-gone": "printed no"}
SETTINGS = {  # each numeric setting, and a command that reads it
    "ERNIE_PATCHER_PYTHON_TIMEOUT": "python",
    "ERNIE_PATCHER_SELFTEST_TIMEOUT": "selftest",
    "ERNIE_PATCHER_SELFTEST_SP_TIMEOUT": "selftest-sp",
    "ERNIE_PATCHER_JOBS": "apply",
}
MALFORMED = ("nan", "inf", "-inf", "1e999", "abc", "\u00b2", "-3", "0", "", "9" * 5000)


def _script(directory: Path, body: str, name: str = "python") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / name
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _bounded(*args: str | Path, env: dict[str, str], limit: float = TIMEOUT + 15) -> tuple[int | None, float, int, str]:
    """(exit code, seconds, peak RSS in KiB of ernie-patch and what it reaped, stderr) of `ernie-patch ARGS`;
    killed (exit None) after LIMIT seconds."""
    started = time.monotonic()
    with open(os.devnull, "wb") as sink, tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command(*args), stdout=sink, stderr=errors,
                                   env=environ({"PYTHONDONTWRITEBYTECODE": "1", **env}))
        code = None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() - started > limit:
                process.kill()
                _, _, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        process.returncode = code if code is not None else -9
        seconds = time.monotonic() - started
        errors.seek(0)
        return code, seconds, usage.ru_maxrss, errors.read(1 << 16).decode(errors="replace")


def _baseline_rss(tmp_path: Path, args: tuple[str, ...], env: dict[str, str]) -> int:
    """Peak RSS (KiB) of the same command against an interpreter that answers garbage at once."""
    plain = _script(tmp_path / "plain", "echo garbage")
    return _bounded(*args, "--python", plain, env=env)[2]


def _check_bounded(tmp_path: Path, kind: str, args: tuple[str, ...], variable: str) -> None:
    pids = tmp_path / "pids"
    hostile = _script(tmp_path / "hostile", HOSTILE[kind])
    env = {variable: str(TIMEOUT), "PIDS": str(pids)}
    baseline = _baseline_rss(tmp_path, args, env)
    code, seconds, rss, stderr = _bounded(*args, "--python", hostile, env=env)
    first = stderr.splitlines()[0] if stderr else ""
    assert code == 7, stderr
    assert first.startswith("error: ") and SAID[kind] in first, stderr
    assert seconds < TIMEOUT + 2, f"{kind}: took {seconds:.1f} s with a {TIMEOUT} s timeout"
    assert rss <= baseline + CAP // 1024 + 6 * 1024, f"{kind}: peak RSS {rss} KiB, {baseline} KiB without the flood"
    time.sleep(0.3)
    started = [int(line) for line in pids.read_text().split()] if pids.exists() else []
    assert started, f"{kind}: the hostile interpreter recorded no process"
    alive = [pid for pid in started if _alive(pid)]
    assert not alive, f"{kind}: processes {alive} it started outlived ernie-patch"


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_python_interpreter_run_is_bounded(tmp_path: Path, kind: str):
    _check_bounded(tmp_path, kind, ("status",), "ERNIE_PATCHER_PYTHON_TIMEOUT")


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_selftest_run_is_bounded(tmp_path: Path, kind: str):
    _check_bounded(tmp_path, kind, ("selftest",), "ERNIE_PATCHER_SELFTEST_TIMEOUT")


@pytest.mark.parametrize("args", [("status",), ("verify",), ("verify", "--json"), ("apply", "--dry-run"), ("apply",)])
def test_a_hanging_interpreter_costs_one_timeout_per_command(tmp_path: Path, args: tuple[str, ...]):
    """The quick path asks the interpreter first, then the engine: the second ask fails at once."""
    hanging = _script(tmp_path, "exec sleep 1000")
    started = time.monotonic()
    result = run(*args, "--python", hanging, env={"ERNIE_PATCHER_PYTHON_TIMEOUT": str(TIMEOUT)})
    seconds = time.monotonic() - started
    assert result.code == 7 and f"did not answer within {TIMEOUT} s" in (result.reason + result.stdout), result.stderr
    assert seconds < TIMEOUT + 2, f"{' '.join(args)} took {seconds:.1f} s: the {TIMEOUT} s timeout was paid twice"


def _reading_python(tmp_path: Path, answer: str) -> tuple[Path, Path]:
    """A stand-in interpreter that records its arguments, then prints ANSWER."""
    argv = tmp_path / "argv.json"
    body = (f"printf '%s\\n' \"$@\" | {sys.executable} -c 'import json, sys; "
            f"json.dump(sys.stdin.read().splitlines(), open(\"{argv}\", \"w\"))'\n"
            f"cat <<'EOF'\n{answer}\nEOF")
    return _script(tmp_path / "stand-in", body), argv


GOOD_SELFTEST = json.dumps({"schema": 1, "python": "/x/python", "python_version": "3.11.0", "error": None,
                            "device": "cpu", "dtype": "bf16", "versions": {"torch": "2.13.0"}, "seconds": 1.0,
                            "checks": [{"name": "rope", "status": "passed", "error": 0.0, "tolerance": 0.1,
                                        "unit": "abs", "detail": "", "seconds": 0.1}]})


@pytest.mark.parametrize("variable", sorted(SETTINGS))
def test_malformed_settings_mean_the_default(site: Path, tmp_path: Path, variable: str):
    """nan, inf, 1e999, abc, a superscript two, negative, zero, empty, 5000 digits: exit as with the
    variable unset, never 70."""
    use = SETTINGS[variable]
    if use == "python":
        args: tuple = ("status", "--python", sys.executable)
    elif use == "apply":
        patches = write_patchset(tmp_path / "set", [PatchDef("one", "diffusers", "diffusers", file_diff(
            site, TRANSFORMER, lambda lines: lines + ["MARK = 1\n"]))])
        args = ("apply", "--dry-run", "--site", site, "--patches", patches)
    else:
        python, argv = _reading_python(tmp_path, GOOD_SELFTEST)
        args = ("selftest", "--python", python) + (("--sp", "2") if use == "selftest-sp" else ())
    expected = run(*args)
    assert expected.code != 70, expected.stderr
    for value in MALFORMED:
        result = run(*args, env={variable: value})
        assert result.code == expected.code, f"{variable}={value[:20]!r}: exit {result.code}: {result.stderr}"
        if use == "selftest-sp":
            options = json.loads(json.loads(argv.read_text())[-1])
            assert options["sp_timeout"] == 600.0, f"{variable}={value[:20]!r}: {options}"


def _timeout_readers() -> list[tuple[str, object, float, float]]:
    from ernie_patcher.selftest import launch
    from ernie_patcher.target import interpreter

    return [(interpreter.TIMEOUT_ENV, interpreter._timeout, interpreter.DEFAULT_TIMEOUT, interpreter.MAX_TIMEOUT),
            (launch.TIMEOUT_ENV, launch._timeout, launch.DEFAULT_TIMEOUT, launch.MAX_TIMEOUT),
            (launch.SP_TIMEOUT_ENV, launch._sp_timeout, launch.DEFAULT_SP_TIMEOUT, launch.MAX_TIMEOUT)]


def test_no_timeout_is_disabled_or_unbounded(monkeypatch: pytest.MonkeyPatch):
    """nan or inf must not disable a timeout (a wait on nan or inf never ends); a huge one is capped."""
    for variable, read, default, maximum in _timeout_readers():
        for value in MALFORMED:
            monkeypatch.setenv(variable, value)
            assert read() == default, f"{variable}={value[:20]!r} gives {read()}, not the default {default}"
        monkeypatch.setenv(variable, "1e300")
        assert read() == maximum
        monkeypatch.setenv(variable, " 7.5 ")
        assert read() == 7.5


def test_sp_timeout_is_passed_only_with_sp_and_read_nowhere_else(tmp_path: Path):
    python, argv = _reading_python(tmp_path, GOOD_SELFTEST)
    assert run("selftest", "--python", python, env={"ERNIE_PATCHER_SELFTEST_SP_TIMEOUT": "abc"}).code == 0
    assert json.loads(json.loads(argv.read_text())[-1])["sp_timeout"] is None
    assert run("selftest", "--python", python, "--sp", "2",
               env={"ERNIE_PATCHER_SELFTEST_SP_TIMEOUT": "1e300"}).code == 0
    assert json.loads(json.loads(argv.read_text())[-1])["sp_timeout"] == 86400.0
    runtime = ROOT / "ernie_patcher" / "selftest" / "runtime"
    readers = [p.name for p in runtime.glob("*.py") if "ERNIE_PATCHER_SELFTEST_SP_TIMEOUT" in p.read_text()]
    assert readers == [], f"the runtime reads the variable itself: {readers}"


_STOPPED_WORKER = textwrap.dedent("""
    import os, signal, sys
    from ernie_patcher.fs import compilepool
    from ernie_patcher.cli.commands import main

    compilepool.REPLY_BASE_S = 2.0
    start = compilepool._Pool._start

    def start_one_stopped(self):
        process = start(self)
        if len(self.processes) == 1:
            os.kill(process.pid, signal.SIGSTOP)  # as another user's kill -STOP would
            with open(os.environ["STOPPED_PID"], "w") as record:
                record.write(str(process.pid))
        return process

    compilepool._Pool._start = start_one_stopped
    sys.argv = ["ernie-patch", *sys.argv[1:]]
    main()
""")


def test_a_stopped_compile_worker_does_not_hold_apply(site: Path, tmp_path: Path):
    """A compile worker stopped with SIGSTOP misses its reply's deadline: it is killed, its files are
    compiled in ernie-patch, apply completes with fresh bytecode, and the lock is free."""
    from importlib.util import cache_from_source

    from ernie_patcher.fs.bytecode import compile_source

    modules = sorted((site / "diffusers" / "models").rglob("*.py"), key=lambda p: -p.stat().st_size)[:8]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *map(str, modules)], check=True)
    diff = "".join(file_diff(site, str(p.relative_to(site)), lambda lines: lines + ["MARK = 1\n"]) for p in modules)
    patches = write_patchset(tmp_path / "set", [PatchDef("many", "diffusers", "diffusers", diff)])
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", _STOPPED_WORKER, "apply", "--site", str(site), "--patches",
                               str(patches)], capture_output=True, text=True, timeout=120,
                              env=environ({"ERNIE_PATCHER_JOBS": "2", "STOPPED_PID": str(tmp_path / "stopped.pid")}))
    except subprocess.TimeoutExpired:
        pytest.fail("apply hung on a stopped compile worker")
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 60
    stopped = int((tmp_path / "stopped.pid").read_text())
    assert not _alive(stopped), "the stopped worker was left behind"
    for path in modules:
        assert path.read_bytes().endswith(b"MARK = 1\n")
        assert Path(cache_from_source(str(path))).read_bytes()[16:] == compile_source(path.read_bytes(), path)
    assert run("revert", "--site", site).code == 0, "the lock was left held"
