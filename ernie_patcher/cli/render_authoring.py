"""Output of `list`, `diff` and `create`: rich on a terminal (imported only then), plain text otherwise, JSON."""
from __future__ import annotations

import sys
from typing import TextIO

from ..authoring.create import Created
from ..authoring.port import Ported
from ..patchset.patchview import PatchView
from ..patchset.series import Series
from .fit import terminal_width, wrap, wrap_units
from .jsondoc import document, emit

DIFF_THEME = "ansi_dark"


def render_diff(view: PatchView, color: bool, out: TextIO | None = None) -> None:
    """The patch text: highlighted with a one-line header when COLOR, else exactly the file's bytes."""
    out = out or sys.stdout
    others = f"other variants of {view.id}: {', '.join(view.other_variants)} (name the file to show one)"
    if not color:
        out.write(view.text)
        if view.other_variants:
            print(f"note: {others}", file=sys.stderr)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.syntax import Syntax

    # On a terminal, long lines wrap at its width; anywhere else (`--color always | less -R`) nothing
    # is cut: the width is that of the longest line.
    width = terminal_width(out) or max([len(line) for line in view.text.splitlines()] + [80])
    console = Console(file=out, force_terminal=True, width=width)
    for line, style in ((view.header(), "bold"), (view.summary, "dim"), (others if view.other_variants else "", "dim")):
        for part in wrap(line, width) if line else []:
            console.print(f"[{style}]{escape(part)}[/]", highlight=False, soft_wrap=True)
    console.print(Syntax(view.text, "diff", theme=DIFF_THEME, word_wrap=True, background_color="default"))


def created_json(created: Created) -> dict:
    return document("create", created=created.to_dict())


def created_lines(created: Created) -> list[str]:
    """What `create` did, for people: the patch, its files, the series entry, what to run next."""
    verb = "replaced the diff of" if created.replaced else "created"
    lines = [f"{verb} patch {created.id}: {created.patch_file}",
             f"  pristine side: {created.wheel} ({created.package} {created.version}), "
             f"matching the installed RECORD digests"]
    for change in created.files:
        lines.append(f"  {change.action:<7} {change.relpath}  +{change.added} -{change.removed}")
    if created.replaced:
        lines.append(f"kept its [[patch]] entry in {created.series_file}")
    else:
        made = " (new file)" if created.series_created else ""
        lines.append(f"added [[patch]] id = \"{created.id}\" to {created.series_file}{made}: "
                     f"versions = \"=={created.version}\", strip = 1")
    directory = created.patch_file.parent
    lines.append(f"next: ernie-patch diff {created.id} --patches {directory}; "
                 f"ernie-patch status --patches {directory}")
    return lines


