"""Ask another interpreter (`--python PATH`) to describe its environment: bounded in time and output,
every process it started ended (runner), and its answer checked before anything trusts it. A refusal
is remembered for the rest of the process, so a command that asks twice (the fast path, then the
engine) waits out a hanging interpreter once."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ExitCode, PatcherError
from ..settings import seconds
from . import envprobe

TIMEOUT_ENV = "ERNIE_PATCHER_PYTHON_TIMEOUT"
DEFAULT_TIMEOUT = 120.0
MAX_TIMEOUT = 3600.0
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
    return seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT, minimum=0.1, maximum=MAX_TIMEOUT)


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
    from .runner import STDOUT_CAP, run_bounded

    source = _PREAMBLE % (OLDEST, Path(envprobe.__file__).read_text(encoding="utf-8"))
    timeout = _timeout()
    try:
        finished = run_bounded([python, "-c", source, json.dumps(request)], timeout)
    except OSError as exc:
        raise PatcherError(ExitCode.ENVIRONMENT, f"cannot run interpreter {python}: {exc.strerror or exc}",
                           hint=HINT) from None
    out, err = finished.stdout.decode(errors="replace"), finished.stderr.decode(errors="replace")
    if finished.timed_out:
        raise _refuse(python, f"did not answer within {timeout:g} s ({TIMEOUT_ENV}) and was ended with every "
                              "process it started", out, err)
    if finished.stdout_over:
        raise _refuse(python, f"printed more than {STDOUT_CAP} bytes on stdout and was ended", out[-200:], err)
    return finished.code, out, err


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


_REFUSED: dict[tuple, PatcherError] = {}


def _identity(python: str) -> tuple:
    """PYTHON as the file it is now: a refusal is remembered for that file, not for a replaced one."""
    try:
        st = os.stat(python)
    except OSError:
        return (python,)
    return (python, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def describe(python: str, request: dict) -> dict:
    """The environment description of interpreter PYTHON (see envprobe.describe), checked. An
    interpreter refused once in this process is refused again at once, with the same error."""
    python = resolve(python)
    key = _identity(python)
    refused = _REFUSED.get(key)
    if refused is not None:
        raise refused
    try:
        return _describe(python, request)
    except PatcherError as error:
        _REFUSED[key] = error
        raise


def _describe(python: str, request: dict) -> dict:
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
