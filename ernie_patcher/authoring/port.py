"""`ernie-patch port`: carry a patch onto a newer release of its package by a three-way merge.

The pristine files come from the published wheels of both releases (`pip download --no-deps`, or
wheels the user gives), never from an installed environment, which port does not touch. Per file:
base = the file of the release the patch was written for, ours = base with the patch applied,
theirs = the file of the new release; merged with diff3's rules (merge3.py), as `git apply -3`
does. A clean merge that compiles and passes the patch's probes becomes a new versioned variant
(range `==VERSION`, added to the series); anything else is written, with conflict markers, to a
scratch directory, naming the hunks a person must resolve. Nothing here prints.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from ..core.assess import decode, encode
from ..errors import ExitCode, PatcherError
from ..fs.fsops import atomic_write, read_bytes
from ..patchset.diffparse import FilePatch, Hunk, parse_patch
from ..patchset.hunks import HunkConflict, apply_hunks, split_lines
from ..patchset.probes import ProbeResult, run_probe
from ..patchset.series import SERIES_FILE, PatchSpec, Series, load_series, safe_relative
from .create import add_to_series, file_diff, patch_directory, toml_string
from .merge3 import merge
from .wheels import download_release, pristine_files, same_release, wheel_release

CLEAN, CONFLICTS, GONE = "clean", "conflict", "missing"
_VERSIONED = re.compile(r"\.v\d+(?:_\d+)*$")


@dataclass(frozen=True)
class PortRequest:
    """The options of `port`, as given on the command line."""

    patch_id: str
    to_version: str
    from_version: str | None = None
    from_wheel: Path | None = None
    to_wheel: Path | None = None
    patches: Path | None = None
    scratch: Path | None = None
    resolved: Path | None = None  # merged files a person resolved (a scratch directory port wrote)
    progress: bool = False  # let pip show its download progress on stderr (a terminal)


@dataclass(frozen=True)
class HunkConflictSite:
    """A hunk of the ported patch whose change meets a change of the new release."""

    hunk: int
    header: str
    merged_line: int

    def describe(self, relpath: str) -> str:
        return f"{relpath}: hunk #{self.hunk} ({self.header}), conflict markers at line {self.merged_line}"

    def to_dict(self) -> dict:
        return {"hunk": self.hunk, "header": self.header, "merged_line": self.merged_line}


@dataclass
class PortedFile:
    """One file of the patch after the merge: CLEAN, CONFLICTS or GONE (not in the new release)."""

    relpath: str
    action: str
    outcome: str
    merged: bytes | None = None
    new_pristine: bytes | None = None
    conflicts: list[HunkConflictSite] = field(default_factory=list)
    scratch: Path | None = None

    def to_dict(self) -> dict:
        return {"relpath": self.relpath, "action": self.action, "outcome": self.outcome,
                "conflicts": [c.to_dict() for c in self.conflicts],
                "scratch": str(self.scratch) if self.scratch else None}


@dataclass
class Ported:
    """What `port` found and wrote; ERROR is set when it stopped short of a variant."""

    id: str
    package: str
    module: str
    source_file: str
    from_version: str
    to_version: str
    from_wheel: str
    to_wheel: str
    series_file: Path
    files: list[PortedFile] = field(default_factory=list)
    probes: list[ProbeResult] = field(default_factory=list)
    compile_error: str | None = None
    variant_file: Path | None = None
    scratch_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    error: PatcherError | None = None

    @property
    def versions(self) -> str:
        return f"=={self.to_version}"

    def to_dict(self) -> dict:
        return {"id": self.id, "package": self.package, "module": self.module, "source_file": self.source_file,
                "from_version": self.from_version, "to_version": self.to_version, "from_wheel": self.from_wheel,
                "to_wheel": self.to_wheel, "series_file": str(self.series_file), "versions": self.versions,
                "variant_file": str(self.variant_file) if self.variant_file else None,
                "scratch_dir": str(self.scratch_dir) if self.scratch_dir else None,
                "compile_error": self.compile_error, "files": [f.to_dict() for f in self.files],
                "probes": [p.to_dict() for p in self.probes]}


def port_patch(request: PortRequest) -> Ported:
    """Merge patch REQUEST.patch_id onto REQUEST.to_version; write a variant or the scratch files."""
    directory = patch_directory(request.patches)
    if not (directory / SERIES_FILE).is_file():
        raise PatcherError(ExitCode.USAGE, f"no {SERIES_FILE} in {directory}",
                           hint="pass --patches DIR with the patch set holding the patch to port (to port a "
                                "built-in patch, copy the built-in set first: `ernie-patch list` shows where it is)")
    series = load_series(directory)
    to_version = _version(request.to_version, "--to")
    source, from_version = _source_variant(series, request, to_version)
    parsed = parse_patch(source.text, source.module, source.strip, f"patch {source.id} ({source.file})")
    relpaths = [str(fp.path) for fp in parsed.files]
    probed = [p.file for p in source.probes if p.file not in relpaths]
    with tempfile.TemporaryDirectory(prefix="ernie-patch-port-") as tmp:
        old_wheel = _wheel(request.from_wheel, source.package, from_version, Path(tmp) / "from", request.progress)
        new_wheel = _wheel(request.to_wheel, source.package, to_version, Path(tmp) / "to", request.progress)
        old_files, new_files = pristine_files(old_wheel, relpaths), pristine_files(new_wheel, relpaths + probed)
    ported = Ported(id=source.id, package=source.package, module=source.module, source_file=source.file,
                    from_version=from_version, to_version=to_version, from_wheel=old_wheel.name,
                    to_wheel=new_wheel.name, series_file=directory / SERIES_FILE)
    labels = (f"{source.file} on {source.package} {from_version}", f"{source.package} {from_version}",
              f"{source.package} {to_version}")
    ported.files = [_merge_file(fp, old_files[str(fp.path)], new_files[str(fp.path)], source, from_version, labels)
                    for fp in parsed.files]
    if request.resolved is not None:
        _take_resolved(ported, Path(request.resolved))
    if all(f.outcome == CLEAN for f in ported.files):
        _check_result(ported, source, new_files)
    if all(f.outcome == CLEAN for f in ported.files) and ported.compile_error is None and \
            all(p.passed for p in ported.probes):
        _write_variant(ported, source, directory)
    else:
        _write_scratch(ported, request.scratch)
    return ported


def _version(text: str, option: str) -> str:
    try:
        return str(Version(text))
    except InvalidVersion:
        raise PatcherError(ExitCode.USAGE, f"{option} {text!r} is not a PEP 440 version",
                           hint="give a release, e.g. 0.30.0") from None


def _named_versions(spec: PatchSpec) -> list[Version]:
    """The versions a variant's range names (its bounds), among those it contains."""
    found = []
    for specifier in spec.versions:
        try:
            version = Version(specifier.version)
        except InvalidVersion:
            continue
        if spec.covers(str(version)):
            found.append(version)
    return found