def render_created(created: Created, as_json: bool, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if as_json:
        emit(created_json(created), out)
        return
    for line in created_lines(created):
        print(line, file=out)


def render_diff_json(view: PatchView, out: TextIO | None = None) -> None:
    """`diff --json`: the patch text and what it is, under `diff`; a diff that does not parse has its
    reason under `error` (the text is still given)."""
    emit(document("diff", view.problem, patch_set=str(view.file.parent), diff=view.to_dict()), out)


def series_entries(series: Series) -> list[dict]:
    """One entry per patch id, its versioned variants inside."""
    entries = []
    for patch_id in series.ids:
        variants = series.variants(patch_id)
        first = variants[0]
        entries.append({"id": patch_id, "package": first.package, "module": first.module,
                        "summary": first.summary, "requires": list(first.requires),
                        "fixed_in": first.fixed_in_text or None,
                        "variants": [{"file": v.file, "versions": v.tested, "strip": v.strip,
                                      "probes": len(v.probes)} for v in variants]})
    return entries


def render_list(series: Series, as_json: bool, out: TextIO | None = None) -> None:
    """The patch set: one line per patch (id, package, tested versions, file), then what it requires;
    on a terminal narrower than that, each patch as a block of lines broken between words."""
    out = out or sys.stdout
    entries = series_entries(series)
    if as_json:
        emit(document("list", patch_set=str(series.directory), series=entries), out)
        return
    width = terminal_width(out)
    lines = [f"patch set {series.name}: {series.directory}"]
    table = _list_table(entries)
    if width is None or max(map(len, table)) <= width:
        lines += table
    else:
        lines += _list_blocks(entries, width)
    for line in lines:
        for part in wrap(line, width):
            print(part, file=out)


def _list_table(entries: list[dict]) -> list[str]:
    lines = []
    for entry in entries:
        for n, variant in enumerate(entry["variants"]):
            name = entry["id"] if n == 0 else ""
            package = entry["package"] if n == 0 else ""
            lines.append(f"  {name:<22} {package:<10} {variant['versions']:<19} {variant['file']}".rstrip())
        extra = [f"requires {', '.join(entry['requires'])}"] * bool(entry["requires"])
        extra += [f"fixed upstream in {entry['fixed_in']} (not applied there)"] * bool(entry["fixed_in"])
        extra += [entry["summary"]] * bool(entry["summary"])
        lines += [f"  {'':<22} {line}" for line in extra]
    return lines


def _list_blocks(entries: list[dict], width: int) -> list[str]:
    """Each patch: its id and package, then one line per variant and its requires and summary, indented."""
    lines = []
    for entry in entries:
        lines += wrap_units([entry["id"], entry["package"]], width, first="  ", rest="    ", sep="  ")
        for variant in entry["variants"]:
            lines += wrap_units([variant["versions"], variant["file"]], width, first="    ", rest="      ", sep="  ")
        if entry["requires"]:
            lines += wrap(f"    requires {', '.join(entry['requires'])}", width, rest="      ")
        if entry["fixed_in"]:
            lines += wrap(f"    fixed upstream in {entry['fixed_in']} (not applied there)", width, rest="      ")
        if entry["summary"]:
            lines += wrap(f"    {entry['summary']}", width, rest="      ")
    return lines


def ported_lines(ported: Ported) -> list[str]:
    """What `port` did, for people: the merge per file, the probes, the variant or the scratch files."""
    lines = [f"port {ported.id}: {ported.source_file} ({ported.package} {ported.from_version}) onto "
             f"{ported.package} {ported.to_version}, three-way merge ({ported.from_wheel}, {ported.to_wheel})"]
    for file in ported.files:
        where = f" -> {file.scratch}" if file.scratch else ""
        lines.append(f"  {file.outcome:<9} {file.relpath}{where}")
        for site in file.conflicts:
            at = f", markers at line {site.merged_line}" if site.merged_line else ""
            lines.append(f"            hunk #{site.hunk} {site.header}{at}")
    if ported.probes:
        passed = sum(p.passed for p in ported.probes)
        lines.append(f"  probes on the merged files: {passed}/{len(ported.probes)} pass")
    if ported.variant_file is not None:
        lines.append(f"added variant {ported.variant_file.name} (versions = \"{ported.versions}\") to "
                     f"{ported.series_file}")
        directory = ported.variant_file.parent
        lines.append(f"next: test it on {ported.package} {ported.to_version} (ernie-patch apply --patches "
                     f"{directory}), then widen its versions range")
    lines += [f"note: {note}" for note in ported.notes]
    return lines


def render_ported(ported: Ported, as_json: bool, out: TextIO | None = None) -> None:
    """`port`'s outcome; an error (no variant written) after it, on stderr."""
    out = out or sys.stdout
    if as_json:
        emit(document("port", ported.error, patch_set=str(ported.series_file.parent), notes=ported.notes,
                      ported=ported.to_dict()), out)
        return
    for line in ported_lines(ported):
        print(line, file=out)
    if ported.error is not None:
        from .render import render_error

        render_error(ported.error)
