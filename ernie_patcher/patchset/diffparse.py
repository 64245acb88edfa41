"""Parse a unified diff -- plain (`diff -u`, `diff -ruN`) or git's (`git diff`, with its extended
headers and binary patches) -- into the file patches the engine applies, refusing unsafe ones.

Hand-written rather than with unidiff: unidiff keeps a Python object per diff line (a 22 MB
release diff took 342 MB to parse) and knows neither git's modes, renames, copies nor binary
patches. This parser walks the patch bytes once and keeps each hunk as a byte range of them; its
lines are made only while that hunk is applied (hunks.py). Headers are read as `git apply` reads
them: `new file mode`/`deleted file mode` (also with no hunk: an empty file), `old mode`/`new
mode`, `rename from/to` and `copy from/to` (names one component shorter than `---`/`+++` ones),
`similarity index`, `index` and `GIT binary patch` (`literal`/`delta`, base85 + zlib).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from ..errors import ExitCode, PatcherError
from .series import safe_relative

DEV_NULL = "/dev/null"
MAX_INFERRED_STRIP = 3
REGULAR, EXECUTABLE = 0o100644, 0o100755

_HUNK_HEADER = re.compile(rb"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_GIT_MODE = re.compile(rb"^[0-7]{6}$")
_INDEX = re.compile(rb"^index ([0-9a-f]+)\.\.([0-9a-f]+)(?: ([0-7]{6}))?$")
_BINARY_SIZE = re.compile(rb"^(literal|delta) (\d+)$")


@dataclass(frozen=True)
class Hunk:
    """One hunk: a byte range (START, END) of the patch DATA holding its lines; `old` (the lines it
    expects) and `new` (those it leaves), newlines included, are made from it on each use."""

    source_start: int
    target_start: int
    data: bytes = field(repr=False)
    start: int
    end: int
    source_length: int = 0
    target_length: int = 0

    @property
    def old(self) -> tuple[str, ...]:
        return self.sides()[0]

    @property
    def new(self) -> tuple[str, ...]:
        return self.sides()[1]

    def sides(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(old, new): the lines the hunk expects and those it leaves."""
        old: list[str] = []
        new: list[str] = []
        last: list[list[str]] = []
        parts = self.data[self.start:self.end].decode("utf-8", "surrogateescape").split("\n")
        ended = len(parts) - 1
        for number, line in enumerate(parts):
            if number == ended and not line:
                break
            kind, value = line[:1], (line[1:] + "\n" if number < ended else line[1:])
            if kind == "\\":
                for side in last:
                    side[-1] = side[-1][:-1] if side[-1].endswith("\n") else side[-1]
                continue
            if not kind:  # an empty context line, as GNU patch and git apply take it
                kind, value = " ", "\n"
            if kind == " ":
                old.append(value)
                new.append(value)
                last = [old, new]
            elif kind == "-":
                old.append(value)
                last = [old]
            elif kind == "+":
                new.append(value)
                last = [new]
        return tuple(old), tuple(new)

    def added(self) -> bytes | None:
        """The bytes of a hunk that only adds lines (a new file's), made at C speed; None otherwise."""
        region = self.data[self.start:self.end]
        inner_newlines = region.count(b"\n") - region.endswith(b"\n")
        if region.startswith(b"+") and region.count(b"\n+") == inner_newlines:
            return region[1:].replace(b"\n+", b"\n")
        return self._added_slow()

    def _added_slow(self) -> bytes | None:
        old, new = self.sides()
        return None if old else "".join(new).encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class BinaryPatch:
    """The forward half of a `GIT binary patch`: the new bytes (`literal`) or a git delta against
    the old ones (`delta`), already inflated; OLD_ID/NEW_ID are the git object ids of the file before
    and after, from the `index` line (git apply refuses a binary patch without them, and so do we)."""

    method: str
    payload: bytes = field(repr=False)
    old_id: str
    new_id: str