def _source_variant(series: Series, request: PortRequest, to_version: str) -> tuple[PatchSpec, str]:
    """The variant to port and the release it was written for: --from (or --from-wheel's release), else
    the newest release a variant's range names below --to."""
    variants = series.variants(request.patch_id)
    first = variants[0]
    covering = [v for v in variants if v.covers(to_version)]
    if covering:
        raise PatcherError(ExitCode.USAGE, f"patch {first.id!r} already has a variant for {first.package} {to_version}: "
                           f"{covering[0].file} ({covering[0].tested})",
                           hint="nothing to port: apply uses that variant; port onto a release no variant covers")
    if first.fixed_upstream(to_version):
        raise PatcherError(ExitCode.USAGE, f"patch {first.id!r} is not needed on {first.package} {to_version}: "
                           f"the series says it is fixed upstream there (fixed-in {first.fixed_in_text})",
                           hint="take the release out of 'fixed-in' if it does not carry the fix")
    from_version = request.from_version and _version(request.from_version, "--from")
    if request.from_wheel is not None:
        name, version = wheel_release(request.from_wheel)
        if canonicalize_name(name) != canonicalize_name(first.package) or (from_version and Version(version) != Version(from_version)):
            raise PatcherError(ExitCode.USAGE, f"--from-wheel {request.from_wheel.name} is {name} {version}, not "
                               f"{first.package} {from_version or ''}".rstrip(),
                               hint="give the wheel of the release the patch was written for")
        from_version = version
    if from_version is None:
        named = [(v, spec) for spec in variants for v in _named_versions(spec) if v < Version(to_version)]
        if not named:
            raise PatcherError(ExitCode.USAGE, f"cannot tell which {first.package} release patch {first.id!r} was "
                               f"written for: no variant's range names one below {to_version} "
                               f"({', '.join(v.tested for v in variants)})",
                               hint="pass --from VERSION (or --from-wheel FILE) with the release the patch applies to")
        from_version = str(max(named, key=lambda pair: pair[0])[0])
    source = next((v for v in variants if v.covers(from_version)), None)
    if source is None:
        raise PatcherError(ExitCode.USAGE, f"no variant of patch {first.id!r} covers {first.package} {from_version}: "
                           f"{', '.join(f'{v.file} ({v.tested})' for v in variants)}",
                           hint="--from names a release inside the range of the variant to port")
    if Version(from_version) >= Version(to_version):
        raise PatcherError(ExitCode.USAGE, f"--to {to_version} is not newer than {from_version}, the release "
                           f"{source.file} was written for", hint="port onto a newer release")
    return source, from_version


