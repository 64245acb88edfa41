"""Whether the originals a manifest names are the installed release's files (its RECORD).

The manifest and the object store are only files in a directory; revert writes their bytes into
the package. A stored original is trusted only when its digest is the one the release's RECORD
lists for that path (a file apply created must be one the release does not ship). Where nothing
can be checked -- no RECORD, or RECORD without the file, as for editable installs -- the original
is used as recorded at apply, and the report says so.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..fs.fsops import read_target, sha256
from ..target.discovery import Environment, InstalledPackage, parse_record, record_form
from .revertable import original_problems, registration_problems
from .state import FileRecord, Manifest, StateDir, corrupt


def _appended_only(original: bytes, current: bytes, created: set[str]) -> bool:
    """Whether CURRENT is ORIGINAL plus RECORD rows of files apply created, and nothing else."""
    if not current.startswith(original):
        return False
    rest = current[len(original):]
    if original and not original.endswith(b"\n"):
        if not rest.startswith(b"\n"):
            return False
        rest = rest[1:]
    rows = parse_record(rest.decode("utf-8", "surrogateescape"))
    return bool(rows) and set(rows) <= created


def _release_record(package: InstalledPackage, entries: list[FileRecord], state: StateDir,
                    where: Path) -> dict[str, str | None] | None:
    """RECORD as the release shipped it (without the rows apply added); None when there is none."""
    if package.dist_info is None:
        return None
    current = read_target(package.dist_info / "RECORD", f"{package.dist_info.name}/RECORD")
    if current is None:
        return None
    register = next((e for e in entries if e.action == "register"), None)
    if register is None or register.before is None or sha256(current) != register.after:
        return parse_record(current.decode("utf-8", "surrogateescape"))
    original = state.fetch(register.before)
    if not _appended_only(original, current, {e.relpath for e in entries if e.action == "create"}):
        raise corrupt(where, f"stored original of {register.relpath} is not the {package.name} {package.version} "
                             "RECORD without the rows apply added")
    return parse_record(original.decode("utf-8", "surrogateescape"))


def _check_entry(entry: FileRecord, release: dict[str, str | None], package: InstalledPackage,
                 where: Path) -> bool:
    """Raise when ENTRY's original is not the release's file; False when there was nothing to check."""
    shipped = release.get(entry.relpath)
    release_name = f"{package.name} {package.version}"
    if entry.action == "create":
        if entry.relpath in release:
            raise corrupt(where, f"{entry.relpath} is recorded as created by apply, but the {release_name} "
                                 "release ships it (RECORD)")
        shipped = next((d for d in entry.dirs if any(r.startswith(d + "/") for r in release)), None)
        if shipped is not None:
            raise corrupt(where, f"directory {shipped} is recorded as created by apply, but the {release_name} "
                                 "release ships files in it (RECORD)")
        return True
    if shipped is None:
        return False
    if entry.before is None or record_form(entry.before) != shipped:
        found = entry.before[:12] if entry.before else "absent"
        raise corrupt(where, f"stored original of {entry.relpath} (sha256 {found}) is not the file the "
                             f"{release_name} release ships ({shipped})")
    return True


def check_originals(env: Environment, manifest: Manifest, state: StateDir, where: Path) -> list[str]:
    """Refuse (corrupt state WHERE) a manifest whose originals are not the installed release's files;
    return the relpaths that could not be checked. Entries of another version than the installed
    one (an upgrade since apply) are not compared: they are stale, and revert refuses to write
    over files that are not what apply wrote."""
    by_package: dict[str, list[FileRecord]] = defaultdict(list)
    for entry in manifest.files.values():
        by_package[entry.package].append(entry)
    unchecked: list[str] = []
    for name, entries in sorted(by_package.items()):
        package = env.package(name)
        if package is None:
            continue
        current = [e for e in entries if e.version == package.version and e.action != "register"]
        if not current:
            continue
        release = _release_record(package, entries, state, where)
        for entry in current:
            if release is None or not _check_entry(entry, release, package, where):
                unchecked.append(entry.relpath)
    return unchecked


def unchecked_note(relpaths: list[str]) -> str:
    return (f"stored originals not checked against a RECORD (none lists them, e.g. an editable install), "
            f"trusted as recorded at apply: {', '.join(relpaths)}")


def revert_problems(env: Environment, manifest: Manifest, state: StateDir) -> list[str]:
    """Why revert could not run, or `pip uninstall` would leave a file apply created behind: a stored
    original missing or damaged; a RECORD row apply added (for a created file still holding what
    apply wrote, of the installed version) missing or holding another digest (revertable)."""
    problems = original_problems([(e.relpath, e.before) for e in manifest.files.values() if e.before],
                                 state.stored_digest, str(state.objects))
    by_package: dict[str, list[FileRecord]] = defaultdict(list)
    for entry in manifest.files.values():
        by_package[entry.package].append(entry)
    for name, entries in sorted(by_package.items()):
        package = env.package(name)
        if package is None or package.dist_info is None or not any(
                e.action == "register" and e.version == package.version for e in entries):
            continue
        created = []
        for entry in entries:
            if entry.action == "create" and entry.after is not None and entry.version == package.version:
                current = read_target(package.import_root / entry.relpath, entry.relpath)
                if current is not None and sha256(current) == entry.after:
                    created.append((entry.relpath, record_form(entry.after)))
        record = read_target(package.dist_info / "RECORD", f"{package.dist_info.name}/RECORD")
        rows = parse_record(record.decode("utf-8", "surrogateescape")) if record is not None else {}
        problems += registration_problems(str(package.dist_info / "RECORD"), name, rows, created)
    return problems
