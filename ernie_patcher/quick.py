"""The `ernie-patch` entry point: `verify`, `status` and `apply --dry-run` start without click.

Hand-written option parsing for those commands only, because importing click costs several
times an interpreter's own start, more than everything `verify` checks. Only the plain forms are
taken here -- `verify|status|apply [--json] [-q] [--python P] [--site D] [--patches D] [--only ID]...`
with `--reparse` (verify) or `--dry-run [--allow-untested]` (apply, which writes nothing then);
anything else (help, another command, apply without --dry-run, an option this parser does not
know, an ERNIE_PATCHER_* setting it does not know, a file given as a directory) goes to the click
CLI, which also reports every error, so usage and error handling stay in one place.
"""
from __future__ import annotations

import os
import sys

COMMANDS = ("verify", "status", "apply")
_VALUED = {"--python": "python", "--site": "site", "--patches": "patches", "--only": "only"}
_FLAGS = {"--json": "as_json", "--reparse": "reparse", "--dry-run": "dry_run", "--allow-untested": "allow_untested",
          "-q": "quiet", "--quiet": "quiet"}
_ONLY_FOR = {"reparse": "verify", "dry_run": "apply", "allow_untested": "apply"}
# Variables standing for an option (the click CLI reads them the same way: the option wins).
_OPTION_ENV = {"ERNIE_PATCHER_PYTHON": "python", "ERNIE_PATCHER_SITE": "site", "ERNIE_PATCHER_PATCHES": "patches"}
_KNOWN_ENV = {"ERNIE_PATCHER_PYTHON_TIMEOUT", "ERNIE_PATCHER_JOBS", "ERNIE_PATCHER_SELFTEST_TIMEOUT",
              "ERNIE_PATCHER_PROBE_CACHE", "ERNIE_PATCHER_CACHE", "ERNIE_PATCHER_TIER",
              "ERNIE_PATCHER_TEST_KILL_AT", "ERNIE_PATCHER_TEST_PAUSE_AT", *_OPTION_ENV}


def parse(argv: list[str]) -> dict | None:
    """The options of a plain `verify`, `status` or `apply --dry-run` command line; None for anything else."""
    if not argv or argv[0] not in COMMANDS:
        return None
    options: dict = {"command": argv[0], "python": None, "site": None, "patches": None, "only": [],
                     "as_json": False, "reparse": False, "dry_run": False, "allow_untested": False, "quiet": False}
    rest = argv[1:]
    while rest:
        word = rest.pop(0)
        name, sep, value = word.partition("=") if word.startswith("--") else (word, "", "")
        if name in _FLAGS and not sep:
            options[_FLAGS[name]] = True
        elif name in _VALUED and (sep or rest):
            value = value if sep else rest.pop(0)
            if not value or (not sep and value.startswith("-")):
                return None
            if name == "--only":
                options["only"].append(value)
            elif options[_VALUED[name]] is not None:
                return None
            else:
                options[_VALUED[name]] = value
        else:
            return None
    if any(options[flag] and options["command"] != command for flag, command in _ONLY_FOR.items()):
        return None
    for variable, key in _OPTION_ENV.items():
        if options[key] is None and os.environ.get(variable):
            options[key] = os.environ[variable]
    if options["command"] == "apply" and not options["dry_run"]:
        return None  # writes go through the click CLI
    for key in ("site", "patches"):
        if options[key] is not None and os.path.exists(options[key]) and not os.path.isdir(options[key]):
            return None  # click refuses a file where a directory is expected
    return options


def _plain_environment() -> bool:
    return not any(k.startswith("ERNIE_PATCHER_") and k not in _KNOWN_ENV for k in os.environ)


def run(options: dict) -> None:
    """Answer from the manifest when the environment is applied and unchanged (fastpath), else run
    the engine as the click CLI would; exit with the command's code."""
    from pathlib import Path

    from .errors import PatcherError
    from .interrupts import signals_as_errors

    command = options["command"]
    try:
        with signals_as_errors():
            if command != "apply":
                from .fastpath import answer

                output = answer(options)
                if output is not None:
                    sys.stdout.write(output)
                    sys.stdout.flush()
                    sys.exit(0)
            from . import engine
            from .report import Target

            target = Target(python=options["python"], site=Path(options["site"]) if options["site"] else None,
                            patches=Path(options["patches"]) if options["patches"] else None)
            if command == "verify":
                report = engine.verify(target, tuple(options["only"]), options["reparse"])
            elif command == "apply":
                report = engine.apply(target, tuple(options["only"]), True, options["allow_untested"])
            else:
                report = engine.status(target, tuple(options["only"]))
    except PatcherError as error:
        from .cli import _fail

        _fail(command, error, options["as_json"])
    except Exception as exc:  # a bug: the click CLI's one line and traceback file
        from .cli import _fail, internal_error

        _fail(command, internal_error(command, exc), options["as_json"])
    from .render import render

    render(report, options["as_json"], -1 if options["quiet"] else 0)
    sys.exit(int(report.exit_code))


def main() -> None:
    options = parse(sys.argv[1:]) if _plain_environment() else None
    if options is not None:
        run(options)
    from .cli import main as click_main

    click_main(prog_name="ernie-patch")
