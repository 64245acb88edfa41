"""The `ernie-patch` command: parse options, call the engine, render the report, set the exit code."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import click

from .. import __version__
from ..errors import ExitCode, PatcherError

EXIT_CODES = """\b
Exit codes:
  0  ok, or nothing to do
  1  verify: patches missing or wrong
  2  usage error, or an invalid patch set / series file
  3  a target package or file is missing (or --site is not a directory)
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


ENV_PREFIX = "ERNIE_PATCHER_"


def _complete_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list:
    """Shell completion of patch ids (and, for `diff`, patch file names) from the set in use."""
    from ..patchset.series import load_series

    try:
        series = load_series(ctx.params.get("patches"))
    except Exception:  # completion must never fail the shell
        return []
    names = series.ids + ([p.file for p in series.patches] if param.name == "patch_id" else [])
    return [click.shell_completion.CompletionItem(n) for n in names if n.startswith(incomplete)]


def _patches_option() -> Callable:
    return click.option("--patches", "patches", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
                        envvar=ENV_PREFIX + "PATCHES", is_eager=True,
                        help="Use the patch set in DIR (a series.toml and .patch files) instead of the built-in one "
                             "[env: ERNIE_PATCHER_PATCHES].")


def _target_options(func: Callable) -> Callable:
    return _where_options(_patches_option()(_output_options(func)))


def _where_options(func: Callable) -> Callable:
    options = [
        click.option("--python", "python", metavar="PATH", envvar=ENV_PREFIX + "PYTHON",
                     help="Patch the environment of this interpreter, or of this environment directory "
                          "(a venv) [default: the one running ernie-patch; env: ERNIE_PATCHER_PYTHON]."),
        # Not click.Path(file_okay=False): a --site that is not a directory is a missing target (exit 3).
        click.option("--site", type=click.Path(path_type=Path), metavar="DIR",
                     envvar=ENV_PREFIX + "SITE",
                     help="Patch packages installed in DIR (e.g. by pip install --target DIR) "
                          "[env: ERNIE_PATCHER_SITE]."),
        _allow_user_writable_option(),
    ]
    for option in reversed(options):
        func = option(func)
    return func


_USER_WRITABLE_HELP = ("As root, run a --python interpreter and write in package directories that another user "
                       "can write (by default refused: that user could make root run their code, or swap what "
                       "root writes).")


_INTERPRETER_WRITABLE_HELP = ("As root, run a --python interpreter that another user can replace (by default "
                              "refused: that user could make root run their code).")


def _allow_user_writable_option(text: str = _USER_WRITABLE_HELP) -> Callable:
    return click.option("--allow-user-writable", is_flag=True, help=text)


