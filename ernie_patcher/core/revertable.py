"""Whether `revert` can still run, and `pip uninstall` still removes what apply created: what
`verify` proves beside the patches being in place.

Revert writes back the stored originals (objects/<sha256>): each one the manifest names must be
there with its digest, else the file can never be restored. Apply registered every file it
created in its package's RECORD: each such row must still be there holding the file's digest,
else `pip uninstall` leaves the file behind. Checked on data the caller reads (the engine
through state.py and discovery, the fast path through its own light readers), so one rule set
serves both; importing nothing, for the fast path.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable


def original_problems(befores: Iterable[tuple[str, str]], stored: Callable[[str], str | None],
                      objects: str) -> list[str]:
    """For each (relpath, sha256 of its stored original) of BEFORES, why the original cannot be
    restored: STORED(digest) gives the sha256 of the bytes stored under DIGEST in the directory
    OBJECTS, None when there are none."""
    problems = []
    for relpath, digest in sorted(set(befores)):
        found = stored(digest)
        if found is None:
            problems.append(f"the stored original of {relpath} ({objects}/{digest}) is missing: "
                            "revert could not restore the file")
        elif found != digest:
            problems.append(f"the stored original of {relpath} ({objects}/{digest}) is damaged (its sha256 is "
                            f"{found[:12]}): revert could not restore the file")
    return problems


def registration_problems(record: str, package: str, rows: dict[str, str | None],
                          created: Iterable[tuple[str, str]]) -> list[str]:
    """For each (relpath, RECORD digest) of a file apply created and registered in RECORD (whose
    rows are ROWS: path -> digest), why the row is not there as apply wrote it."""
    problems = []
    for relpath, digest in sorted(created):
        row = rows.get(relpath, "") if relpath in rows else None
        if row is None:
            problems.append(f"{record} no longer lists {relpath}, which apply created and registered: "
                            f"`pip uninstall {package}` would leave it behind")
        elif row != digest:
            problems.append(f"{record} lists {relpath} with {row or 'no digest'}, not the digest of the file "
                            f"apply created ({digest}): `pip uninstall {package}` would not check it")
    return problems


def hint(problems: list[str]) -> str:
    if any("stored original" in p for p in problems):
        return ("the state directory lost what revert needs: reinstall the package for pristine files; "
                "`ernie-patch revert` then drops the state")
    return "`ernie-patch revert`, then `ernie-patch apply`, registers the created files again"
