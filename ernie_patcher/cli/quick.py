"""The `ernie-patch` entry point: `verify`, `status` and `apply --dry-run` start without click.

Hand-written option parsing for those commands only, because importing click costs several
times an interpreter's own start, more than everything `verify` checks. Only the plain forms are
taken here -- `verify|status|apply [--json] [-q] [--python P] [--site D] [--patches D] [--only ID]...
[--allow-user-writable]`
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
          "--allow-user-writable": "allow_user_writable", "-q": "quiet", "--quiet": "quiet"}
_ONLY_FOR = {"reparse": "verify", "dry_run": "apply", "allow_untested": "apply"}
# Variables standing for an option (the click CLI reads them the same way: the option wins).
_OPTION_ENV = {"ERNIE_PATCHER_PYTHON": "python", "ERNIE_PATCHER_SITE": "site", "ERNIE_PATCHER_PATCHES": "patches"}
_KNOWN_ENV = {"ERNIE_PATCHER_PYTHON_TIMEOUT", "ERNIE_PATCHER_JOBS", "ERNIE_PATCHER_SELFTEST_TIMEOUT",
              "ERNIE_PATCHER_SELFTEST_SP_TIMEOUT", "ERNIE_PATCHER_PROBE_CACHE", "ERNIE_PATCHER_CACHE", "ERNIE_PATCHER_TIER",
              "ERNIE_PATCHER_TEST_KILL_AT", "ERNIE_PATCHER_TEST_PAUSE_AT", *_OPTION_ENV}


def parse(argv: list[str]) -> dict | None:
    """The options of a plain `verify`, `status` or `apply --dry-run` command line; None for anything else."""
    if not argv or argv[0] not in COMMANDS:
        return None
    options: dict = {"command": argv[0], "python": None, "site": None, "patches": None, "only": [],
                     "as_json": False, "reparse": False, "dry_run": False, "allow_untested": False,
                     "allow_user_writable": False, "quiet": False}
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
    target_given = options["python"] is not None or options["site"] is not None
    for variable, key in _OPTION_ENV.items():
        if options[key] is None and os.environ.get(variable) and not (target_given and key != "patches"):
            options[key] = os.environ[variable]  # --python or --site given wins over both target variables
    if options["python"] is not None and options["site"] is not None:
        return None  # the click CLI says which two were given
    if options["command"] == "apply" and not options["dry_run"]:
        return None  # writes go through the click CLI
    for key in ("site", "patches"):
        if options[key] is not None and os.path.exists(options[key]) and not os.path.isdir(options[key]):
            return None  # click refuses a file where a directory is expected
    return options


def _plain_environment() -> bool:
    return not any(k.startswith("ERNIE_PATCHER_") and k not in _KNOWN_ENV for k in os.environ)


HEADERS = ["patch", "package", "installed", "tested", "state", "fit", "strip", "probes"]


def _plain(document: dict) -> str:
    """render.render_plain of the document (without importing rich)."""
    patches = document["patches"]
    lines = [f"ernie-patch {document['command']}: {document['python']}"]
    rows = [[p["id"], p["package"], p["installed_version"], p["versions"], p["state"], "",
             "" if p["strip"] is None else f"{p['strip']}{' (inferred)' if p['strip_inferred'] else ''}",
             f"{sum(r['passed'] for r in p['probes'])}/{len(p['probes'])}" if p["probes"] else "-"]
            for p in patches]
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
        lines.append("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)).rstrip())
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    for p in patches:
        if len(p["variants"]) > 1:
            why = ("none covers the installed version; the first that fits" if p["untested"]
                   else "covers the installed version")
            lines.append(f"  {p['id']}: variant {p['file']} ({p['versions']}), {why} ({len(p['variants'])} variants)")
    if document["command"] == "verify":
        probes = [r for p in patches for r in p["probes"]]
        lines.append(f"verified: {len(patches)}/{len(patches)} patches applied, "
                     f"{sum(len(p['files']) for p in patches)} files as recorded, "
                     f"{len(probes)}/{len(probes)} probes pass")
    return "\n".join(lines) + "\n"


def _fast_output(options: dict) -> str | None:
    """The output of `verify`/`status` OPTIONS answered from the manifest (core.fastpath), else None."""
    import json

    from ..core.fastpath import answer
    from .jsondoc import document

    payload = answer(options)
    if payload is None:
        return None
    doc = document(options["command"], **payload)
    if options["as_json"]:
        return json.dumps(doc, indent=2, sort_keys=False) + "\n"
    if options.get("quiet"):
        count = len(doc["patches"])
        return _plain(doc).splitlines()[-1] + "\n" if doc["command"] == "verify" else \
            f"status: {count} patch{'es' if count != 1 else ''}: {count} applied\n"
    return _plain(doc)


def run(options: dict) -> None:
    """Answer from the manifest when the environment is applied and unchanged (fastpath), else run
    the engine as the click CLI would; exit with the command's code."""
    from pathlib import Path

    from ..core.interrupts import signals_as_errors
    from ..errors import PatcherError

    command = options["command"]
    try:
        with signals_as_errors():
            if command != "apply":
                output = _fast_output(options)
                if output is not None:
                    sys.stdout.write(output)
                    sys.stdout.flush()
                    sys.exit(0)
            from ..core import engine
            from ..core.report import Target

            target = Target(python=options["python"], site=Path(options["site"]) if options["site"] else None,
                            patches=Path(options["patches"]) if options["patches"] else None,
                            allow_user_writable=options["allow_user_writable"])
            if command == "verify":
                report = engine.verify(target, tuple(options["only"]), options["reparse"])
            elif command == "apply":
                report = engine.apply(target, tuple(options["only"]), True, options["allow_untested"])
            else:
                report = engine.status(target, tuple(options["only"]))
    except PatcherError as error:
        from .commands import _fail

        _fail(command, error, options["as_json"], quiet=options["quiet"])
    except Exception as exc:  # a bug: the click CLI's one line and traceback file
        from .commands import _fail, internal_error

        _fail(command, internal_error(command, exc), options["as_json"], quiet=options["quiet"])
    from .render import render

    render(report, options["as_json"], -1 if options["quiet"] else 0)
    sys.exit(int(report.exit_code))


def main() -> None:
    options = parse(sys.argv[1:]) if _plain_environment() else None
    if options is not None:
        run(options)
    from .commands import main as click_main

    click_main(prog_name="ernie-patch")
