"""The series file: which patches exist, what they target, their version ranges and probes."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Mapping

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from ..errors import ExitCode, PatcherError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SERIES_FILE = "series.toml"
SCHEMA = 1
PROBE_KINDS = ("function", "class", "method", "call", "string", "import")

_TOP_KEYS = {"schema", "name", "description", "patch"}
_PATCH_KEYS = {"id", "file", "package", "module", "versions", "strip", "summary", "requires", "probe", "fixed-in"}
_PROBE_KEYS = {"file", "kind", "name", "within", "value", "params", "absent"}
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ProbeSpec:
    """A declarative AST check: a fact about a file that holds only once the patch is in."""

    file: str
    kind: str
    name: str | None = None
    within: str | None = None
    value: str | None = None
    params: tuple[str, ...] | None = None
    absent: bool = False

    def describe(self) -> str:
        what = {"string": f"string {self.value!r}", "import": f"import {self.name}",
                "call": f"call {self.name}()"}.get(self.kind, f"{self.kind} {self.name}")
        if self.params is not None:
            what += f"({', '.join(self.params)})"
        if self.within:
            what += f" in {self.within}"
        return ("no " if self.absent else "") + what


@dataclass(frozen=True)
class PatchSpec:
    id: str
    file: str
    package: str
    module: str
    versions: SpecifierSet
    path: Path
    strip: int | None = None
    summary: str = ""
    requires: tuple[str, ...] = ()
    probes: tuple[ProbeSpec, ...] = ()
    versions_text: str = ""
    fixed_in: SpecifierSet | None = None
    fixed_in_text: str = ""

    def covers(self, version: str) -> bool:
        """Whether VERSION is in the tested range (pre-releases and local builds such as
        0.19.0rc1+npu count)."""
        return self.versions.contains(version, prereleases=True)

    def fixed_upstream(self, version: str) -> bool:
        """Whether VERSION is a release the series' `fixed-in` range names as carrying an equivalent
        fix of its own (the patch is not needed there)."""
        return self.fixed_in is not None and self.fixed_in.contains(version, prereleases=True)

    @property
    def tested(self) -> str:
        """The version range as written in the series file (packaging reorders its own str())."""
        return self.versions_text or str(self.versions)

    @property
    def text(self) -> str:
        """The diff; bytes that are not UTF-8 are kept as they are (surrogateescape), as for targets,
        so a patch to a latin-1 file matches and writes the same bytes."""
        return self.path.read_bytes().decode("utf-8", "surrogateescape")

    def digest(self) -> str:
        """sha256 of the patch file, read in chunks (a whole-release diff need not be in memory twice)."""
        with self.path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest() if hasattr(hashlib, "file_digest") \
                else hashlib.sha256(handle.read()).hexdigest()


@dataclass(frozen=True)
class Choice:
    """One patch id against one installed version: its variants (series order) and the one chosen.

    CHOSEN is the variant whose tested range contains the installed version; None when none does
    (or the package is not installed).
    """

    id: str
    variants: tuple[PatchSpec, ...]
    chosen: PatchSpec | None

    def ranges(self) -> str:
        return ranges_text(self.variants)


def ranges_text(variants: tuple[PatchSpec, ...]) -> str:
    """Every variant's tested range and file, e.g. `>=0.38.0,<=0.40.0 (a.patch), ==0.41.0 (b.patch)`."""
    return ", ".join(f"{v.tested} ({v.file})" for v in variants)