@dataclass(frozen=True)
class FilePatch:
    """The changes to one file; `path` is relative to the import root (e.g. `diffusers/...`).

    SOURCE is the file a rename or copy starts from (None otherwise): a rename removes it, a copy
    keeps it. NEW_MODE is the git mode the file is to have (100644 or 100755) when the patch sets one
    (a new file, or `old mode`/`new mode`), else None."""

    path: PurePosixPath
    hunks: tuple[Hunk, ...]
    creates: bool = False
    deletes: bool = False
    source: PurePosixPath | None = None
    renames: bool = False
    new_mode: int | None = None
    binary: BinaryPatch | None = None


@dataclass(frozen=True)
class ParsedPatch:
    files: tuple[FilePatch, ...]
    strip: int
    strip_inferred: bool


def _usage(where: str, reason: str, hint: str | None = "regenerate it with `diff -u` or `git diff`") -> PatcherError:
    return PatcherError(ExitCode.USAGE, f"malformed diff in {where}: {reason}", hint=hint)


def _unquote(text: bytes) -> bytes | None:
    """A C-style quoted name as git writes it (`"a/t\\303\\251st"`), unquoted; None if not closed."""
    out = bytearray()
    index = 1
    escapes = {ord("n"): 10, ord("t"): 9, ord("a"): 7, ord("b"): 8, ord("f"): 12, ord("r"): 13, ord("v"): 11,
               ord('"'): 34, ord("\\"): 92}
    while index < len(text):
        char = text[index]
        if char == ord('"'):
            return bytes(out)
        if char == ord("\\") and index + 1 < len(text):
            nxt = text[index + 1]
            if nxt in escapes:
                out.append(escapes[nxt])
                index += 2
                continue
            octal = text[index + 1:index + 4]
            if len(octal) == 3 and all(ord("0") <= c <= ord("7") for c in octal):
                out.append(int(octal, 8) & 0xFF)
                index += 4
                continue
            return None
        out.append(char)
        index += 1
    return None


def _name(text: bytes) -> str:
    """A file name from a `---`/`+++`, rename or copy line: unquoted, or cut at a tab (timestamps)."""
    if text.startswith(b'"'):
        unquoted = _unquote(text)
        if unquoted is not None:
            text = unquoted
    else:
        text = text.split(b"\t", 1)[0]
        if text.endswith(b"\r"):
            text = text[:-1]
    return text.decode("utf-8", "surrogateescape")


def _git_line_names(rest: bytes, level: int) -> str | None:
    """The file a `diff --git A B` line names at strip LEVEL: A and B without their first LEVEL
    components must be the same name (git apply reads the line so); None when no split gives that."""
    if rest.startswith(b'"'):
        first = _unquote(rest)
        end = rest.find(b'" ', 1)
        second_raw = rest[end + 2:] if end > 0 else b""
        second = _unquote(second_raw) if second_raw.startswith(b'"') else second_raw
        pairs = [(first, second)] if first is not None and second is not None else []
    else:
        pairs = []
        for at in range(len(rest)):
            if rest[at:at + 1] == b" ":
                second = rest[at + 1:]
                second = (_unquote(second) or b"") if second.startswith(b'"') else second
                pairs.append((rest[:at], second))
    for first, second in pairs:
        a = _strip(first.decode("utf-8", "surrogateescape"), level)
        if a is not None and a == _strip(second.decode("utf-8", "surrogateescape"), level):
            return a
    return None


def _strip(name: str, level: int) -> str | None:
    """NAME without its first LEVEL components (empty ones, as in `a//b`, do not count), as patch -p."""
    parts = [part for part in name.split("/") if part and part != "."]
    if len(parts) <= level:
        return None
    return "/".join(parts[level:])