def _wheel(given: Path | None, package: str, version: str, dest: Path, progress: bool) -> Path:
    """GIVEN (checked to be PACKAGE VERSION's wheel) or the one pip downloads into DEST."""
    if given is None:
        dest.mkdir(parents=True, exist_ok=True)
        return download_release(package, version, None, dest, progress)
    name, found = wheel_release(given)
    if not same_release(name, found, package, version):
        raise PatcherError(ExitCode.USAGE, f"{given.name} is {name} {found}, not {package} {version}",
                           hint="give the wheel of that release")
    return given


def _header(hunk: Hunk) -> str:
    return f"@@ -{hunk.source_start},{len(hunk.old)} +{hunk.target_start},{len(hunk.new)} @@"


def _merge_file(fp: FilePatch, old: bytes | None, new: bytes | None, source: PatchSpec, from_version: str,
                labels: tuple[str, str, str]) -> PortedFile:
    """Merge one file of the patch; the hunks that meet a change of the new release are named."""
    relpath = str(fp.path)
    if fp.deletes:
        raise PatcherError(ExitCode.USAGE, f"patch {source.id} deletes {relpath}; port merges changes to files only",
                           hint="port that patch by hand")
    if old is None and not fp.creates:
        raise PatcherError(ExitCode.MISSING, f"{relpath} is not in {source.package} {from_version}, which "
                           f"{source.file} is taken to be written for", hint="pass --from with its release")
    try:
        ours, placements = apply_hunks(decode(old or b""), fp.hunks)
    except HunkConflict as conflict:
        raise PatcherError(ExitCode.CONFLICT, f"{source.file} does not apply to {relpath} of {source.package} "
                           f"{from_version}: {conflict.failure.reason}",
                           hint="pass --from with the release the patch was written for") from None
    action = "create" if fp.creates else "modify"
    if new is None and not fp.creates:
        sites = [HunkConflictSite(i + 1, _header(h), 0) for i, h in enumerate(fp.hunks)]
        return PortedFile(relpath, action, GONE, conflicts=sites)
    base, mine, theirs = split_lines(decode(old or b"")), split_lines(ours), split_lines(decode(new or b""))
    merged = merge(base, mine, theirs, labels)
    result = PortedFile(relpath, action, CLEAN if merged.clean else CONFLICTS, encode(merged.text), new)
    spans = [(p.line - 1, p.line - 1 + len(h.old)) for p, h in zip(placements, fp.hunks)]
    for conflict in merged.conflicts:
        start, end = conflict.region.base
        for index, (low, high) in enumerate(spans):
            if low <= end and start <= high:
                result.conflicts.append(HunkConflictSite(index + 1, _header(fp.hunks[index]), conflict.line))
    return result


_MARKERS = re.compile(r"^(<{7} |\|{7} |={7}$|>{7} )", re.MULTILINE)