@dataclass(frozen=True)
class Series:
    directory: Path
    name: str
    patches: tuple[PatchSpec, ...] = field(default_factory=tuple)

    @property
    def ids(self) -> list[str]:
        """Patch ids in series order, each once (variants share an id)."""
        return list(dict.fromkeys(p.id for p in self.patches))

    def variants(self, patch_id: str) -> tuple[PatchSpec, ...]:
        """Every entry of PATCH_ID in series order: one, or several versioned variants."""
        found = tuple(p for p in self.patches if p.id == patch_id)
        if not found:
            from difflib import get_close_matches

            close = get_close_matches(patch_id, self.ids, n=1)
            raise PatcherError(ExitCode.USAGE, f"unknown patch id {patch_id!r}" + (f" (did you mean {close[0]!r}?)"
                                                                               if close else ""),
                               hint=f"known ids: {', '.join(self.ids)} (ernie-patch list shows the set)")
        return found

    def get(self, patch_id: str) -> PatchSpec:
        """The entry of PATCH_ID; for a patch with versioned variants, the first in series order."""
        return self.variants(patch_id)[0]

    def select(self, only: tuple[str, ...] | list[str] = ()) -> list[PatchSpec]:
        """The entries to act on, in series order: ONLY plus what they require, or all (every variant)."""
        if not only:
            return list(self.patches)
        wanted: set[str] = set()
        pending = list(only)
        while pending:
            variants = self.variants(pending.pop())
            if variants[0].id not in wanted:
                wanted.add(variants[0].id)
                pending.extend(r for v in variants for r in v.requires)
        return [p for p in self.patches if p.id in wanted]

    def resolve(self, entries: list[PatchSpec], versions: Mapping[str, str | None]) -> list[Choice]:
        """One Choice per id of ENTRIES, in series order, for the installed VERSIONS (package -> version,
        None when not installed). Two variants whose ranges both contain the version: usage error."""
        choices = []
        for patch_id in dict.fromkeys(e.id for e in entries):
            variants = tuple(e for e in entries if e.id == patch_id)
            package = variants[0].package
            version = versions.get(package)
            covering = [v for v in variants if version is not None and v.covers(version)]
            if len(covering) > 1:
                raise PatcherError(
                    ExitCode.USAGE, f"patch {patch_id!r} of {self.directory / SERIES_FILE} is ambiguous for "
                    f"{package} {version}: variants {' and '.join(f'{v.file} ({v.tested})' for v in covering)} "
                    "both cover it", hint="make the 'versions' ranges of the variants of one id disjoint")
            choices.append(Choice(patch_id, variants, covering[0] if covering else None))
        return choices


def builtin_directory() -> Path:
    """The patch set shipped with the tool: package data when installed, `patches/` in a checkout."""
    packaged = Path(__file__).parents[1] / "builtin"
    if (packaged / SERIES_FILE).is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "patches"


def _fail(where: str, reason: str, hint: str | None = None) -> PatcherError:
    return PatcherError(ExitCode.USAGE, f"invalid series file {where}: {reason}", hint=hint)


def _check_keys(table: object, allowed: set[str], where: str) -> dict:
    if not isinstance(table, dict):
        raise _fail(where, "expected a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _fail(where, f"unknown key(s) {', '.join(unknown)}",
                    hint=f"allowed keys: {', '.join(sorted(allowed))}")
    return table


def _string(table: dict, key: str, where: str, required: bool = True) -> str | None:
    value = table.get(key)
    if value is None:
        if required:
            raise _fail(where, f"missing {key!r}")
        return None
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, f"{key!r} must be a non-empty string")
    return value


def safe_relative(path: str, where: str) -> PurePosixPath:
    """A relative POSIX path with no `..`, no absolute root and no backslashes, or an error."""
    pure = PurePosixPath(path)
    if "\\" in path or pure.is_absolute() or ".." in pure.parts or not pure.parts or "\x00" in path:
        raise PatcherError(ExitCode.USAGE, f"unsafe path {path!r} in {where}",
                           hint="paths must be relative, inside the package, without '..'")
    return pure