@dataclass
class _Raw:
    """One file's headers as read, before the strip level is known. Names from `---`/`+++` keep all
    their components; those of the `diff --git`, rename and copy lines are one shorter (SHORT)."""

    old_name: str | None = None
    new_name: str | None = None
    short_old: str | None = None
    short_new: str | None = None
    git_line: bytes = b""
    git: bool = False
    creates: bool = False
    deletes: bool = False
    renames: bool = False
    copies: bool = False
    old_mode: int | None = None
    new_mode: int | None = None
    index: tuple[str, str] | None = None
    hunks: list[Hunk] = field(default_factory=list)
    binary: BinaryPatch | None = None
    line: int = 0

    def label(self) -> str:
        """The file's name for a message: its path without git's a/ or b/."""
        full = self.new_name if self.new_name not in (None, DEV_NULL) else self.old_name
        if full not in (None, DEV_NULL):
            return full[2:] if full.startswith(("a/", "b/")) else full
        return self.short_new or self.short_old or _git_line_names(self.git_line, 1) or f"the file at line {self.line}"

    def raw_names(self) -> list[str]:
        """The names as written, for messages and the check that none is unsafe."""
        names = [n for n in (self.old_name, self.new_name, self.short_old, self.short_new) if n not in (None, DEV_NULL)]
        return names or [self.git_line.decode("utf-8", "surrogateescape")]

    def names_at(self, level: int) -> list[str] | None:
        """The file this patch writes or removes -- for a rename or copy, its source first -- with the
        first LEVEL components taken off (rename and copy lines lack one already); None when a name
        has fewer components or the `diff --git` line names none at that level."""
        if self.renames or self.copies:
            found = [_strip(short, max(level - 1, 0)) if short is not None else _strip(full or "", level)
                     for full, short in ((self.old_name, self.short_old), (self.new_name, self.short_new))]
            return None if None in found else found  # type: ignore[return-value]
        preferred, other = (self.old_name, self.new_name) if self.deletes else (self.new_name, self.old_name)
        for full in (preferred, other):
            if full is not None and full != DEV_NULL:
                stripped = _strip(full, level)
                return [stripped] if stripped is not None else None
        name = _git_line_names(self.git_line, level) if self.git else None
        return [name] if name is not None else None


