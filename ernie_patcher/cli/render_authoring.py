"""Output of `list`, `diff` and `create`: rich on a terminal (imported only then), plain text otherwise, JSON."""
from __future__ import annotations

import sys
from typing import TextIO

from ..authoring.create import Created
from ..patchset.patchview import PatchView
from ..patchset.series import Series
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
    from rich.syntax import Syntax

    console = Console(file=out, force_terminal=True)
    console.print(f"[bold]{view.header()}[/]", highlight=False)
    if view.summary:
        console.print(f"[dim]{view.summary}[/]", highlight=False)
    if view.other_variants:
        console.print(f"[dim]{others}[/]", highlight=False)
    console.print(Syntax(view.text, "diff", theme=DIFF_THEME, word_wrap=False, background_color="default"))


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
                        "variants": [{"file": v.file, "versions": v.tested, "strip": v.strip,
                                      "probes": len(v.probes)} for v in variants]})
    return entries


def render_list(series: Series, as_json: bool, out: TextIO | None = None) -> None:
    """The patch set: one line per patch (id, package, tested versions, file), then what it requires."""
    out = out or sys.stdout
    entries = series_entries(series)
    if as_json:
        emit(document("list", patch_set=str(series.directory), series=entries), out)
        return
    print(f"patch set {series.name}: {series.directory}", file=out)
    for entry in entries:
        for n, variant in enumerate(entry["variants"]):
            name = entry["id"] if n == 0 else ""
            package = entry["package"] if n == 0 else ""
            print(f"  {name:<22} {package:<10} {variant['versions']:<19} {variant['file']}".rstrip(), file=out)
        extra = [f"requires {', '.join(entry['requires'])}"] * bool(entry["requires"])
        extra += [entry["summary"]] * bool(entry["summary"])
        for line in extra:
            print(f"  {'':<22} {line}", file=out)
