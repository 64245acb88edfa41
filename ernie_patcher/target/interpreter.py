"""Ask another interpreter (`--python PATH`) to describe its environment: bounded in time and output,
every process it started ended (runner), and its answer checked before anything trusts it. A refusal
is remembered for the rest of the process, so a command that asks twice (the fast path, then the
engine) waits out a hanging interpreter once.

As root, an interpreter another user could replace is not run at all (refuse_user_writable), and
the one that is runs isolated (-E -s -S, the current directory off sys.path): no .pth import line,
sitecustomize, usercustomize or PYTHON* variable of the environment runs, nor a module in root's
current directory; the probe builds the search path `site` would itself."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from ..errors import ExitCode, PatcherError
from ..fs.safeio import insecure_path, writable_by_others
from ..settings import seconds
from . import envprobe

TIMEOUT_ENV = "ERNIE_PATCHER_PYTHON_TIMEOUT"
DEFAULT_TIMEOUT = 120.0
MAX_TIMEOUT = 3600.0
OLDEST = (3, 8)  # importlib.metadata
# Isolated mode (-I) spelled out, as Python 2 knows no -I and must still say its version: no PYTHON*
# variable (-E), no user site (-s), no `site` at all (-S: no .pth import line, sitecustomize or
# usercustomize runs); the current directory -c puts first on sys.path goes in the preamble's first line.
ISOLATED = ("-E", "-s", "-S")
HINT = "pass --python a Python >= 3.8 executable of the environment to patch, or the environment's directory"
# Runs first in the other interpreter, in syntax every Python parses, so an old one says its
# version instead of failing on the probe's own syntax.
_PREAMBLE = """import sys
sys.path[:] = [entry for entry in sys.path if entry]
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
        finished = run_bounded([python, *ISOLATED, "-c", source, json.dumps(request)], timeout)
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
    """The interpreter PYTHON names: itself (a bare name: the file on PATH it runs, so that file is
    the one checked), or the Python of the environment directory it names (a venv, virtualenv or
    uv environment: DIR/bin/python)."""
    if os.sep not in python:
        import shutil

        return shutil.which(python) or python
    if not os.path.isdir(python):
        return python
    for name in ("bin/python", "bin/python3", "Scripts/python.exe"):
        candidate = os.path.join(python, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise PatcherError(ExitCode.ENVIRONMENT, f"--python {python} is a directory with no bin/python: "
                       "not a virtual environment", hint=HINT)


def _user_writable(python: str) -> tuple[str, str] | None:
    """(what, why) of the first thing another user than root could change to make PYTHON run their
    code: a directory on the way to it or to the file it resolves to (safeio.insecure_path), that
    file itself, or the pyvenv.cfg it starts from and the `home` directory that names (the standard
    library it loads)."""
    path = os.path.abspath(python)
    found = insecure_path(Path(path))
    if found is not None:
        return str(found[0]), found[1]
    try:
        why = writable_by_others(os.stat(path))
    except OSError:
        return None  # not there: running it fails and says so
    if why:
        return os.path.realpath(path), why
    for config in (os.path.join(os.path.dirname(path), "pyvenv.cfg"),
                   os.path.join(os.path.dirname(os.path.dirname(path)), "pyvenv.cfg")):
        if os.path.isfile(config):
            return _config_writable(Path(config))
    return None


def changeable_by_others(path: Path) -> tuple[str, str] | None:
    """(what, why) of the first thing another user could change to replace existing PATH: a directory on
    the way to it (safeio.insecure_path), or PATH itself."""
    found = insecure_path(path)
    if found is not None:
        return str(found[0]), found[1]
    why = writable_by_others(os.stat(path))
    return (str(path), why) if why else None


def _config_writable(config: Path) -> tuple[str, str] | None:
    """(what, why) of a pyvenv.cfg another user could change, or of the `home` it names."""
    found = changeable_by_others(config)
    if found is not None:
        return found
    home = _home(config)
    return changeable_by_others(home) if home is not None and os.path.isdir(home) else None


def _config(config: Path) -> dict[str, str]:
    """The keys of pyvenv.cfg CONFIG (lower-cased) and their values; empty when it is not a regular file."""
    try:
        fd = os.open(config, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        text = os.read(fd, 1 << 16).decode("utf-8", "replace") if stat.S_ISREG(os.fstat(fd).st_mode) else ""
    except OSError:
        text = ""
    finally:
        os.close(fd)
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip().lower()] = value.strip()
    return values


def _home(config: Path) -> Path | None:
    """The absolute `home` directory pyvenv.cfg CONFIG names (the base interpreter's), or None."""
    home = _config(config).get("home", "")
    return Path(os.path.abspath(home)) if os.path.isabs(home) else None


SITE_PATTERNS = ("lib*/python3*/site-packages", "lib*/python3*/dist-packages", "lib/python3/dist-packages",
                 "local/lib*/python3*/dist-packages")


def site_directories(python: str) -> list[Path]:
    """The site directories `site` would add for interpreter PYTHON, found from its layout without running
    it: its venv's (a pyvenv.cfg beside it or one level up) and, unless that venv leaves them out, those of
    the base installation (its prefix; Debian's dist-packages and /usr/local too)."""
    executable = Path(os.path.abspath(python))
    prefixes = []
    for config in (executable.parent / "pyvenv.cfg", executable.parent.parent / "pyvenv.cfg"):
        if config.is_file():
            prefixes.append(config.parent)
            values, home = _config(config), _home(config)
            if values.get("include-system-site-packages", "false").lower() == "true" and home is not None:
                prefixes.append(home.parent)
            break
    else:
        prefixes.append(Path(os.path.realpath(executable)).parent.parent)
    found: list[Path] = []
    for prefix in dict.fromkeys(prefixes):
        for pattern in SITE_PATTERNS:
            found.extend(path for path in sorted(prefix.glob(pattern)) if path.is_dir() and path not in found)
    return found


def refuse_user_writable(python: str, allowed: bool) -> None:
    """As root, refuse to run interpreter PYTHON when another user could change what it runs (see
    _user_writable), unless ALLOWED (--allow-user-writable): apply's rule for the directories it
    writes, applied to the program root runs first, before anything else is checked."""
    if allowed or os.geteuid() != 0:
        return
    found = _user_writable(python)
    if found is None:
        return
    where, why = found
    raise PatcherError(ExitCode.ENVIRONMENT, f"refusing to run interpreter {python} as root: {where} is {why}, so "
                       "another user could make root run their code",
                       details=["the interpreter runs before anything else is checked: a user who can replace it, "
                                "a directory on its way or its pyvenv.cfg runs code as root"],
                       hint="make the interpreter and the directories above it root's and not group- or "
                            "world-writable (chown root, chmod go-w), or pass --allow-user-writable if every "
                            "user who can write them is trusted")


_REFUSED: dict[tuple, PatcherError] = {}


def _identity(python: str) -> tuple:
    """PYTHON as the file it is now: a refusal is remembered for that file, not for a replaced one."""
    try:
        st = os.stat(python)
    except OSError:
        return (python,)
    return (python, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def describe(python: str, request: dict, allow_user_writable: bool = False) -> dict:
    """The environment description of interpreter PYTHON (see envprobe.describe), checked. An
    interpreter refused once in this process is refused again at once, with the same error. As
    root, one another user could replace is refused unless ALLOW_USER_WRITABLE."""
    python = resolve(python)
    refuse_user_writable(python, allow_user_writable)
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
