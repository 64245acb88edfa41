"""Turn reports into output: JSON for machines, rich tables on a terminal, plain text otherwise."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Collection, TextIO

from ..core.report import Report
from ..errors import ExitCode, PatcherError
from .fit import terminal_width, wrap, wrap_units
from .jsondoc import document, emit

if TYPE_CHECKING:
    from ..selftest.launch import SelftestReport

_STYLES = {"applied": "green", "not-applied": "yellow", "drifted": "red", "conflict": "red",
           "unsupported": "magenta", "missing": "red", "upstream": "cyan"}


def to_json(report: Report | None, command: str, error: PatcherError | None = None) -> dict:
    error = error or (report.error if report else None)
    if report is None:
        return document(command, error)
    return document(
        command, error, error.code if error else report.exit_code,
        python=report.env.python, state_dir=str(report.env.state_dir), dry_run=report.dry_run,
        patch_set=str(report.series.directory) if report.series else None,
        patches=[p.to_dict() for p in report.patches], actions=[a.to_dict() for a in report.actions],
        notes=report.notes, manifest_patches=report.manifest_patches,
    )


emit_json = emit


def _heading(report: Report) -> str:
    verb = f"{report.command} (dry run)" if report.dry_run else report.command
    return f"ernie-patch {verb}: {report.env.python}"


def _short(path: str, report: Report) -> str:
    """PATH relative to the site directory holding the state, when it is inside it."""
    root = str(report.env.state_dir.parent).rstrip("/") + "/"
    return path[len(root):] if path.startswith(root) else path


def _verify_summary(report: Report) -> str:
    applied = sum(p.state == "applied" for p in report.patches)
    probes = [r for p in report.patches for r in p.probes]
    files = sum(len(p.files) for p in report.patches if p.state == "applied")
    verdict = "verified" if report.exit_code == ExitCode.OK else "NOT verified"
    upstream = sum(p.state == "upstream" for p in report.patches)
    fixed = f", {upstream} fixed upstream" if upstream else ""
    return (f"{verdict}: {applied}/{len(report.patches)} patches applied{fixed}, {files} files as recorded, "
            f"{sum(r.passed for r in probes)}/{len(probes)} probes pass")


def _failed_probes(report: Report) -> list[tuple[str, object]]:
    """Probes failing on a patch that is otherwise in place (on one not applied they all fail)."""
    return [(p.spec.id, r) for p in report.patches if p.state == "applied" for r in p.probes if not r.passed]


def _patch_rows(report: Report) -> list[list[str]]:
    rows = []
    for patch in report.patches:
        version = patch.package.version if patch.package else "-"
        probes = f"{sum(p.passed for p in patch.probes)}/{len(patch.probes)}" if patch.probes else "-"
        rows.append([patch.spec.id, patch.spec.package, version, patch.spec.tested, patch.state,
                     patch.fit or "", _strip_text(patch), probes])
    return rows


def _reasons(report: Report) -> list[str]:
    """Which variant a patch with several versioned variants uses (when its package is installed),
    then the reasons for each patch's state."""
    return [_variant_line(p) for p in report.patches if len(p.variants) > 1 and p.package is not None] + \
        [f"{p.spec.id}: {p.reason}" for p in report.patches if p.reason]


def _variant_line(patch) -> str:
    why = "none covers the installed version; the first that fits" if patch.untested else "covers the installed version"
    return f"{patch.spec.id}: variant {patch.spec.file} ({patch.spec.tested}), {why} ({len(patch.variants)} variants)"


def _strip_text(patch) -> str:
    """The strip level used for a patch's paths: '1' when declared, '0 (inferred)' when inferred."""
    if patch.strip is None:
        return ""
    return f"{patch.strip} (inferred)" if patch.strip_inferred else str(patch.strip)


HEADERS = ["patch", "package", "installed", "tested", "state", "fit", "strip", "probes"]


def _error_lines(error: PatcherError, shown: Collection[str] = ()) -> list[str]:
    """The error's reason, its details not already in SHOWN (printed under the table), what to try."""
    lines = [f"error: {error.reason}"]
    lines += [f"  {d}" for d in error.details if d not in shown]
    if error.hint:
        lines.append(f"  try: {error.hint}")
    return lines


def render_plain(report: Report, out: TextIO) -> None:
    print(_heading(report), file=out)
    rows = _patch_rows(report)
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
        print("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)).rstrip(), file=out)
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)
    for reason in _reasons(report):
        print(f"  {reason}", file=out)
    for patch_id, probe in _failed_probes(report) if report.command == "verify" else []:
        print(f"  probe failed: {patch_id}: {probe.probe.describe()} [{probe.probe.file}] - {probe.detail}", file=out)
    for action in report.actions:
        print(f"{action.what:>10}  {_short(action.path, report)}  ({action.detail})", file=out)
    for note in report.notes:
        print(f"note: {note}", file=out)
    if report.command == "verify":
        print(_verify_summary(report), file=out)


