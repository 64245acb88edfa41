#!/usr/bin/env python3
"""The version matrix: does each patch of a set fit each published release of its package?

For every release of diffusers 0.38.0 ... 0.42.1 and vllm-omni 0.20.0 ... 0.30.0 that exists on
the index (`pip index versions`), the real wheel is downloaded once (`pip download --no-deps`,
cached under ~/.cache/ernie-patcher/wheels) and unpacked; then, with the engine's own code and no
subprocess, each patch is planned in series order as `apply` would (exact / offset / conflict /
missing file), every patched Python file is compiled, and the patch's AST probes are run on the
patched files (they must pass) and on the pristine release (they must fail). Each versioned variant
of a patch (entries sharing an id) gets its own row, all assessed against the same files; the next
patch is planned on top of the variant that `apply` would use.

The vllm-omni table also gets a numerics row per release: what the sequence-parallel tier last
measured on that release's own stack (`make test-sp-matrix`, or `make test-sp-X.Y.Z` for one),
read from the results files the tier writes under ~/.cache/ernie-patcher/sp-results.

    python bench/version_matrix.py [--patches DIR] [--out bench/MATRIX.md]

Needs network access to the package index the first time; not part of `make test`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ernie_patcher.core.assess import APPLIED, CONFLICT, DRIFTED, MISSING, NOT_APPLIED, Assessor  # noqa: E402
from ernie_patcher.target.discovery import discover  # noqa: E402
from ernie_patcher.errors import PatcherError  # noqa: E402
from ernie_patcher.fs.fsops import read_bytes  # noqa: E402
from ernie_patcher.patchset.probes import run_probe  # noqa: E402
from ernie_patcher.patchset.series import PatchSpec, Series, load_series  # noqa: E402

CACHE = Path(os.environ.get("ERNIE_PATCHER_CACHE", Path.home() / ".cache" / "ernie-patcher"))
WHEELS = CACHE / "wheels"
UNPACKED = CACHE / "matrix"
SP_RESULTS = CACHE / "sp-results"
RANGES = {"diffusers": ("0.38.0", "0.42.1"), "vllm-omni": ("0.20.0", "0.30.0")}


@dataclass
class Cell:
    """One patch against one release."""

    fit: str
    offsets: list[int] = field(default_factory=list)
    compiles: bool | None = None
    probes_patched: tuple[int, int] = (0, 0)
    probes_pristine: tuple[int, int] = (0, 0)
    detail: str = ""

    @property
    def ok(self) -> bool:
        passed, total = self.probes_patched
        return self.fit in ("exact", "offset") and bool(self.compiles) and passed == total

    def text(self) -> str:
        if self.fit not in ("exact", "offset"):
            return self.fit
        fit = self.fit if self.fit == "exact" else "offset " + ",".join(f"{o:+d}" for o in self.offsets if o)
        compiled = "compiles" if self.compiles else "**does not compile**"
        passed, total = self.probes_patched
        probes = f"probes {passed}/{total}" if total else "no probes"
        if total and passed != total:
            probes = f"**{probes}**"
        return f"{fit}; {compiled}; {probes}"


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=900)


def index_versions(package: str) -> list[Version]:
    """Every final release of PACKAGE the index has (`pip index versions`), oldest first."""
    done = _pip("index", "versions", package)
    match = re.search(r"^Available versions: (.+)$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or not match:
        raise SystemExit(f"pip index versions {package} failed: {done.stderr.strip()[-300:]}")
    return sorted(v for v in (Version(v.strip()) for v in match.group(1).split(",")) if not v.is_prerelease)


def released_versions(package: str, low: str, high: str) -> list[str]:
    """Final releases of PACKAGE in [LOW, HIGH] that the index really has."""
    return [str(v) for v in index_versions(package) if Version(low) <= v <= Version(high)]


def wheel(package: str, version: str) -> Path:
    """The real wheel of PACKAGE==VERSION, downloaded once (no dependencies) into the cache."""
    pattern = f"{package.replace('-', '_').lower()}-{version}-*.whl"
    found = sorted(WHEELS.glob(pattern))
    if not found:
        WHEELS.mkdir(parents=True, exist_ok=True)
        done = _pip("download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(WHEELS), f"{package}=={version}")
        found = sorted(WHEELS.glob(pattern))
        if done.returncode != 0 or not found:
            raise SystemExit(f"pip download {package}=={version} failed: {done.stderr.strip()[-300:]}")
    return found[0]


def unpacked(package: str, version: str) -> Path:
    """The wheel unpacked as `pip install --target` would lay it out (dist-info included)."""
    tree = UNPACKED / f"{package}-{version}"
    if not (tree / ".complete").exists():
        shutil.rmtree(tree, ignore_errors=True)
        with zipfile.ZipFile(wheel(package, version)) as archive:
            archive.extractall(tree)
        (tree / ".complete").write_text("ok\n")
    return tree


def _fit(state) -> tuple[str, str]:
    if state.state == NOT_APPLIED:
        return state.fit or "exact", ""
    if state.state == MISSING:
        return "missing file", state.reason
    if state.state == CONFLICT:
        return "conflict", state.reason
    if state.state == DRIFTED:
        return "conflict", state.reason
    if state.state == APPLIED:
        return "already in release", ""
    return state.state, state.reason


def assess_release(series: Series, package: str, version: str) -> dict[str, Cell]:
    """Plan every patch of PACKAGE in series order against the unpacked release, as apply would."""
    site = unpacked(package, version)
    specs = [p for p in series.patches if p.package == package]
    env = discover([(p.package, p.module) for p in specs], site=site)
    installed = env.package(package)
    if installed is None or installed.version != version:
        raise SystemExit(f"{site} does not hold {package} {version}")
    assessor = Assessor(env, None, allow_untested=True)
    cells: dict[str, Cell] = {}
    for patch_id in dict.fromkeys(s.id for s in specs):
        before = assessor.checkpoint()
        used = None
        for spec in [s for s in specs if s.id == patch_id]:
            assessor.rollback(before)
            cells[spec.file] = _cell(assessor, spec, installed.import_root, site)
            if used is None and cells[spec.file].ok or spec.covers(version):
                used = assessor.checkpoint()  # the variant apply would use: the one covering the version
        assessor.rollback(used or before)
    return cells


def _cell(assessor: Assessor, spec: PatchSpec, root: Path, site: Path) -> Cell:
    try:
        state = assessor.assess(spec)
    except PatcherError as error:
        return Cell("error", detail=error.reason)
    fit, detail = _fit(state)
    cell = Cell(fit, offsets=[o for f in state.files for o in f.offsets], detail=detail.replace(f"{site}/", ""))
    if fit in ("exact", "offset"):
        cell.compiles = _compiles(state)
        cell.probes_patched = _probes(spec, root, assessor.working)
        cell.probes_pristine = _probes(spec, root, {})
    return cell


def _compiles(state) -> bool:
    for file in state.files:
        if file.patched is not None and file.relpath.endswith(".py"):
            try:
                compile(file.patched, file.relpath, "exec", dont_inherit=True)
            except (SyntaxError, ValueError):
                return False
    return True


def _probes(spec: PatchSpec, root: Path, working: dict[Path, bytes | None]) -> tuple[int, int]:
    passed = 0
    for probe in spec.probes:
        path = root / probe.file
        source = working[path] if path in working else read_bytes(path)
        passed += run_probe(probe, source).passed
    return passed, len(spec.probes)


NOT_MEASURED = "not measured"


def recorded_sp_cells(matrix: Path) -> dict[str, str]:
    """The SP numerics cells MATRIX (an earlier output) holds, by vllm-omni release; {} without one."""
    try:
        text = matrix.read_text(encoding="utf-8")
    except OSError:
        return {}
    section = text.split("## vllm-omni", 1)[1] if "## vllm-omni" in text else ""
    header = next((line for line in section.splitlines() if line.startswith("| patch | declared |")), None)
    row = next((line for line in section.splitlines() if line.startswith("| SP numerics")), None)
    if header is None or row is None:
        return {}
    versions = [cell.strip() for cell in header.strip().strip("|").split("|")][2:]
    cells = [cell.strip() for cell in row.strip().strip("|").split("|")][2:]
    return {v: c for v, c in zip(versions, cells) if c and c != NOT_MEASURED}


def sp_numerics(version: str, recorded: dict[str, str] | None = None) -> str:
    """One release's SP tier figures, from its results file; without one, the cell RECORDED (the matrix
    written before) has for it, so a machine that has not run the SP tier never rewrites a measured
    cell as 'not measured'; 'not measured' when neither has one."""
    path = SP_RESULTS / f"vllm-omni-{version}.json"
    if not path.is_file():
        return (recorded or {}).get(version, NOT_MEASURED)
    record = json.loads(path.read_text(encoding="utf-8"))
    figures = record["figures"]
    outcomes = record["outcomes"]
    verdict = "✅ " if record["failed"] == 0 and outcomes["passed"] else "❌ "
    counted = f"{outcomes['passed']} passed, {outcomes['failed']} failed, {outcomes['skipped']} skipped"
    parts = [f"{counted} (vllm {record['stack']['vllm']}, diffusers {record['stack']['diffusers']})"]
    runs = [("SP=2", "patched-sp2"), ("SP=4", "patched-sp4"), ("CFG2×SP2", "patched-cfg2-sp2")]
    measured = [f"{label} {figures[key]:.1g}" for label, key in runs if key in figures]
    if measured:
        parts.append("fp32 max abs diff vs one device: " + ", ".join(measured))
    bf16 = [f"{label} {figures[key]:.1g}" for label, key in
            [("SP=2", "npu-bf16-patched-sp2-relative"), ("SP=4", "npu-bf16-patched-sp4-relative")] if key in figures]
    if bf16:
        parts.append("bf16 through the NPU attention backend, relative diff vs one device: " + ", ".join(bf16))
    if "npu-bf16-vs-fp32-patched-sp1-relative" in figures:
        parts.append(f"bf16 vs fp32 {figures['npu-bf16-vs-fp32-patched-sp1-relative']:.2g}")
    if "cache-dit-sp2" in figures:
        parts.append(f"cache-dit SP=2 vs SP=1 {figures['cache-dit-sp2']:.1g}")
    else:
        parts.append("no cache-dit adapter")
    return verdict + "; ".join(parts) + f" ({record['measured']})"


def markdown(series: Series, results: dict[str, dict[str, dict[str, Cell]]], elapsed: float,
             recorded: dict[str, str] | None = None) -> str:
    lines = [f"# Version matrix of the patch set `{series.name}`", "",
             "Produced by `python bench/version_matrix.py` from the real wheels (`pip download --no-deps`) of "
             "every final release in range that the index has. Per patch and release: how the hunks fit "
             "(exact / offset ±lines / conflict / missing file), whether every patched Python file compiles, "
             "and how many of the patch's AST probes pass on the patched result. ✅ marks a release the "
             "patch fully supports; the declared range is in the second column. Versioned variants of one patch "
             "(entries sharing an id) have a row each; `apply` uses the one whose range covers the installed "
             "release, so a variant that does not fit outside its own range is expected.", ""]
    notes: list[str] = []
    for package, by_version in results.items():
        versions = list(by_version)
        specs = [p for p in series.patches if p.package == package]
        lines += [f"## {package}", "", "| patch | declared | " + " | ".join(versions) + " |",
                  "|---|---|" + "---|" * len(versions)]
        for spec in specs:
            row = []
            label = f"`{spec.id}`" + (f" (`{spec.file}`)" if len(series.variants(spec.id)) > 1 else "")
            for version in versions:
                cell = by_version[version][spec.file]
                row.append(("✅ " if cell.ok else "") + cell.text())
                if cell.detail and not cell.ok:
                    notes.append(f"- {label} on {package} {version}: {cell.detail}")
                failing_pristine = cell.probes_pristine[0]
                if cell.ok and failing_pristine:
                    notes.append(f"- {label} on {package} {version}: {failing_pristine} probe(s) already "
                                 "pass on the pristine release (a probe that cannot fail)")
            lines.append(f"| {label} | `{spec.tested}` | " + " | ".join(row) + " |")
        if package == "vllm-omni":
            lines.append("| SP numerics (`make test-sp-matrix`) | fp32 ≤ 1e-5; bf16 ≤ 2u = 7.8e-3 | "
                         + " | ".join(sp_numerics(v, recorded) for v in versions) + " |")
        lines.append("")
    if notes:
        lines += ["## Why a cell is not ✅", ""] + notes + [""]
    lines.append(f"_{sum(len(v) for v in results.values())} releases checked in {elapsed:.0f} s._")
    return "\n".join(lines) + "\n"


def load_or_say_why(patches: Path | None) -> Series | None:
    """The patch set PATCHES (default: the built-in one), or None after saying on stderr why it does not load."""
    try:
        return load_series(patches)
    except PatcherError as error:
        print(f"error: {error.reason}" + (f"\n  try: {error.hint}" if error.hint else ""), file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=Path, help="patch set directory (default: the built-in set)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "MATRIX.md", help="Markdown file to write")
    args = parser.parse_args(argv)
    started = time.monotonic()
    series = load_or_say_why(args.patches)
    if series is None:
        return 2
    results: dict[str, dict[str, dict[str, Cell]]] = {}
    for package in sorted({p.package for p in series.patches}):
        if package not in RANGES:
            continue
        versions = released_versions(package, *RANGES[package])
        print(f"{package}: {', '.join(versions)}", file=sys.stderr)
        results[package] = {v: assess_release(series, package, v) for v in versions}
    text = markdown(series, results, time.monotonic() - started, recorded_sp_cells(args.out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
