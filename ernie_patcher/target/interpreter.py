"""Ask another interpreter (`--python PATH`) to describe its environment: bounded in time, its
whole process group ended on timeout, and its answer checked before anything trusts it."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from ..errors import ExitCode, PatcherError
from ..settings import seconds
from . import envprobe

TIMEOUT_ENV = "ERNIE_PATCHER_PYTHON_TIMEOUT"
DEFAULT_TIMEOUT = 120.0
OLDEST = (3, 8)  # importlib.metadata
HINT = "pass --python a Python >= 3.8 executable of the environment to patch, or the environment's directory"
# Runs first in the other interpreter, in syntax every Python parses, so an old one says its
# version instead of failing on the probe's own syntax.
_PREAMBLE = """import sys
if sys.version_info[:2] < %r:
    sys.stdout.write('{"too_old": "%%d.%%d.%%d"}' %% tuple(sys.version_info[:3]))
    sys.exit(0)
exec(compile(%r, "ernie_patcher_envprobe", "exec"))
"""


def _timeout() -> float:
    return seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT, minimum=0.1)


def _said(text: str) -> str:
    """What the interpreter printed, shortened to a quote for a one-line reason."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return "nothing"
    quoted = lines[-1] if len(lines) == 1 else f"{lines[-1]} (last of {len(lines)} lines)"
    return repr(quoted[:160])


def _refuse(python: str, what: str, stdout: str, stderr: str) -> PatcherError:
    said = f"it printed {_said(stdout)} on stdout"
    if stderr.strip():
        said += f" and {_said(stderr)} on stderr"
    details = [line if len(line) <= 200 else line[:200] + "..." for line in stderr.strip().splitlines()[-5:]]
    return PatcherError(ExitCode.ENVIRONMENT, f"interpreter {python} {what}: {said}", details=details, hint=HINT)


def _run(python: str, request: dict) -> tuple[int, str, str]:
    import subprocess  # only for --python: the CLI starts faster without it

    source = _PREAMBLE % (OLDEST, Path(envprobe.__file__).read_text(encoding="utf-8"))
    try:
        process = subprocess.Popen([python, "-c", source, json.dumps(request)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        raise PatcherError(ExitCode.ENVIRONMENT, f"cannot run interpreter {python}: {exc.strerror or exc}",
                           hint=HINT) from None
    try:
        out, err = process.communicate(timeout=_timeout())
    except subprocess.TimeoutExpired:
        _end_group(process.pid)
        out, err = process.communicate()
        raise _refuse(python, f"did not answer within {_timeout():g} s and was ended with its process group",
                      out.decode(errors="replace"), err.decode(errors="replace")) from None
    except BaseException:
        _end_group(process.pid)
        process.wait()
        raise
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _end_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _shape_ok(described: object, request: dict) -> bool:
    if not isinstance(described, dict):
        return False
    if not all(isinstance(described.get(k), str) for k in ("python", "python_version", "purelib")):
        return False
    dists, modules = described.get("distributions"), described.get("modules")
    if not isinstance(dists, dict) or not isinstance(modules, dict):
        return False
    for dist, module in request["packages"]:
        info, location = dists.get(dist), modules.get(module)
        if info is not None and not (isinstance(info, dict) and isinstance(info.get("version"), str)
                                     and isinstance(info.get("dist_info"), (str, type(None)))):
            return False
        if location is not None and not (isinstance(location, dict) and isinstance(location.get("module_dir"), str)):
            return False
    return True


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(".")[:2])
    except ValueError:
        return ()


def resolve(python: str) -> str:
    """The interpreter PYTHON names: itself, or the Python of the environment directory it names
    (a venv, virtualenv or uv environment: DIR/bin/python)."""
    if not os.path.isdir(python):
        return python
    for name in ("bin/python", "bin/python3", "Scripts/python.exe"):
        candidate = os.path.join(python, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise PatcherError(ExitCode.ENVIRONMENT, f"--python {python} is a directory with no bin/python: "
                       "not a virtual environment", hint=HINT)


def describe(python: str, request: dict) -> dict:
    """The environment description of interpreter PYTHON (see envprobe.describe), checked."""
    python = resolve(python)
    code, out, err = _run(python, request)
    if code != 0:
        raise _refuse(python, f"failed to describe its environment (exit {code}; is it a Python >= "
                      f"{'.'.join(map(str, OLDEST))} interpreter?)", out, err)
    try:
        described = json.loads(out)
    except (ValueError, RecursionError):
        raise _refuse(python, "printed no JSON description of its environment", out, err) from None
    if isinstance(described, dict) and isinstance(described.get("too_old"), str):
        raise PatcherError(ExitCode.ENVIRONMENT, f"interpreter {python} is Python {described['too_old'][:20]}, "
                           f"older than {'.'.join(map(str, OLDEST))}", hint=HINT)
    if not _shape_ok(described, request):
        raise _refuse(python, "printed JSON that is not an environment description", out, err)
    if _version(described["python_version"]) < OLDEST:
        raise PatcherError(ExitCode.ENVIRONMENT, f"interpreter {python} is Python {described['python_version']}, "
                           f"older than {'.'.join(map(str, OLDEST))}", hint=HINT)
    return described
