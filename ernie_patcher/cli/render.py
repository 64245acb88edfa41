"""Turn reports into output: JSON for machines, rich tables on a terminal, plain text otherwise."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Collection, TextIO

from ..core.report import Report
from ..errors import ExitCode, PatcherError
from .jsondoc import document, emit

if TYPE_CHECKING:
    from ..selftest.launch import SelftestReport

_STYLES = {"applied": "green", "not-applied": "yellow", "drifted": "red", "conflict": "red",
           "unsupported": "magenta", "missing": "red"}


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
    return (f"{verdict}: {applied}/{len(report.patches)} patches applied, {files} files as recorded, "
            f"{sum(r.passed for r in probes)}/{len(probes)} probes pass")


def _verify_failure(report: Report) -> str:
    """The first patch not in place, in one line, for the log of a failed build step."""
    for patch in report.patches:
        failed = [r for r in patch.probes if not r.passed]
        if patch.state != "applied" or failed:
            why = patch.reason or (f"probe '{failed[0].probe.describe()}' fails" if failed and patch.state == "applied"
                                   else f"patch is {patch.state}")
            return f"verify failed: {patch.spec.id}: {why}"
    return "verify failed"


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


def _compact_lines(rows: list[list[str]]) -> list[str]:
    """One patch per two lines, for a terminal too narrow for the table: nothing is folded mid-word."""
    lines = []
    for patch, package, installed, tested, state, fit, strip, probes in rows:
        style = _STYLES.get(state, "")
        lines.append(f"[bold]{patch}[/]  [{style}]{state}[/]" if style else f"[bold]{patch}[/]  {state}")
        facts = [f"{package} {installed}" if installed != "-" else f"{package} not installed", f"tested {tested}"]
        facts += [f"fit {fit}"] * bool(fit) + [f"strip {strip}"] * bool(strip) + [f"probes {probes}"] * (probes != "-")
        lines.append("  " + ", ".join(facts))
    return lines


def render_rich(report: Report) -> list[str]:
    """The report on a terminal: a table when it fits the width, else a compact list. Returns the
    reason lines shown, so an error's details do not repeat them."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows = _patch_rows(report)
    if not rows:
        console.print(_heading(report), highlight=False)
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
        console.print(_heading(report), highlight=False)
        for line in _compact_lines(rows):
            console.print(line, highlight=False)
    for reason in _reasons(report):
        console.print(f"  {reason}", highlight=False)
    for patch_id, probe in _failed_probes(report) if report.command == "verify" else []:
        console.print(f"  [red]probe failed:[/] {patch_id}: {probe.probe.describe()} "
                      f"[dim]{probe.probe.file}[/] - {probe.detail}", highlight=False)
    for action in report.actions:
        console.print(f"[bold]{action.what:>10}[/]  {_short(action.path, report)}  [dim]({action.detail})[/]",
                      highlight=False)
    for note in report.notes:
        console.print(f"[cyan]note:[/] {note}", highlight=False)
    if report.command == "verify":
        style = "green" if report.exit_code == ExitCode.OK else "red"
        console.print(f"[{style}]{_verify_summary(report)}[/]", highlight=False)
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


def verdict(report: Report) -> str:
    """The whole outcome in one line (--quiet): what a build log needs."""
    if report.command == "verify":
        return _verify_summary(report)
    counts: dict[str, int] = {}
    for patch in report.patches:
        counts[patch.state] = counts.get(patch.state, 0) + 1
    states = ", ".join(f"{n} {state}" for state, n in counts.items()) or "no patches"
    verb = f"{report.command} (dry run)" if report.dry_run else report.command
    written = f"; {len(report.actions)} file actions{' planned' if report.dry_run else ''}" if report.actions else ""
    return f"{verb}: {states}{written}"


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
        if report.error is None and not (report.command == "verify" and report.exit_code != ExitCode.OK):
            print(verdict(report))
        elif report.error:
            print(_error_lines(report.error)[0], file=sys.stderr)
        else:
            print(f"error: {_verify_failure(report)}", file=sys.stderr)
        return
    if fancy_terminal(sys.stdout):
        render_rich(report)
    else:
        render_plain(report, sys.stdout)
    if verbosity > 0:
        for line in _verbose_lines(report):
            print(line)
    if report.error:
        render_error(report.error, shown=set(_reasons(report)))
    elif report.command == "verify" and report.exit_code != ExitCode.OK:
        print(f"error: {_verify_failure(report)}", file=sys.stderr)


def selftest_table(report: SelftestReport) -> str:
    """The checks as plain text, one line each, and a summary line."""
    from ..selftest.launch import STATUSES

    lines = [f"ernie-patch selftest: {report.python}", f"device: {report.device}, dtype {report.dtype}",
             f"{'check':36} {'status':8} {'error':>10} {'tolerance':>10}  detail"]
    for check in report.checks:
        error = "" if check.error is None else f"{check.error:.3g}"
        tolerance = "" if check.tolerance is None else f"{check.tolerance:.3g}"
        unit = f" {check.unit}" if check.unit and check.tolerance is not None else ""
        lines.append(f"{check.name:36} {check.status:8} {error:>10} {tolerance:>10}{unit}  {check.detail}")
    counts = {status: sum(1 for c in report.checks if c.status == status) for status in STATUSES}
    lines.append(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
                 f"in {report.seconds:.1f} s")
    return "\n".join(lines)