def _table_width(rows: list[list[str]]) -> int:
    """Columns a rich table of ROWS needs with no cell folded: cells, one space of padding each side,
    and a border between and around the columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    return sum(widths) + 3 * len(widths) + 1


def _compact_lines(rows: list[list[str]], width: int) -> list[tuple[str, str]]:
    """One patch per two lines or more, for a terminal too narrow for the table: (text, style of the
    state word), broken only between facts, so no id, package, version or path is folded mid-word."""
    lines = []
    for patch, package, installed, tested, state, fit, strip, probes in rows:
        lines += [(line, _STYLES.get(state, "")) for line in wrap_units([patch, state], width, rest="  ", sep="  ")]
        facts = [f"{package} {installed}" if installed != "-" else f"{package} not installed", f"tested {tested}"]
        facts += [f"fit {fit}"] * bool(fit) + [f"strip {strip}"] * bool(strip) + [f"probes {probes}"] * (probes != "-")
        lines += [(line, "") for line in wrap_units(facts, width, first="  ", rest="  ", sep=", ")]
    return lines


def _print_fitted(console, text: str, lead: str = "", lead_style: str = "", rest: str = "    ",
                  style: str = "") -> None:
    """TEXT broken between words to the console's width; LEAD_STYLE styles LEAD, the start of its
    first line after the indentation."""
    from rich.markup import escape

    for number, line in enumerate(wrap(text, console.width, rest)):
        body = line.lstrip(" ")
        indent = line[:len(line) - len(body)]
        if number == 0 and lead and body.startswith(lead):
            markup = f"{indent}[{lead_style}]{escape(lead)}[/]{escape(body[len(lead):])}"
        else:
            markup = escape(line)
        console.print(f"[{style}]{markup}[/]" if style else markup, highlight=False, soft_wrap=True)


def render_rich(report: Report, verbose_lines: list[str] = ()) -> list[str]:
    """The report on a terminal: a table when it fits the width, else a compact list; every other line
    broken between words to the width. Returns the reason lines shown, so an error's details do not
    repeat them."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    rows = _patch_rows(report)
    if not rows:
        _print_fitted(console, _heading(report))
    elif _table_width(rows) <= console.width:
        table = Table(title=_heading(report), title_justify="left", show_lines=False)
        for header in HEADERS:
            table.add_column(header, no_wrap=True)
        for row in rows:
            style = _STYLES.get(row[4], "")
            row[4] = f"[{style}]{row[4]}[/]" if style else row[4]
            table.add_row(*row)
        console.print(table)
    else:
        _print_fitted(console, _heading(report))
        for text, style in _compact_lines(rows, console.width):
            name, sep, state = text.partition("  ")
            if style and sep and not text.startswith(" "):
                console.print(f"[bold]{escape(name)}[/]  [{style}]{escape(state)}[/]", highlight=False, soft_wrap=True)
            else:
                console.print(escape(text), highlight=False, soft_wrap=True)
    for reason in _reasons(report):
        _print_fitted(console, f"  {reason}")
    for patch_id, probe in _failed_probes(report) if report.command == "verify" else []:
        _print_fitted(console, f"  probe failed: {patch_id}: {probe.probe.describe()} {probe.probe.file} - {probe.detail}",
                      lead="probe failed:", lead_style="red")
    for action in report.actions:
        _print_fitted(console, f"{action.what:>10}  {_short(action.path, report)}  ({action.detail})",
                      lead=action.what, lead_style="bold")
    for note in report.notes:
        _print_fitted(console, f"note: {note}", lead="note:", lead_style="cyan")
    if report.command == "verify":
        style = "green" if report.exit_code == ExitCode.OK else "red"
        _print_fitted(console, _verify_summary(report), style=style)
    for line in verbose_lines:
        _print_fitted(console, line, rest="      ")
    return _reasons(report)


def render_error(error: PatcherError, out: TextIO | None = None, shown: Collection[str] = ()) -> None:
    """The reason on one line first, then details (those not in SHOWN) and what to try (on stderr)."""
    for line in _error_lines(error, shown):
        print(line, file=out or sys.stderr)


def fancy_terminal(stream: TextIO) -> bool:
    """Rich output (colour, tables with borders) only on a terminal that asks for it: not under
    NO_COLOR (any value, see no-color.org) nor TERM=dumb."""
    import os

    return stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


# How a reader counts what apply and revert write: source files, and the RECORDs listing created files.
_ACTION_WORDS = {"patch": "patched", "create": "created", "restore": "restored", "remove": "removed",
                 "register": "updated", "unregister": "restored"}
_RECORD_ACTIONS = ("register", "unregister")


def _files_text(report: Report) -> str:
    """The actions as a reader counts files: '4 files patched, 1 created, 1 RECORD updated'."""
    counts: dict[str, int] = {}
    for action in report.actions:
        counts[action.what] = counts.get(action.what, 0) + 1
    parts = []
    for index, (what, count) in enumerate((w, n) for w, n in counts.items() if w not in _RECORD_ACTIONS):
        noun = ("file " if count == 1 else "files ") if index == 0 else ""
        parts.append(f"{count} {noun}{_ACTION_WORDS.get(what, what)}")
    parts += [f"{n} RECORD{'s' if n != 1 else ''} {_ACTION_WORDS[w]}" for w, n in counts.items() if w in _RECORD_ACTIONS]
    return ", ".join(parts)


