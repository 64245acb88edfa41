"""`ernie-patch diff ID`: find one patch of a patch set and describe it; rendering is the CLI's job."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PatcherError
from .diffparse import parse_patch
from .series import PatchSpec, Series, load_series


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
    other_variants: tuple[str, ...] = ()

    def header(self) -> str:
        """One line naming the patch: id, package and range, strip level, file."""
        strip = "-" if self.strip is None else f"{self.strip}{' (inferred)' if self.strip_inferred else ''}"
        return f"{self.id}: {self.package} {self.versions}, strip {strip}, {self.file}"

    def to_dict(self) -> dict:
        return {"id": self.id, "file": self.file.name, "package": self.package, "versions": self.versions,
                "summary": self.summary, "strip": self.strip, "strip_inferred": self.strip_inferred,
                "paths": list(self.paths), "other_variants": list(self.other_variants), "text": self.text}


def _find(series: Series, wanted: str) -> tuple[PatchSpec, tuple[PatchSpec, ...]]:
    """WANTED is a patch id (its first variant) or a patch file name (that variant)."""
    by_file = [p for p in series.patches if p.file == wanted]
    spec = by_file[0] if by_file else series.get(wanted)
    return spec, tuple(v for v in series.variants(spec.id) if v is not spec)


def show_patch(patch_id: str, patches: Path | None = None) -> PatchView:
    """The patch PATCH_ID (or the variant in file PATCH_ID) of the set in PATCHES (default: built-in).

    A diff that does not parse is still returned, with the reason in `problem`, so it can be read.
    """
    series = load_series(patches)
    spec, others = _find(series, patch_id)
    other_variants = tuple(f"{v.file} ({v.tested})" for v in others)
    text = spec.text
    where = f"patch {spec.id} ({spec.file})"
    try:
        parsed = parse_patch(text, spec.module, spec.strip, where)
    except PatcherError as problem:
        return PatchView(spec.id, spec.path, spec.package, spec.tested, spec.summary, text,
                         spec.strip, False, (), problem, other_variants)
    paths = tuple(str(f.path) for f in parsed.files)
    return PatchView(spec.id, spec.path, spec.package, spec.tested, spec.summary, text,
                     parsed.strip, parsed.strip_inferred, paths, None, other_variants)