def _output_options(func: Callable) -> Callable:
    options = [
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout."),
        click.option("-q", "--quiet", "quiet", is_flag=True,
                     help="One verdict line on stdout (errors: one line on stderr)."),
        click.option("-v", "--verbose", "verbose", is_flag=True, help="Also list every file and probe."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _verbosity(quiet: bool, verbose: bool) -> int:
    if quiet and verbose:
        raise click.UsageError("--quiet and --verbose cannot be used together")
    return -1 if quiet else int(verbose)


def _fail(command: str, error: PatcherError, as_json: bool = False, shown: bool = False, quiet: bool = False) -> None:
    """Report an error that left no report (JSON on stdout, or the reason on stderr unless SHOWN
    already; only its first line when QUIET) and exit."""
    from .jsondoc import document, emit
    from .render import render_error

    if as_json:
        emit(document(command, error))
    elif quiet:
        print(f"error: {error.reason}", file=sys.stderr)
    elif not shown:
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


def _run(command: str, as_json: bool, call: Callable, verbosity: int = 0) -> None:
    """Run CALL (the engine) under signal handling, render its report and exit with its code."""
    from ..core.interrupts import signals_as_errors
    from .render import render

    try:
        with signals_as_errors():
            report = call()
    except PatcherError as error:
        _fail(command, error, as_json, quiet=verbosity < 0)
    except Exception as exc:  # a bug: one line and a traceback file, never a bare traceback
        _fail(command, internal_error(command, exc), as_json, quiet=verbosity < 0)
    render(report, as_json, verbosity)
    sys.exit(int(report.exit_code))


def _target(python: str | None, site: Path | None, patches: Path | None, allow_user_writable: bool = False):
    """The target the options name. An option on the command line wins over its variable; --python and
    --site name the target either way, so one of them given wins over both ERNIE_PATCHER_PYTHON and
    ERNIE_PATCHER_SITE."""
    from click.core import ParameterSource

    from ..core.report import Target

    context = click.get_current_context()
    given = {name for name in ("python", "site") if context.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    if given == {"python"}:
        site = None
    elif given == {"site"}:
        python = None
    elif not given and python and site:
        raise click.UsageError("ERNIE_PATCHER_PYTHON and ERNIE_PATCHER_SITE are both set: unset one, or pass "
                               "--python or --site")
    return Target(python=python, site=site, patches=patches, allow_user_writable=allow_user_writable)


class _Group(click.Group):
    def main(self, args=None, *rest, **kwargs):  # type: ignore[override]
        argv = [str(a) for a in args] if args is not None else sys.argv[1:]
        as_json = "--json" in argv
        quiet = "-q" in argv or "--quiet" in argv
        command = next((word for word in argv if word in self.commands), "")
        try:
            return super().main(argv, *rest, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            if not as_json and not quiet:
                exc.show()
            _fail(command, PatcherError(ExitCode.USAGE, exc.format_message(),
                                        hint="ernie-patch --help lists the commands and options"), as_json,
                  shown=not quiet, quiet=quiet)
        except click.exceptions.Abort:
            _fail(command, PatcherError(ExitCode.INTERRUPTED, "interrupted"), as_json, quiet=quiet)
        except Exception as exc:  # a bug in a command outside _run: still one line (or one JSON document)
            _fail(command, internal_error(command, exc), as_json, quiet=quiet)


@click.group(cls=_Group, epilog=EXIT_CODES, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ernie-patch")
def main() -> None:
    """Apply, verify and revert the ERNIE-Image Ascend NPU patches to diffusers and vllm-omni.

    \b
    Examples:
      ernie-patch status                     # the environment of this interpreter
      ernie-patch apply && ernie-patch verify
      ernie-patch status --python /opt/venv  # another environment (directory or bin/python)
      ernie-patch list                       # the patches of the set

    \b
    Shell completion (commands, options and patch ids), e.g. for bash:
      eval "$(_ERNIE_PATCH_COMPLETE=bash_source ernie-patch)"
    (zsh_source and fish_source for zsh and fish).
    """


_ONLY_HELP = "Only these patches (repeatable)."


@main.command(epilog=EXIT_CODES)
@_target_options
@click.option("--only", multiple=True, metavar="ID", help=_ONLY_HELP, shell_complete=_complete_ids)
@click.option("--exit-code", "gate", is_flag=True,
              help="Exit 0 only when every selected patch is applied; else the code of the worst state "
                   "(1 not applied, 3 missing, 4 unsupported, 5 conflict, 6 drifted), for a CI gate.")
def status(python, site, allow_user_writable, patches, as_json, quiet, verbose, only, gate) -> None:
    """Show what is installed where and the state of each patch.

    --exit-code without --only gates on the patches apply was given (`apply --only`), else on the
    whole set.

    \b
    Examples:
      ernie-patch status
      ernie-patch status --exit-code -q      # CI gate: 0 only when all applied
      ernie-patch status --site /opt/site --json
    """
    from ..core.engine import status as run

    target = _target(python, site, patches, allow_user_writable)
    _run("status", as_json, lambda: run(target, tuple(only), gate=gate), _verbosity(quiet, verbose))


@main.command(epilog=EXIT_CODES)
@_target_options
@click.option("--only", multiple=True, metavar="ID", help="Only these patches (and the ones they require).",
              shell_complete=_complete_ids)
@click.option("--dry-run", is_flag=True, help="Plan every hunk and report; write nothing.")
@click.option("--allow-untested", is_flag=True, help="Try patches outside their tested version range (conflicts are still refused).")
def apply(python, site, allow_user_writable, patches, as_json, quiet, verbose, only, dry_run, allow_untested) -> None:
    """Apply the patches: all or nothing, idempotent.

    \b
    Examples:
      ernie-patch apply --dry-run            # plan every hunk, write nothing
      ernie-patch apply -q && ernie-patch verify -q
      ernie-patch apply --only diffusers-rope
    """
    from ..core.engine import apply as run

    target = _target(python, site, patches, allow_user_writable)
    _run("apply", as_json, lambda: run(target, tuple(only), dry_run, allow_untested, allow_user_writable),
         _verbosity(quiet, verbose))


@main.command(epilog=EXIT_CODES)
@_target_options
@click.option("--only", multiple=True, metavar="ID", help=_ONLY_HELP, shell_complete=_complete_ids)
@click.option("--reparse", is_flag=True,
              help="Parse every probed file again instead of reusing results recorded at apply for identical bytes.")
def verify(python, site, allow_user_writable, patches, as_json, quiet, verbose, only, reparse) -> None:
    """Prove the patches are in place: versions, file digests and AST probes.

    Without --only: the patches apply was given (`apply --only`), else the whole set.

    \b
    Examples:
      ernie-patch verify                     # exit 0 only when every patch is in place
      ernie-patch verify -q                  # one line, for a build log or a HEALTHCHECK
      ernie-patch verify --json > verify.json
    """
    from ..core.engine import verify as run

    target = _target(python, site, patches, allow_user_writable)
    _run("verify", as_json, lambda: run(target, tuple(only), reparse), _verbosity(quiet, verbose))


def _refuse_patches(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        raise click.UsageError("revert takes no --patches: it works from the manifest and the stored originals, "
                               "whatever patch set applied them", ctx)


@main.command(epilog=EXIT_CODES)
@_where_options
@_output_options
@click.option("--patches", hidden=True, expose_value=False, callback=_refuse_patches, metavar="DIR")
@click.option("--only", multiple=True, metavar="ID", shell_complete=_complete_ids,
              help="Only these patches (and the applied ones that require them).")
@click.option("--dry-run", is_flag=True, help="Report what would be restored; write nothing.")
@click.option("--force", is_flag=True,
              help="Restore originals even over files edited since apply (a copy is kept in .ernie-patcher/overwritten/).")
def revert(python, site, allow_user_writable, as_json, quiet, verbose, only, dry_run, force) -> None:
    """Put every changed byte back exactly as it was before apply.

    Needs no patch files (no --patches): it works from the manifest and the stored originals.

    \b
    Examples:
      ernie-patch revert --dry-run           # what would be restored
      ernie-patch revert
      ernie-patch revert --only omni-ulysses # that patch and the applied ones requiring it
    """
    from ..core.engine import revert as run

    target = _target(python, site, None, allow_user_writable)
    _run("revert", as_json, lambda: run(target, dry_run, force, tuple(only), allow_user_writable),
         _verbosity(quiet, verbose))


@main.command("list", epilog=EXIT_CODES)
@_patches_option()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def list_command(patches: Path | None, as_json: bool) -> None:
    """List the patches of the set: id, package, tested versions, file, what it requires.

    \b
    Examples:
      ernie-patch list
      ernie-patch list --patches ./my-patches --json
    """
    from ..patchset.series import load_series

    try:
        series = load_series(patches)
    except PatcherError as error:
        _fail("list", error, as_json)
    from .render_authoring import render_list

    render_list(series, as_json)


@main.command("diff", epilog=EXIT_CODES)
@click.argument("patch_id", metavar="ID|FILE", shell_complete=_complete_ids)
@_patches_option()
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="Highlight the diff: on a terminal without NO_COLOR or TERM=dumb (auto), always, or never.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout (the text under diff.text).")
def diff_command(patch_id: str, patches: Path | None, color: str, as_json: bool) -> None:
    """Show one patch of the set (a patch file name shows that versioned variant).

    On a terminal the diff is highlighted under a header line (id, package range, strip level);
    otherwise the exact text of the patch file is written, so it can be piped.

    \b
    Examples:
      ernie-patch diff diffusers-rope
      ernie-patch diff diffusers_attention_dispatch.v0_41.patch | less
    """
    from ..patchset.patchview import show_patch

    try:
        view = show_patch(patch_id, patches)
    except PatcherError as error:
        _fail("diff", error, as_json)
    from .render_authoring import render_diff, render_diff_json

    if as_json:
        render_diff_json(view)
    else:
        from .render import fancy_terminal

        render_diff(view, color == "always" or (color == "auto" and fancy_terminal(sys.stdout)))
    if view.problem is not None:
        if as_json:
            sys.exit(int(view.problem.code))
        _fail("diff", view.problem)


@main.command(epilog=EXIT_CODES)
@click.argument("package")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--name", required=True, metavar="NAME", help="Patch id; the diff is written to NAME.patch.")
@click.option("--patches", "patches", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Patch set to add to (created if missing) [default: ./patches].")
@click.option("--python", "python", metavar="PATH",
              help="The edited files are in this interpreter's environment (or this environment directory).")
@click.option("--site", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="The edited files are in DIR (e.g. made by pip install --target DIR).")
@_allow_user_writable_option(_INTERPRETER_WRITABLE_HELP)
@click.option("--module", metavar="NAME", help="Import name, when it is not PACKAGE with '-' as '_'.")
@click.option("--wheel", type=click.Path(dir_okay=False, exists=True, path_type=Path), metavar="FILE",
              help="Take the pristine files from this wheel of the installed release instead of pip download.")
@click.option("--summary", default="", metavar="TEXT", help="One line for the series entry.")
@click.option("--force", is_flag=True, help="Replace the diff of an existing patch NAME.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def create(package: str, paths: tuple[str, ...], name: str, patches: Path | None, python: str | None,
           site: Path | None, allow_user_writable: bool, module: str | None, wheel: Path | None, summary: str,
           force: bool, as_json: bool) -> None:
    """Write a patch from your edits of installed files.

    PACKAGE is the distribution (e.g. diffusers); each PATH is an edited file, absolute or
    relative to site-packages (diffusers/models/attention_dispatch.py).
    The pristine side is the file of the same release, from `pip download --no-deps
    PACKAGE==VERSION`, checked against the installed RECORD digest. The patch is added to
    DIR/series.toml with versions "==VERSION" and strip 1.

    \b
    Examples:
      ernie-patch create diffusers diffusers/models/attention_dispatch.py --name my-attention
      ernie-patch create vllm-omni vllm_omni/diffusion/x.py --name my-fix --wheel ./vllm_omni-0.30.0-py3-none-any.whl
    """
    from ..authoring.create import AuthoringRequest, create_patch

    request = AuthoringRequest(package=package, paths=paths, name=name, patches=patches, python=python,
                               site=site, allow_user_writable=allow_user_writable, module=module, wheel=wheel,
                               summary=summary, force=force,
                               progress=not as_json and sys.stderr.isatty())
    try:
        created = create_patch(request)
    except PatcherError as error:
        _fail("create", error, as_json)
    from .render_authoring import render_created

    render_created(created, as_json)


@main.command(epilog=EXIT_CODES)
@click.argument("patch_id", metavar="ID", shell_complete=_complete_ids)
@click.option("--to", "to_version", required=True, metavar="VERSION", help="The newer release to port the patch onto.")
@click.option("--from", "from_version", metavar="VERSION",
              help="The release the patch was written for [default: the newest one its range names below --to].")
@click.option("--from-wheel", type=click.Path(dir_okay=False, exists=True, path_type=Path), metavar="FILE",
              help="The wheel of that release instead of pip download.")
@click.option("--to-wheel", type=click.Path(dir_okay=False, exists=True, path_type=Path), metavar="FILE",
              help="The wheel of the --to release instead of pip download.")
@click.option("--patches", "patches", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Patch set holding the patch; the new variant is added to it [default: ./patches].")
@click.option("--scratch", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Where merged files that need a person go [default: a new temporary directory].")
@click.option("--resolved", type=click.Path(file_okay=False, exists=True, path_type=Path), metavar="DIR",
              help="Take the merged files from DIR (a --scratch directory whose conflicts you resolved).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def port(patch_id: str, to_version: str, from_version: str | None, from_wheel: Path | None, to_wheel: Path | None,
         patches: Path | None, scratch: Path | None, resolved: Path | None, as_json: bool) -> None:
    """Carry a patch onto a newer release by a three-way merge (as git apply -3).

    Base is the file of the release the patch was written for, ours that file patched, theirs the
    file of the --to release, each from the published wheel. A clean merge that compiles and passes
    the patch's probes becomes a new variant file with versions "==VERSION", added to the series;
    otherwise the merged files, with conflict markers, go to a scratch directory and the conflicting
    hunks are named (exit 5). No installed environment is read or changed.

    \b
    Examples:
      ernie-patch port omni-sp-transformer --to 0.30.0
      ernie-patch port omni-sp-transformer --to 0.30.0 --from-wheel vllm_omni-0.28.0-py3-none-any.whl \\
          --to-wheel vllm_omni-0.30.0-py3-none-any.whl --patches ./patches
      ernie-patch port omni-sp-transformer --to 0.30.0 --resolved /tmp/ernie-patch-port-omni-sp-transformer-x
    """
    from ..authoring.port import PortRequest, port_patch

    request = PortRequest(patch_id=patch_id, to_version=to_version, from_version=from_version, from_wheel=from_wheel,
                          to_wheel=to_wheel, patches=patches, scratch=scratch, resolved=resolved,
                          progress=not as_json and sys.stderr.isatty())
    try:
        ported = port_patch(request)
    except PatcherError as error:
        _fail("port", error, as_json)
    from .render_authoring import render_ported

    render_ported(ported, as_json)
    if ported.error is not None:
        sys.exit(int(ported.error.code))


@main.command(epilog=EXIT_CODES)
@click.option("--python", "python", metavar="PATH", envvar=ENV_PREFIX + "PYTHON",
              help="Run the checks in this interpreter, or this environment directory's "
                   "[default: the one running ernie-patch; env: ERNIE_PATCHER_PYTHON].")
@click.option("--site", type=click.Path(path_type=Path), metavar="DIR", envvar=ENV_PREFIX + "SITE",
              help="Put DIR (e.g. made by pip install --target DIR) first on the checks' sys.path "
                   "[env: ERNIE_PATCHER_SITE].")
@_allow_user_writable_option(_INTERPRETER_WRITABLE_HELP)
@click.option("--device", type=click.Choice(["auto", "npu", "cpu"]), default="auto", show_default=True,
              help="npu: Ascend via torch_npu; cpu: the fake NPU device and CPU references; auto: npu if usable.")
@click.option("--sp", type=click.IntRange(min=2), metavar="N",
              help="Also run vllm-omni's ERNIE-Image transformer at sequence parallelism N vs 1.")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Precision of the device runs (the laser-attention route needs bf16).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def selftest(python: str | None, site: Path | None, allow_user_writable: bool, device: str, sp: int | None, dtype: str,
             as_json: bool) -> None:
    """Check the patched code numerically on the device against CPU references.

    Runs in the target interpreter (its torch, torch_npu, mindiesd, diffusers, vllm-omni) as a
    subprocess; ernie-patch itself imports none of them. Run it after apply.

    \b
    Examples:
      ernie-patch selftest                   # NPU when torch_npu sees one, else CPU + fake NPU
      ernie-patch selftest --sp 2            # also the SP transformer, SP=2 vs SP=1
      ernie-patch selftest --python /opt/venv --json > selftest.json
    """
    from ..selftest.launch import run_selftest
    from .jsondoc import document, emit
    from .render import render_error, selftest_table

    try:
        if site is not None and not site.is_dir():
            raise PatcherError(ExitCode.MISSING, f"--site {site} is not a directory",
                               hint="pass the directory pip install --target wrote to, or use --python")
        report = run_selftest(python, site, device, sp, dtype, allow_user_writable=allow_user_writable)
    except PatcherError as error:
        _fail("selftest", error, as_json)
    except Exception as exc:  # a bug: one line and a traceback file
        _fail("selftest", internal_error("selftest", exc), as_json)
    error = report.error()
    if as_json:
        emit(document("selftest", report.error(), report.exit_code, python=report.python,
                      selftest=report.to_dict()))
    else:
        from .fit import terminal_width

        print(selftest_table(report, terminal_width(sys.stdout)))
    if error is not None and not as_json:
        render_error(error)
    sys.exit(int(report.exit_code))


if __name__ == "__main__":
    main()