def _take_resolved(ported: Ported, directory: Path) -> None:
    """--resolved DIR: the merged files as a person resolved them (DIR/RELPATH), instead of the merge."""
    for file in ported.files:
        if file.outcome == GONE:
            raise PatcherError(ExitCode.MISSING, f"{file.relpath} is not in {ported.package} {ported.to_version}",
                               hint="a patch to a file the new release no longer has is ported by hand")
        data = read_bytes(directory / safe_relative(file.relpath, "the patch"))
        if data is None:
            raise PatcherError(ExitCode.MISSING, f"--resolved {directory} has no {file.relpath}",
                               hint="pass the directory port wrote the merged files to, once they are resolved")
        marker = _MARKERS.search(decode(data))
        if marker:
            line = decode(data).count("\n", 0, marker.start()) + 1
            raise PatcherError(ExitCode.CONFLICT, f"{directory / file.relpath} still has a conflict marker at line "
                               f"{line}", hint="keep what each side needs and delete the marker lines, then port again")
        file.merged, file.outcome, file.conflicts = data, CLEAN, []
    ported.notes.append(f"merged files taken from {directory} (--resolved)")


def _check_result(ported: Ported, source: PatchSpec, new_files: dict[str, bytes | None]) -> None:
    """Compile each merged Python file and run the patch's probes on the merged files (a probe of
    a file the patch leaves alone reads the new release's file)."""
    merged = {f.relpath: f.merged for f in ported.files}
    for relpath, data in merged.items():
        if relpath.endswith(".py") and data is not None:
            try:
                compile(data, relpath, "exec", dont_inherit=True)
            except (SyntaxError, ValueError) as exc:
                ported.compile_error = f"{relpath}: {type(exc).__name__}: {exc}"
                return
    ported.probes = [run_probe(p, merged[p.file] if p.file in merged else new_files.get(p.file))
                     for p in source.probes]
    pristine = [run_probe(p, new_files.get(p.file)) for p in source.probes]
    if pristine and all(r.passed for r in pristine):
        ported.notes.append(f"every probe of {source.id} already passes on {source.package} {ported.to_version} as "
                            f"released: it may carry an equivalent fix (series key fixed-in = \">={ported.to_version}\")")


def variant_file_name(file: str, version: str) -> str:
    """FILE (a .patch name, a `.vX_Y` suffix dropped) with the suffix of VERSION: `x.v0_30.patch`."""
    stem = _VERSIONED.sub("", file[:-len(".patch")] if file.endswith(".patch") else file)
    release = list(Version(version).release)
    while len(release) > 2 and release[-1] == 0:
        release.pop()
    return f"{stem}.v{'_'.join(map(str, release))}.patch"


def _preamble(text: str) -> str:
    """The description before a patch's first file header (kept in the ported variant)."""
    lines = split_lines(text)
    for index, line in enumerate(lines):
        if line.startswith(("--- ", "diff --git ")):
            return "".join(lines[:index])
    return ""


def _variant_text(ported: Ported, source: PatchSpec) -> str:
    preamble = _preamble(source.text)
    note = (f"Ported by `ernie-patch port` from {source.file} ({source.package} {ported.from_version}) onto "
            f"{source.package} {ported.to_version} by a three-way merge.\n")
    diff = "".join(file_diff(f.relpath, f.new_pristine, f.merged) for f in ported.files)
    _check_round_trip(ported, diff, source)
    return (preamble.rstrip("\n") + "\n\n" if preamble.strip() else "") + note + diff


def _check_round_trip(ported: Ported, diff: str, source: PatchSpec) -> None:
    """The new diff, applied to the new release's files, gives the merged files byte for byte."""
    for fp in parse_patch(diff, source.module, 1, "the ported patch").files:
        done = next(f for f in ported.files if f.relpath == str(fp.path))
        text, _ = apply_hunks(decode(done.new_pristine or b""), fp.hunks)
        if encode(text) != done.merged:
            raise PatcherError(ExitCode.USAGE, f"the ported diff of {done.relpath} does not reproduce the merged file",
                               hint="the file mixes line endings the diff format cannot carry")


