"""`ernie-patch diff ID`: find one patch of a patch set and describe it; rendering is the CLI's job."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .diffparse import parse_patch
from .errors import PatcherError
from .series import load_series


@dataclass(frozen=True)
class PatchView:
    """One patch as the series file declares it, its diff text, and the paths it changes."""

    id: str
    file: Path
    package: str
    versions: str
    summary: str
    text: str
    strip: int | None
    strip_inferred: bool
    paths: tuple[str, ...]
    problem: PatcherError | None = None

    def header(self) -> str:
        """One line naming the patch: id, package and range, strip level, file."""
        strip = "-" if self.strip is None else f"{self.strip}{' (inferred)' if self.strip_inferred else ''}"
        return f"{self.id}: {self.package} {self.versions}, strip {strip}, {self.file}"


def show_patch(patch_id: str, patches: Path | None = None) -> PatchView:
    """The patch PATCH_ID of the set in PATCHES (default: the built-in set).

    A diff that does not parse is still returned, with the reason in `problem`, so it can be read.
    """
    series = load_series(patches)
    spec = series.get(patch_id)
    text = spec.text
    where = f"patch {spec.id} ({spec.file})"
    try:
        parsed = parse_patch(text, spec.module, spec.strip, where)
    except PatcherError as problem:
        return PatchView(spec.id, spec.path, spec.package, spec.tested, spec.summary, text,
                         spec.strip, False, (), problem)
    paths = tuple(str(f.path) for f in parsed.files)
    return PatchView(spec.id, spec.path, spec.package, spec.tested, spec.summary, text,
                     parsed.strip, parsed.strip_inferred, paths)