def _probe(table: object, module: str, where: str) -> ProbeSpec:
    table = _check_keys(table, _PROBE_KEYS, where)
    kind = _string(table, "kind", where)
    if kind not in PROBE_KINDS:
        raise _fail(where, f"unknown probe kind {kind!r}", hint=f"kinds: {', '.join(PROBE_KINDS)}")
    file = _string(table, "file", where)
    rel = safe_relative(file, where)
    if rel.parts[0] != module:
        raise _fail(where, f"probe file {file!r} is outside module {module!r}")
    name = _string(table, "name", where, required=kind != "string")
    if kind == "method" and "." not in name:
        raise _fail(where, f"method probe name {name!r} must be 'Class.method'")
    value = _string(table, "value", where, required=kind == "string")
    params = table.get("params")
    if params is not None and (not isinstance(params, list) or not all(isinstance(p, str) for p in params)):
        raise _fail(where, "'params' must be a list of strings")
    if params is not None and kind not in ("function", "method"):
        raise _fail(where, "'params' applies only to function and method probes")
    absent = table.get("absent", False)
    if not isinstance(absent, bool):
        raise _fail(where, "'absent' must be true or false")
    return ProbeSpec(file=str(rel), kind=kind, name=name, within=_string(table, "within", where, False),
                     value=value, params=tuple(params) if params is not None else None, absent=absent)


def _patch(table: object, directory: Path, index: int) -> PatchSpec:
    where = f"patch #{index + 1}"
    table = _check_keys(table, _PATCH_KEYS, where)
    patch_id = _string(table, "id", where)
    if not _ID.match(patch_id):
        raise _fail(where, f"id {patch_id!r} must be letters, digits, '.', '_' or '-'")
    where = f"patch {patch_id!r}"
    file = _string(table, "file", where)
    if PurePosixPath(file).name != file or file in (".", ".."):
        raise _fail(where, f"file {file!r} must be a plain file name inside the patch directory")
    path = directory / file
    if not path.is_file():
        raise PatcherError(ExitCode.USAGE, f"patch file {file!r} of {where} not found in {directory}")
    package = _string(table, "package", where)
    module = _string(table, "module", where, required=False) or package.replace("-", "_")
    versions_text = _string(table, "versions", where)
    try:
        versions = SpecifierSet(versions_text)
    except InvalidSpecifier as exc:
        raise _fail(where, f"'versions' is not a PEP 440 specifier: {exc}") from None
    strip = table.get("strip")
    if strip is not None and (not isinstance(strip, int) or isinstance(strip, bool) or not 0 <= strip <= 8):
        raise _fail(where, "'strip' must be an integer from 0 to 8")
    requires = table.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise _fail(where, "'requires' must be a list of patch ids")
    probes = table.get("probe", [])
    if not isinstance(probes, list):
        raise _fail(where, "'probe' must be an array of tables ([[patch.probe]])")
    fixed_in_text = _string(table, "fixed-in", where, required=False)
    try:
        fixed_in = SpecifierSet(fixed_in_text) if fixed_in_text is not None else None
    except InvalidSpecifier as exc:
        raise _fail(where, f"'fixed-in' is not a PEP 440 specifier: {exc}",
                    hint='e.g. fixed-in = ">=0.32.0": the releases that carry an equivalent fix') from None
    return PatchSpec(
        id=patch_id, file=file, package=package, module=module, versions=versions, path=path,
        strip=strip, summary=_string(table, "summary", where, False) or "", requires=tuple(requires),
        versions_text=versions_text, fixed_in=fixed_in, fixed_in_text=fixed_in_text or "",
        probes=tuple(_probe(p, module, f"{where} probe #{i + 1}") for i, p in enumerate(probes)),
    )


def _boundaries(specifiers: SpecifierSet) -> set[Version]:
    versions = set()
    for spec in specifiers:
        try:
            versions.add(Version(spec.version))
        except InvalidVersion:  # e.g. a wildcard such as ==0.38.*
            continue
    return versions


def _overlap(a: SpecifierSet, b: SpecifierSet) -> bool:
    """Whether two ranges obviously overlap: identical, or a version either names is in both.

    Not complete (`>0.5` and `<0.6` share 0.55 but no named version); selection refuses any
    version that more than one variant covers.
    """
    if a == b:
        return True
    return any(a.contains(v, prereleases=True) and b.contains(v, prereleases=True)
               for v in _boundaries(a) | _boundaries(b))


