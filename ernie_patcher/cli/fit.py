"""Text fitted to a terminal's width: lines broken between words, a path longer than a line after a '/'.

Hand-written because textwrap breaks a word too long for the line at any character (a path then
splits as `pipeline_ernie_image.⏎py`) and rich folds it the same way; here such a word breaks only
after a '/', and is cut elsewhere only when even one of its parts is wider than the line.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterable, TextIO


def terminal_width(stream: TextIO) -> int | None:
    """Columns of the terminal STREAM writes to (COLUMNS first, as rich reads it); None when not a terminal."""
    if not stream.isatty():
        return None
    return max(shutil.get_terminal_size().columns if "COLUMNS" not in os.environ else _columns(), 20)


def _columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except ValueError:
        return shutil.get_terminal_size().columns


def _head(word: str, room: int) -> str:
    """The longest start of WORD ending after a '/' within ROOM characters, else ROOM characters of it
    (a part with no '/' wider than the line is cut as a last resort); '' when nothing fits."""
    cut = word.rfind("/", 0, room)
    return word[:cut + 1] if cut >= 0 else word[:room]


def wrap_units(units: Iterable[str], width: int, first: str = "", rest: str = "    ", sep: str = " ") -> list[str]:
    """UNITS joined by SEP into lines of at most WIDTH, FIRST before the first line and REST before the
    others; a unit is broken (after a '/' where it can be) only when it is wider than a line by itself."""
    lines: list[str] = []
    line, fresh = first, True  # FRESH: nothing but the indent on LINE yet
    for unit in units:
        if not unit and fresh and lines:
            continue  # a double space that falls on a line break
        joint = "" if fresh else sep
        if not fresh and len(line) + len(joint) + len(unit) > width and len(rest) + len(unit) <= width:
            lines.append(line.rstrip())
            line, fresh, joint = rest, True, ""
        while len(line) + len(joint) + len(unit) > width:
            head = _head(unit, width - len(line) - len(joint))
            if not head or (not fresh and "/" not in head):
                if fresh:  # not even one character fits after the indent
                    head = unit[:1]
                else:
                    lines.append(line.rstrip())
                    line, fresh, joint = rest, True, ""
                    continue
            lines.append(line + joint + head)
            line, fresh, joint, unit = rest, True, "", unit[len(head):]
        line += joint + unit
        fresh = False
    lines.append(line.rstrip())
    return lines


def wrap(text: str, width: int | None, rest: str = "    ") -> list[str]:
    """TEXT (one line) broken between words into lines of at most WIDTH (None: as it is), the lines
    after the first indented by REST; TEXT's own leading spaces stay on the first line."""
    if width is None or len(text) <= width:
        return [text]
    stripped = text.lstrip(" ")
    return wrap_units(stripped.split(" "), width, first=text[:len(text) - len(stripped)], rest=rest)