def _patches(count: int) -> str:
    return f"{count} patch{'es' if count != 1 else ''}"


def verdict(report: Report) -> str:
    """The whole outcome in one line (--quiet): what a build log needs, counted in patches and files."""
    if report.command == "verify":
        return _verify_summary(report)
    verb = f"{report.command} (dry run)" if report.dry_run else report.command
    if report.command == "revert":
        if not report.changed:
            return f"{verb}: nothing to do"
        did = "would be reverted" if report.dry_run else "reverted"
        planned = " (planned)" if report.dry_run and report.actions else ""
        return f"{verb}: {_patches(len(report.changed))} {did}; {_files_text(report) or 'no file to write'}{planned}"
    counts: dict[str, int] = {}
    for patch in report.patches:
        counts[patch.state] = counts.get(patch.state, 0) + 1
    states = ", ".join(f"{n} {state}" for state, n in counts.items())
    if report.command == "apply" and report.changed:
        did = "would be applied" if report.dry_run else "applied"
        before = counts.get("applied", 0) - (0 if report.dry_run else len(report.changed))
        already = f" ({before} already were)" if before > 0 else ""
        planned = " (planned)" if report.dry_run else ""
        return f"{verb}: {_patches(len(report.changed))} {did}{already}; {_files_text(report)}{planned}"
    if report.command == "apply" and report.error is None:
        return f"{verb}: nothing to do, {_patches(len(report.patches))} already applied"
    return f"{verb}: {_patches(len(report.patches))}: {states}" if report.patches else f"{verb}: no patches"


def _verbose_lines(report: Report) -> list[str]:
    """Every file and every probe of every patch (-v)."""
    lines = []
    for patch in report.patches:
        for change in patch.files:
            offsets = f" offsets {','.join(map(str, change.offsets))}" if change.offsets else ""
            lines.append(f"  {patch.spec.id}: file {change.relpath}: {change.state}{offsets}"
                         f"{' - ' + change.detail if change.detail else ''}")
        for probe in patch.probes:
            mark = "pass" if probe.passed else "FAIL"
            lines.append(f"  {patch.spec.id}: probe {mark} {probe.probe.describe()} [{probe.probe.file}]"
                         f"{' - ' + probe.detail if probe.detail else ''}")
    return lines


def render(report: Report, as_json: bool, verbosity: int = 0) -> None:
    """REPORT on stdout (JSON, a terminal, or plain text); VERBOSITY -1 is one verdict line, 1 adds
    every file and probe. An error goes to stderr, its details not repeating the reasons shown."""
    if as_json:
        emit_json(to_json(report, report.command))
        return
    if verbosity < 0:
        if report.error is None:
            print(verdict(report))
        else:
            print(_error_lines(report.error)[0], file=sys.stderr)
        return
    verbose = _verbose_lines(report) if verbosity > 0 else []
    if fancy_terminal(sys.stdout):
        render_rich(report, verbose)
    else:
        render_plain(report, sys.stdout)
        for line in verbose:
            print(line)
    if report.error:
        render_error(report.error, shown=set(_reasons(report)))


def selftest_table(report: SelftestReport, width: int | None = None) -> str:
    """The checks as plain text, one line each, and a summary line; on a terminal WIDTH columns wide,
    a row that does not fit puts its detail on lines of its own below, broken between words."""
    from ..selftest.launch import STATUSES

    lines = wrap(f"ernie-patch selftest: {report.python}", width) + wrap(f"device: {report.device}, dtype {report.dtype}", width)
    narrow = width is not None and width < 36 + 1 + 8 + 1 + 10 + 1 + 10 + 2
    if not narrow:
        lines.append(f"{'check':36} {'status':8} {'error':>10} {'tolerance':>10}  detail")
    for check in report.checks:
        error = "" if check.error is None else f"{check.error:.3g}"
        tolerance = "" if check.tolerance is None else f"{check.tolerance:.3g}"
        unit = f" {check.unit}" if check.unit and check.tolerance is not None else ""
        if narrow:
            measured = [f"error {error}"] * bool(error) + [f"tolerance {tolerance}{unit}"] * bool(tolerance)
            lines += wrap_units([check.name, check.status, *measured], width, rest="    ", sep="  ")
            lines += wrap(f"    {check.detail}", width) if check.detail else []
            continue
        row = f"{check.name:36} {check.status:8} {error:>10} {tolerance:>10}{unit}"
        if width is None or len(row) + 2 + len(check.detail) <= width:
            lines.append(f"{row}  {check.detail}".rstrip())
        else:
            lines += [row.rstrip()] + wrap(f"    {check.detail}", width)
    counts = {status: sum(1 for c in report.checks if c.status == status) for status in STATUSES}
    lines.append(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
                 f"in {report.seconds:.1f} s")
    return "\n".join(lines)