def _check_variants(variants: list[PatchSpec]) -> None:
    """Several entries of one id are versioned variants: same package and module, own file, disjoint ranges."""
    first = variants[0]
    where = f"patch {first.id!r}"
    hint = ("entries sharing an id are versioned variants of one patch: same package and module, each "
            "with its own file and a 'versions' range disjoint from the others; otherwise use another id")
    for index, other in enumerate(variants[1:], start=2):
        if (other.package, other.module) != (first.package, first.module):
            raise _fail(where, f"variant #{index} is for {other.package} (module {other.module}), variant #1 for "
                        f"{first.package} (module {first.module})", hint=hint)
        for earlier in variants[:index - 1]:
            if other.file == earlier.file:
                raise _fail(where, f"two variants use the same file {other.file!r}", hint=hint)
            if _overlap(earlier.versions, other.versions):
                raise _fail(where, f"variants {earlier.file} ({earlier.tested}) and {other.file} ({other.tested}) "
                            "have overlapping 'versions' ranges", hint=hint)


def _shared_fixed_in(variants: list[PatchSpec]) -> list[PatchSpec]:
    """`fixed-in` belongs to the patch id: given on one variant (or the same on several), every
    variant gets it; it must not overlap a variant's tested range (a release cannot both need the
    patch and carry the fix)."""
    texts = {v.fixed_in_text for v in variants if v.fixed_in is not None}
    where = f"patch {variants[0].id!r}"
    if len(texts) > 1:
        raise _fail(where, f"variants give different 'fixed-in' ranges: {', '.join(sorted(texts))}",
                    hint="'fixed-in' names the releases that carry the fix, for the patch id as a whole: "
                         "give it once")
    if not texts:
        return variants
    declared = next(v for v in variants if v.fixed_in is not None)
    for variant in variants:
        if _overlap(variant.versions, declared.fixed_in):
            raise _fail(where, f"'fixed-in' {declared.fixed_in_text} overlaps the tested range {variant.tested} "
                        f"of {variant.file}",
                        hint="a release either needs the patch (versions) or carries the fix (fixed-in): "
                             "make the ranges disjoint")
    return [replace(v, fixed_in=declared.fixed_in, fixed_in_text=declared.fixed_in_text) for v in variants]


def parse_series(text: str, directory: Path) -> Series:
    """Validate a series document; every problem is a PatcherError naming where it is."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _fail(str(directory / SERIES_FILE), f"not valid TOML ({exc})") from None
    data = _check_keys(data, _TOP_KEYS, "(top level)")
    if data.get("schema") != SCHEMA:
        raise _fail("(top level)", f"schema {data.get('schema')!r} is not supported",
                    hint=f"this ernie-patch reads schema = {SCHEMA}")
    tables = data.get("patch", [])
    if not isinstance(tables, list) or not tables:
        raise _fail("(top level)", "no [[patch]] entries")
    patches = tuple(_patch(t, directory, i) for i, t in enumerate(tables))
    ids = [p.id for p in patches]
    shared: dict[str, list[PatchSpec]] = {}
    for patch_id in dict.fromkeys(ids):
        _check_variants([p for p in patches if p.id == patch_id])
        shared[patch_id] = _shared_fixed_in([p for p in patches if p.id == patch_id])
    patches = tuple(shared[patch_id].pop(0) for patch_id in ids)
    for patch in patches:
        for required in patch.requires:
            if required not in ids:
                raise _fail(f"patch {patch.id!r}", f"requires unknown patch {required!r}")
    name = data.get("name", directory.name)
    if not isinstance(name, str):
        raise _fail("(top level)", "'name' must be a string")
    return Series(directory=directory, name=name, patches=patches)


def load_series(directory: Path | None = None) -> Series:
    """Read DIRECTORY/series.toml (default: the built-in set)."""
    directory = Path(directory) if directory is not None else builtin_directory()
    path = directory / SERIES_FILE
    if not path.is_file():
        raise PatcherError(ExitCode.USAGE, f"no {SERIES_FILE} in {directory}",
                           hint="a patch directory holds the .patch files and a series.toml describing them")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(str(path), f"cannot be read ({exc})") from None
    return parse_series(text, directory)
