"""The `ernie-patch` command: parse options, call the engine, render the report, set the exit code."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import click

from . import __version__
from .errors import ExitCode, PatcherError

EXIT_CODES = """\b
Exit codes:
  0  ok, or nothing to do
  1  verify: patches missing or wrong
  2  usage error, or an invalid patch set / series file
  3  a target package or file is missing
  4  installed version outside a patch's tested range
  5  a hunk does not apply (conflict)
  6  files changed since apply, or changed by someone else
  7  environment problem (permissions, disk, lock held, corrupt or unsafe
     state, an interpreter given by --python that does not answer properly)
  8  selftest: a numeric check failed (the error line names it)
  70 internal error (a bug): one line, the traceback is saved to a file
  130 interrupted (SIGINT): files being written were put back first
  143 terminated (SIGTERM): files being written were put back first
"""


def _target_options(func: Callable) -> Callable:
    options = [
        click.option("--python", "python", metavar="PATH",
                     help="Patch the environment of this interpreter (default: the one running ernie-patch)."),
        click.option("--site", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                     help="Patch packages installed in DIR (e.g. by pip install --target DIR)."),
        click.option("--patches", "patches", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                     help="Use the patch set in DIR (a series.toml and .patch files) instead of the built-in one."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _fail(command: str, error: PatcherError, as_json: bool = False) -> None:
    """Report an error that left no report (JSON on stdout, or the reason on stderr) and exit."""
    from .render import emit_json, render_error, to_json

    if as_json:
        emit_json(to_json(None, command, error))
    else:
        render_error(error)
    sys.exit(int(error.code))


def internal_error(command: str, exc: BaseException) -> PatcherError:
    """A bug (an exception that is not a PatcherError) as one line naming a file with the traceback."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        fd, path = tempfile.mkstemp(prefix="ernie-patch-traceback-", suffix=".txt")
        with open(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        where = f"traceback in {path}"
    except OSError:
        where = "the traceback could not be saved"
    detail = str(exc)[:200]
    return PatcherError(ExitCode.INTERNAL, f"internal error in ernie-patch {command}: {type(exc).__name__}"
                        f"{': ' + detail if detail else ''} ({where})",
                        hint="report this bug with the traceback file; an interrupted write is finished or "
                             "undone by the next run")


def _run(command: str, as_json: bool, call: Callable) -> None:
    from .interrupts import signals_as_errors
    from .render import render

    try:
        with signals_as_errors():
            report = call()
    except PatcherError as error:
        _fail(command, error, as_json)
    except Exception as exc:  # a bug: one line and a traceback file, never a bare traceback
        _fail(command, internal_error(command, exc), as_json)
    render(report, as_json)
    sys.exit(int(report.exit_code))


def _target(python: str | None, site: Path | None, patches: Path | None):
    from .report import Target

    return Target(python=python, site=site, patches=patches)


class _Group(click.Group):
    def main(self, *args, **kwargs):  # type: ignore[override]
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(int(ExitCode.USAGE))
        except click.exceptions.Abort:
            print("error: interrupted", file=sys.stderr)
            sys.exit(int(ExitCode.INTERRUPTED))
        except Exception as exc:  # a bug in a command without --json handling: still one line
            from .render import render_error

            render_error(internal_error(" ".join(sys.argv[1:2]) or "", exc))
            sys.exit(int(ExitCode.INTERNAL))


@click.group(cls=_Group, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ernie-patch")
def main() -> None:
    """Apply, verify and revert the ERNIE-Image Ascend NPU patches to diffusers and vllm-omni."""


@main.command(epilog=EXIT_CODES)
@_target_options
@click.option("--only", multiple=True, metavar="ID", help="Only these patches (repeatable).")
def status(python, site, patches, as_json, only) -> None:
    """Show what is installed where and the state of each patch."""
    from .engine import status as run

    _run("status", as_json, lambda: run(_target(python, site, patches), tuple(only)))


@main.command(epilog=EXIT_CODES)
@_target_options
@click.option("--only", multiple=True, metavar="ID", help="Only these patches (and the ones they require).")
@click.option("--dry-run", is_flag=True, help="Plan every hunk and report; write nothing.")
@click.option("--allow-untested", is_flag=True, help="Try patches outside their tested version range (conflicts are still refused).")
def apply(python, site, patches, as_json, only, dry_run, allow_untested) -> None:
    """Apply the patches: all or nothing, idempotent."""
    from .engine import apply as run

    _run("apply", as_json, lambda: run(_target(python, site, patches), tuple(only), dry_run, allow_untested))


@main.command(epilog=EXIT_CODES)
@_target_options
@click.option("--only", multiple=True, metavar="ID", help="Only these patches.")
@click.option("--reparse", is_flag=True,
              help="Parse every probed file again instead of reusing results recorded at apply for identical bytes.")
def verify(python, site, patches, as_json, only, reparse) -> None:
    """Prove the patches are in place: versions, file digests and AST probes."""
    from .engine import verify as run

    _run("verify", as_json, lambda: run(_target(python, site, patches), tuple(only), reparse))


@main.command(epilog=EXIT_CODES)
@_target_options
@click.option("--dry-run", is_flag=True, help="Report what would be restored; write nothing.")
@click.option("--force", is_flag=True, help="Restore originals even over files edited since apply (a copy is kept).")
def revert(python, site, patches, as_json, dry_run, force) -> None:
    """Put every changed byte back exactly as it was before apply."""
    from .engine import revert as run

    _run("revert", as_json, lambda: run(_target(python, site, patches), dry_run, force))


@main.command("diff", epilog=EXIT_CODES)
@click.argument("patch_id", metavar="ID|FILE")
@click.option("--patches", "patches", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Read the patch set in DIR instead of the built-in one.")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Highlight the diff: on a terminal (auto), always, or never.")
def diff_command(patch_id: str, patches: Path | None, color: str) -> None:
    """Show one patch of the set (a patch file name shows that versioned variant).

    On a terminal the diff is highlighted under a header line (id, package range, strip level);
    otherwise the exact text of the patch file is written, so it can be piped.
    """
    from .patchview import show_patch

    try:
        view = show_patch(patch_id, patches)
    except PatcherError as error:
        _fail("diff", error)
    from .render_authoring import render_diff

    render_diff(view, color == "always" or (color == "auto" and sys.stdout.isatty()))
    if view.problem is not None:
        _fail("diff", view.problem)


@main.command(epilog=EXIT_CODES)
@click.argument("package")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--name", required=True, metavar="NAME", help="Patch id; the diff is written to NAME.patch.")
@click.option("--patches", "patches", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Patch set to add to (created if missing) [default: ./patches].")
@click.option("--python", "python", metavar="PATH", help="The edited files are in this interpreter's environment.")
@click.option("--site", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="The edited files are in DIR (e.g. made by pip install --target DIR).")
@click.option("--module", metavar="NAME", help="Import name, when it is not PACKAGE with '-' as '_'.")
@click.option("--wheel", type=click.Path(dir_okay=False, exists=True, path_type=Path), metavar="FILE",
              help="Take the pristine files from this wheel of the installed release instead of pip download.")
@click.option("--summary", default="", metavar="TEXT", help="One line for the series entry.")
@click.option("--force", is_flag=True, help="Replace the diff of an existing patch NAME.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def create(package: str, paths: tuple[str, ...], name: str, patches: Path | None, python: str | None,
           site: Path | None, module: str | None, wheel: Path | None, summary: str, force: bool,
           as_json: bool) -> None:
    """Write a patch from your edits of installed files.

    PACKAGE is the distribution (e.g. diffusers); each PATH is an edited file, absolute or
    relative to site-packages (diffusers/models/attention_dispatch.py).
    The pristine side is the file of the same release, from `pip download --no-deps
    PACKAGE==VERSION`, checked against the installed RECORD digest. The patch is added to
    DIR/series.toml with versions "==VERSION" and strip 1.
    """
    from .authoring import AuthoringRequest, create_patch

    request = AuthoringRequest(package=package, paths=paths, name=name, patches=patches, python=python,
                               site=site, module=module, wheel=wheel, summary=summary, force=force)
    try:
        created = create_patch(request)
    except PatcherError as error:
        _fail("create", error, as_json)
    from .render_authoring import render_created

    render_created(created, as_json)


@main.command(epilog=EXIT_CODES)
@click.option("--python", "python", metavar="PATH",
              help="Run the checks in this interpreter (default: the one running ernie-patch).")
@click.option("--site", type=click.Path(file_okay=False, exists=True, path_type=Path), metavar="DIR",
              help="Put DIR (e.g. made by pip install --target DIR) first on the checks' sys.path.")
@click.option("--device", type=click.Choice(["auto", "npu", "cpu"]), default="auto", show_default=True,
              help="npu: Ascend via torch_npu; cpu: the fake NPU device and CPU references; auto: npu if usable.")
@click.option("--sp", type=click.IntRange(min=2), metavar="N",
              help="Also run vllm-omni's ERNIE-Image transformer at sequence parallelism N vs 1.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Precision of the device runs (the laser-attention route needs bf16).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def selftest(python: str | None, site: Path | None, device: str, sp: int | None, dtype: str, as_json: bool) -> None:
    """Check the patched code numerically on the device against CPU references.

    Runs in the target interpreter (its torch, torch_npu, mindiesd, diffusers, vllm-omni) as a
    subprocess; ernie-patch itself imports none of them. Run it after apply.
    """
    from .render import emit_json, render_error
    from .selftest.launch import render_table, run_selftest

    try:
        report = run_selftest(python, site, device, sp, dtype)
    except PatcherError as error:
        _fail("selftest", error, as_json)
    except Exception as exc:  # a bug: one line and a traceback file
        _fail("selftest", internal_error("selftest", exc), as_json)
    error = report.error()
    if as_json:
        emit_json(report.to_json(__version__))
    else:
        print(render_table(report))
    if error is not None and not as_json:
        render_error(error)
    sys.exit(int(report.exit_code))


if __name__ == "__main__":
    main()