def _probe_table(probe) -> list[str]:
    lines = ["", "[[patch.probe]]", f"file = {toml_string(probe.file)}", f"kind = {toml_string(probe.kind)}"]
    for key in ("name", "within", "value"):
        if getattr(probe, key) is not None:
            lines.append(f"{key} = {toml_string(getattr(probe, key))}")
    if probe.params is not None:
        lines.append(f"params = [{', '.join(toml_string(p) for p in probe.params)}]")
    if probe.absent:
        lines.append("absent = true")
    return lines


def variant_entry(ported: Ported, source: PatchSpec, file: str) -> str:
    """The [[patch]] table of the ported variant: the source's keys and probes, range ==VERSION."""
    lines = [f"# {file}: ported by `ernie-patch port` from {source.file} ({source.package} {ported.from_version}); "
             "widen 'versions' once it is tested on more releases.",
             "[[patch]]", f"id = {toml_string(source.id)}", f"file = {toml_string(file)}",
             f"package = {toml_string(source.package)}", f"module = {toml_string(source.module)}",
             f"versions = {toml_string(ported.versions)}", "strip = 1"]
    if source.requires:
        lines.append(f"requires = [{', '.join(toml_string(r) for r in source.requires)}]")
    if source.summary:
        lines.append(f"summary = {toml_string(source.summary + f' ({source.package} {ported.to_version}, ported)')}")
    for probe in source.probes:
        lines += _probe_table(probe)
    return "\n".join(lines) + "\n"


def _write_variant(ported: Ported, source: PatchSpec, directory: Path) -> None:
    file = variant_file_name(source.file, ported.to_version)
    path = directory / file
    if path.exists():
        raise PatcherError(ExitCode.USAGE, f"{path} already exists",
                           hint="remove it (or the variant it holds) first, or port from another --patches DIR")
    safe_relative(file, "the ported variant's file name")
    add_to_series(path, _variant_text(ported, source), variant_entry(ported, source, file), source.id)
    ported.variant_file = path


def _write_scratch(ported: Ported, scratch: Path | None) -> None:
    """The merged files (conflict markers where a person must choose) under SCRATCH, and the error."""
    directory = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix=f"ernie-patch-port-{ported.id}-"))
    for file in ported.files:
        if file.merged is None:
            continue
        target = directory / safe_relative(file.relpath, "the patch")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PatcherError(ExitCode.ENVIRONMENT, f"cannot create {target.parent}: {exc.strerror}") from None
        atomic_write(target, file.merged)
        file.scratch = target
    ported.scratch_dir = directory
    ported.error = _stopped(ported)


def _stopped(ported: Ported) -> PatcherError:
    """Why no variant was written, first reason first, and what a person does next."""
    sites = [site.describe(f.relpath) for f in ported.files for site in f.conflicts if f.outcome == CONFLICTS]
    gone = [f"{f.relpath}: not in {ported.package} {ported.to_version} (hunks "
            f"{', '.join(f'#{c.hunk}' for c in f.conflicts)})" for f in ported.files if f.outcome == GONE]
    failing = [f"probe '{p.probe.describe()}' fails on the merged files: {p.detail}" for p in ported.probes
               if not p.passed]
    problems = sites + gone + ([f"merged file does not compile: {ported.compile_error}"] if ported.compile_error
                               else []) + failing
    where = f"merged files in {ported.scratch_dir}"
    if sites or gone:
        hunks = list(dict.fromkeys(f"#{c.hunk} of {f.relpath}" for f in ported.files if f.outcome != CLEAN
                                   for c in f.conflicts))
        reason = (f"{ported.id} does not merge cleanly onto {ported.package} {ported.to_version}: "
                  f"hunk{'s' if len(hunks) > 1 else ''} {', '.join(hunks)} meet{'' if len(hunks) > 1 else 's'} "
                  f"changes of the new release ({where})")
    else:
        reason = f"{ported.id} merges onto {ported.package} {ported.to_version}, but the result fails its checks ({where})"
    return PatcherError(ExitCode.CONFLICT, reason, details=problems,
                        hint=f"resolve the merged files in {ported.scratch_dir} (keep what each side needs, delete the "
                             "marker lines), then run the same port again with --resolved "
                             f"{ported.scratch_dir}")
