"""Build small patch sets of the tests' own against the real installed files (difflib diffs)."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

Edit = Callable[[list[str]], list[str]]


@dataclass
class PatchDef:
    id: str
    package: str
    module: str
    diff: str
    versions: str = "==0.38.0"
    extra: dict = field(default_factory=dict)
    probes: list[dict] = field(default_factory=list)
    file: str = ""  # default ID.patch; versioned variants of one id need a file each

    @property
    def filename(self) -> str:
        return self.file or f"{self.id}.patch"


def file_diff(site: Path, relpath: str, edit: Edit, *, prefix: bool = True,
              base_lines: list[str] | None = None) -> str:
    """A unified diff of EDIT applied to the real SITE/RELPATH (or to BASE_LINES when given)."""
    old = base_lines if base_lines is not None else (site / relpath).read_text(encoding="utf-8").splitlines(True)
    new = edit(list(old))
    a, b = (f"a/{relpath}", f"b/{relpath}") if prefix else (relpath, relpath)
    return "".join(difflib.unified_diff(old, new, a, b))


def new_file_diff(relpath: str, lines: list[str]) -> str:
    return "".join(difflib.unified_diff([], lines, "/dev/null", f"b/{relpath}"))


def insert_after(marker: str, text: str) -> Edit:
    """Insert TEXT after the first line containing MARKER."""
    def edit(lines: list[str]) -> list[str]:
        index = next(i for i, line in enumerate(lines) if marker in line)
        return lines[:index + 1] + [text] + lines[index + 1:]
    return edit


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_patchset(directory: Path, patches: list[PatchDef], name: str = "test-set") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["schema = 1", f"name = {_toml_value(name)}", ""]
    for patch in patches:
        (directory / patch.filename).write_text(patch.diff, encoding="utf-8")
        lines += ["[[patch]]", f"id = {_toml_value(patch.id)}", f"file = {_toml_value(patch.filename)}",
                  f"package = {_toml_value(patch.package)}", f"module = {_toml_value(patch.module)}",
                  f"versions = {_toml_value(patch.versions)}"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in patch.extra.items()]
        for probe in patch.probes:
            lines += ["", "[[patch.probe]]"] + [f"{k} = {_toml_value(v)}" for k, v in probe.items()]
        lines.append("")
    (directory / "series.toml").write_text("\n".join(lines), encoding="utf-8")
    return directory


def builtin_copy(dest: Path, drop: tuple[str, ...] = (), versions: dict[str, str] | None = None,
                 keys: dict[str, dict[str, object]] | None = None) -> Path:
    """A copy of the built-in patch set at DEST, its series.toml edited per entry (named by its patch
    file): the entries of DROP (and their files) removed, VERSIONS' ranges set, KEYS added."""
    import re
    import shutil

    from ernie_patcher.patchset.series import builtin_directory

    shutil.copytree(builtin_directory(), dest)
    text = (dest / "series.toml").read_text(encoding="utf-8")
    head, *entries = re.split(r"(?m)^(?=\[\[patch\]\]$)", text)
    kept = []
    for entry in entries:
        file = re.search(r'(?m)^file = "([^"]+)"$', entry).group(1)
        if file in drop:
            (dest / file).unlink()
            continue
        if versions and file in versions:
            entry = re.sub(r'(?m)^versions = "[^"]*"$', f"versions = {_toml_value(versions[file])}", entry)
        for key, value in (keys or {}).get(file, {}).items():
            entry = re.sub(r'(?m)^(versions = .*)$', lambda m: f"{m.group(1)}\n{key} = {_toml_value(value)}", entry,
                           count=1)
        kept.append(entry)
    (dest / "series.toml").write_text(head + "".join(kept), encoding="utf-8")
    return dest
