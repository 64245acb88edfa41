"""Output of `diff` and `create`: rich on a terminal (imported only then), plain text otherwise, JSON."""
from __future__ import annotations

import sys
from typing import TextIO

from . import __version__
from .authoring import Created
from .patchview import PatchView

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
    return {"schema": 1, "tool": "ernie-patcher", "version": __version__, "command": "create", "ok": True,
            "exit_code": 0, "error": None, "created": created.to_dict()}


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
        import json

        out.write(json.dumps(created_json(created), indent=2) + "\n")
        return
    for line in created_lines(created):
        print(line, file=out)