class _Lines:
    """The patch bytes walked one line at a time (no list of lines is ever made)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.number = 0

    def peek(self) -> bytes | None:
        if self.pos >= len(self.data):
            return None
        stop = self.data.find(b"\n", self.pos)
        return self.data[self.pos:stop if stop >= 0 else len(self.data)]

    def advance(self) -> None:
        stop = self.data.find(b"\n", self.pos)
        self.pos = len(self.data) if stop < 0 else stop + 1
        self.number += 1


def _mode(value: bytes, raw: _Raw, where: str) -> int:
    value = value.strip()
    if not _GIT_MODE.match(value):
        raise _usage(where, f"bad mode {value.decode('ascii', 'replace')!r} for {raw.label()}")
    mode = int(value, 8)
    if mode not in (REGULAR, EXECUTABLE):
        kind = {0o120000: "symlink", 0o160000: "submodule"}.get(mode & 0o170000, f"mode {mode:o}")
        raise PatcherError(ExitCode.USAGE, f"{kind} change for {raw.label()} in {where} is not supported",
                           hint="a patch set changes regular files only")
    return mode


def _git_header(lines: _Lines, raw: _Raw, where: str) -> None:
    """The extended header lines after `diff --git`, up to `---`, a binary patch or the next file."""
    while True:
        line = lines.peek()
        if line is None or line.startswith((b"diff --git ", b"--- ", b"@@ ")):
            return
        if line.startswith(b"GIT binary patch"):
            lines.advance()
            raw.binary = _binary(lines, raw, where)
            return
        if line.startswith(b"Binary files ") and line.rstrip(b"\r").endswith(b" differ"):
            raise _binary_refusal(raw.label(), where)
        _header_line(line, raw, where)
        lines.advance()


def _header_line(line: bytes, raw: _Raw, where: str) -> None:
    for prefix, action in _HEADER_ACTIONS:
        if line.startswith(prefix):
            action(raw, line[len(prefix):].rstrip(b"\r"), where)
            return
    match = _INDEX.match(line.rstrip(b"\r"))
    if match:
        raw.index = (match.group(1).decode(), match.group(2).decode())
        if match.group(3):
            raw.old_mode = raw.new_mode = _mode(match.group(3), raw, where)


def _set_new(raw: _Raw, value: bytes, where: str) -> None:
    raw.creates, raw.new_mode = True, _mode(value, raw, where)


def _set_deleted(raw: _Raw, value: bytes, where: str) -> None:
    raw.deletes, raw.old_mode = True, _mode(value, raw, where)


def _set_old_mode(raw: _Raw, value: bytes, where: str) -> None:
    raw.old_mode = _mode(value, raw, where)


def _set_new_mode(raw: _Raw, value: bytes, where: str) -> None:
    raw.new_mode = _mode(value, raw, where)


def _rename_from(raw: _Raw, value: bytes, where: str) -> None:
    raw.renames, raw.short_old = True, _name(value)


def _rename_to(raw: _Raw, value: bytes, where: str) -> None:
    raw.renames, raw.short_new = True, _name(value)


def _copy_from(raw: _Raw, value: bytes, where: str) -> None:
    raw.copies, raw.short_old = True, _name(value)


def _copy_to(raw: _Raw, value: bytes, where: str) -> None:
    raw.copies, raw.short_new = True, _name(value)


def _ignore(raw: _Raw, value: bytes, where: str) -> None:
    """similarity/dissimilarity index: informative only, as for git apply."""


_HEADER_ACTIONS = (
    (b"new file mode ", _set_new), (b"deleted file mode ", _set_deleted), (b"old mode ", _set_old_mode),
    (b"new mode ", _set_new_mode), (b"rename from ", _rename_from), (b"rename to ", _rename_to),
    (b"rename old ", _rename_from), (b"rename new ", _rename_to), (b"copy from ", _copy_from),
    (b"copy to ", _copy_to), (b"similarity index ", _ignore), (b"dissimilarity index ", _ignore),
)


def _binary_refusal(name: str, where: str) -> PatcherError:
    return PatcherError(ExitCode.USAGE, f"binary patch for {name} in {where} is not supported without its bytes "
                        "('Binary files ... differ')",
                        hint="regenerate the diff with `git diff --binary`, which carries the new bytes; "
                             "a plain diff cannot")


def _binary(lines: _Lines, raw: _Raw, where: str) -> BinaryPatch:
    """The `literal`/`delta` hunks of a GIT binary patch; the first (forward) one is kept."""
    from .gitbinary import BinaryError, inflate

    if raw.index is None or len(raw.index[0]) not in (40, 64) or len(raw.index[0]) != len(raw.index[1]):
        raise PatcherError(ExitCode.USAGE, f"binary patch for {raw.label()} in {where} has no full index line",
                           hint="regenerate it with `git diff --binary --full-index` (git apply refuses it too)")
    halves: list[tuple[str, bytes]] = []
    while len(halves) < 2:
        line = lines.peek()
        match = _BINARY_SIZE.match(line.rstrip(b"\r")) if line is not None else None
        if match is None:
            break
        lines.advance()
        start = lines.pos
        while (line := lines.peek()) is not None and line.strip():
            lines.advance()
        body = lines.data[start:lines.pos]
        if line is not None:
            lines.advance()  # the blank line closing the hunk
        try:
            payload = inflate(body, int(match.group(2))) if not halves else b""
        except BinaryError as exc:
            raise _usage(where, f"binary patch for {raw.label()}: {exc}") from None
        halves.append((match.group(1).decode(), payload))
    if not halves:
        raise _usage(where, f"binary patch for {raw.label()} has no literal or delta hunk")
    method, payload = halves[0]
    return BinaryPatch(method, payload, raw.index[0], raw.index[1])


def _hunks(lines: _Lines, raw: _Raw, where: str) -> None:
    """The hunks after a `---`/`+++` pair, each kept as the byte range of its lines."""
    while True:
        line = lines.peek()
        if line is None or not line.startswith(b"@@ "):
            return
        if line.endswith(b"\r"):
            raise PatcherError(ExitCode.USAGE, f"{where} has CRLF line ends on its header lines",
                               hint="the patch file was converted to CRLF; convert it back (dos2unix) or regenerate it")
        match = _HUNK_HEADER.match(line)
        if match is None:
            raise PatcherError(ExitCode.USAGE, f"{where}: no hunks for {raw.label()}: bad hunk header at line "
                               f"{lines.number + 1}: {line[:80].decode('utf-8', 'replace')}",
                               hint="regenerate it with `diff -u` or `git diff`")
        old_start, old_len = int(match.group(1)), int(match.group(2) or b"1")
        new_start, new_len = int(match.group(3)), int(match.group(4) or b"1")
        lines.advance()
        start = lines.pos
        if not _counted_body(lines, old_len, new_len):
            _walk_body(lines, raw, where, old_len, new_len)
        raw.hunks.append(Hunk(old_start, new_start, lines.data, start, lines.pos, old_len, new_len))


_NOT_BODY = re.compile(rb"\n[^ +\-\\\n]")


def _counted_body(lines: _Lines, old_len: int, new_len: int) -> bool:
    """Skip a hunk body at C speed when it runs up to the next line that cannot be a body line
    (the next hunk, `diff --git`, the end) and its lines add up to what the header says, as in
    every diff git and diff -ruN write; False (nothing skipped) otherwise."""
    data, pos = lines.data, lines.pos
    found = _NOT_BODY.search(data, pos - 1) if pos else None
    end = found.start() + 1 if found else len(data)
    if pos == 0 or data.find(b"\n\n", pos - 1, end) >= 0:
        return False
    context = data.count(b"\n ", pos - 1, end)
    removed = data.count(b"\n-", pos - 1, end)
    added = data.count(b"\n+", pos - 1, end)
    if context + removed != old_len or context + added != new_len:
        return False
    lines.number += data.count(b"\n", pos, end)
    lines.pos = end
    return True


def _walk_body(lines: _Lines, raw: _Raw, where: str, old_len: int, new_len: int) -> None:
    """Skip a hunk body line by line, counting its old and new lines against its header."""
    old_seen = new_seen = 0
    while old_seen < old_len or new_seen < new_len:
        body = lines.peek()
        kind = body[:1] if body is not None else b""
        if kind in (b" ", b"") and body is not None:
            old_seen, new_seen = old_seen + 1, new_seen + 1
        elif kind == b"-":
            old_seen += 1
        elif kind == b"+":
            new_seen += 1
        elif kind != b"\\" or body is None:
            raise _usage(where, f"hunk of {raw.label()} ends early at line {lines.number + 1}: its header "
                                f"says {old_len} old and {new_len} new lines")
        lines.advance()
    if old_seen != old_len or new_seen != new_len:
        raise _usage(where, f"hunk of {raw.label()} ending at line {lines.number} has more lines than its header says")
    if (after := lines.peek()) is not None and after.startswith(b"\\"):
        lines.advance()


def _read(data: bytes, where: str) -> list[_Raw]:
    """Every file of the patch with its headers and hunks; lines between files are ignored, as git
    apply and GNU patch ignore them (a mail's text, `diff -r` command lines, `Only in` notes)."""
    lines = _Lines(data)
    files: list[_Raw] = []
    while (line := lines.peek()) is not None:
        if line.startswith(b"diff --git "):
            raw = _Raw(git=True, line=lines.number + 1)
            raw.git_line = line[len(b"diff --git "):].rstrip(b"\r")
            lines.advance()
            files.append(raw)
            _git_header(lines, raw, where)
            if raw.binary is None:
                _unified(lines, raw, where)
            continue
        if line.startswith(b"Binary files ") and line.rstrip(b"\r").endswith(b" differ"):
            raise _binary_refusal(line[len(b"Binary files "):].split(b" and ")[0].decode("utf-8", "replace"), where)
        if line.startswith(b"--- "):
            raw = _Raw(line=lines.number + 1)
            files.append(raw)
            _unified(lines, raw, where)
            if not raw.hunks:
                raise _usage(where, f"no hunks for {raw.label()} at line {raw.line}")
            continue
        if line.startswith(b"@@ "):
            raise _usage(where, f"hunk at line {lines.number + 1} belongs to no file (no ---/+++ lines before it)")
        lines.advance()
    return files


def _unified(lines: _Lines, raw: _Raw, where: str) -> None:
    """The `---`/`+++` names and the hunks of one file, when there are any."""
    line = lines.peek()
    if line is None or not line.startswith(b"--- "):
        return
    lines.advance()
    plus = lines.peek()
    if plus is None or not plus.startswith(b"+++ "):
        raise _usage(where, f"'---' line {lines.number} is not followed by a '+++' line")
    raw.old_name, raw.new_name = _name(line[4:]), _name(plus[4:])
    lines.advance()
    if raw.old_name == DEV_NULL:
        raw.creates = True
    if raw.new_name == DEV_NULL:
        raw.deletes = True
    _hunks(lines, raw, where)
    if not raw.git and len(raw.hunks) == 1:  # diff -N names both files, the absent one empty
        only = raw.hunks[0]
        raw.creates = raw.creates or (only.source_start, only.source_length) == (0, 0)
        raw.deletes = raw.deletes or (only.target_start, only.target_length) == (0, 0)


def _infer_strip(raws: list[_Raw], module: str) -> int | None:
    for level in range(MAX_INFERRED_STRIP + 1):
        if all(names is not None and all(n.split("/", 1)[0] == module for n in names)
               for names in (raw.names_at(level) for raw in raws)):
            return level
    return None


def _path(name: str, module: str, where: str) -> PurePosixPath:
    path = safe_relative(name, where)
    if path.parts[0] != module or len(path.parts) < 2:
        raise PatcherError(ExitCode.USAGE, f"{where}: path {name!r} is outside package module {module!r}",
                           hint="a patch may only change files of the package it declares")
    return path


def _file_patch(raw: _Raw, module: str, strip: int, where: str) -> FilePatch:
    names = raw.names_at(strip)
    if names is None:
        written = raw.raw_names()[0]
        raise PatcherError(ExitCode.USAGE, f"{where}: strip {strip} removes the whole path {written!r}"
                           if raw.old_name or raw.new_name or raw.short_old else
                           f"malformed diff in {where}: the `diff --git` line at line {raw.line} names no one file "
                           f"at strip {strip}: {written!r}", hint="check the 'strip' of the series file")
    if raw.creates and raw.deletes:
        raise _usage(where, f"{raw.label()} is both created and deleted")
    if not raw.hunks and raw.binary is None and not (raw.creates or raw.deletes or raw.renames or raw.copies
                                                     or raw.old_mode != raw.new_mode):
        raise _usage(where, f"no hunks for {raw.label()} (nothing to change)")
    paths = [_path(name, module, where) for name in names]
    if (raw.renames or raw.copies) and (raw.creates or raw.deletes):
        raise _usage(where, f"{raw.label()} is renamed or copied and also created or deleted")
    source = paths[0] if raw.renames or raw.copies else None
    new_mode = raw.new_mode if (raw.creates or raw.new_mode != raw.old_mode) else None
    if raw.deletes:
        new_mode = None
    return FilePatch(path=paths[-1], hunks=tuple(raw.hunks), creates=raw.creates or raw.renames or raw.copies,
                     deletes=raw.deletes, source=source, renames=raw.renames, new_mode=new_mode, binary=raw.binary)


def parse_patch(text: str | bytes, module: str, strip: int | None, where: str) -> ParsedPatch:
    """Parse TEXT (the patch's bytes; a str is taken as its surrogateescape decoding); every path must
    stay inside MODULE. STRIP None means infer it and say so."""
    data = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    raws = _read(data, where)
    if not raws:
        raise _usage(where, "no file changes found")
    for raw in raws:
        for name in raw.raw_names():
            safe_relative(name, where)
    inferred = strip is None
    if inferred:
        strip = _infer_strip(raws, module)
        if strip is None:
            raise PatcherError(
                ExitCode.USAGE, f"paths in {where} do not point into package module {module!r}",
                details=[f"path: {name}" for raw in raws for name in raw.raw_names()][:20],
                hint="paths are relative to site-packages (e.g. 'a/diffusers/...'); set 'strip' in the series file")
    files = tuple(_file_patch(raw, module, strip, where) for raw in raws)
    touched = [f.path for f in files] + [f.source for f in files if f.renames and f.source is not None]
    if len(set(touched)) != len(touched):
        raise PatcherError(ExitCode.USAGE, f"{where} changes the same file twice",
                           hint="merge the changes into one diff per file")
    return ParsedPatch(files=files, strip=strip, strip_inferred=inferred)
