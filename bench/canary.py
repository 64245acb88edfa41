#!/usr/bin/env python3
"""The canary: does the patch set fit the newest releases on the index?

For the newest final release of each package of the set on the index, and each NAME==VERSION
given (`make canary VERSIONS="vllm-omni==0.28.0 diffusers==0.39.0"`), a tree gets that release and
the releases of the set's other packages it pins (its Requires-Dist: vllm-omni 0.30.0 brings
diffusers 0.40.0), installed from the real wheels with `pip install --no-deps --target`. There
`ernie-patch apply --dry-run --allow-untested --json` plans every patch of the installed packages
as a user's apply would, and bench/RELEASES.md gets one row per release and patch: exact, offset
(lines), conflict (with the hunk), missing file, or upstream (fixed-in, or its probes already pass
on the release); and whether the probes pass on the planned bytes (apply refuses a plan whose
patched files do not compile or whose probes fail, so a patch that plans cleanly alone has them
passing). It exits 1 when a release has a patch that does not fit, so a scheduled CI job can open
the work (`ernie-patch port ID --to VERSION` is the next step); 2 on a usage error.

    python bench/canary.py [--patches DIR] [--out bench/RELEASES.md] [NAME==VERSION ...]

Needs the package index (wheels are cached under ~/.cache/ernie-patcher/wheels); not part of `make test`.
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
from email.parser import Parser
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.version_matrix import CACHE, _pip, index_versions, load_or_say_why, wheel  # noqa: E402
from ernie_patcher.patchset.diffparse import parse_patch  # noqa: E402
from ernie_patcher.patchset.series import Series  # noqa: E402

TREES = CACHE / "canary"
FITTING = ("exact", "offset", "upstream")


@dataclass
class Row:
    """One patch on one release."""

    patch: str
    variant: str
    tested: str
    untested: bool
    fit: str
    detail: str = ""
    probes: str = ""

    @property
    def ok(self) -> bool:
        return self.fit.split(" ")[0] in FITTING and self.probes in ("pass", "")


@dataclass
class Release:
    """One release the canary checked: the tree's packages, the verdict per patch."""

    package: str
    version: str
    stack: list[tuple[str, str]]
    rows: list[Row] = field(default_factory=list)


def _release_arg(text: str) -> tuple[str, str]:
    name, sep, version = text.partition("==")
    if not sep or not name or not version:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME==VERSION, e.g. vllm-omni==0.28.0")
    return str(canonicalize_name(name)), version


def pinned(package: str, version: str, others: set[str]) -> list[tuple[str, str]]:
    """The releases of OTHERS (packages of the set) that PACKAGE VERSION requires: the newest final
    release on the index its Requires-Dist allows (an exact pin is that release)."""
    with zipfile.ZipFile(wheel(package, version)) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        headers = Parser().parsestr(archive.read(metadata).decode("utf-8"))
    found = []
    for line in headers.get_all("Requires-Dist") or []:
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        name = str(canonicalize_name(requirement.name))
        if name not in others or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        allowed = [v for v in index_versions(name) if requirement.specifier.contains(v)]
        if not allowed:
            raise SystemExit(f"{package} {version} requires {line}: the index has no such release")
        found.append((name, str(max(allowed))))
    return found


def tree(stack: list[tuple[str, str]]) -> Path:
    """A cached `pip install --no-deps --target` tree of STACK's real wheels (dry runs write nothing)."""
    path = TREES / "+".join(f"{n}-{v}" for n, v in stack)
    if not (path / ".complete").exists():
        shutil.rmtree(path, ignore_errors=True)
        done = _pip("install", "--no-deps", "--no-compile", "-q", "--target", str(path),
                    *[str(wheel(n, v)) for n, v in stack])
        if done.returncode != 0:
            raise SystemExit(f"pip install --target {path} failed: {done.stderr.strip()[-300:]}")
        (path / ".complete").write_text("ok\n")
    return path


def dry_run(site: Path, patches: Path, ids: list[str]) -> dict:
    """`ernie-patch apply --dry-run --allow-untested --json` of IDS on SITE: its document."""
    command = [sys.executable, "-m", "ernie_patcher", "apply", "--dry-run", "--allow-untested", "--json",
               "--site", str(site), "--patches", str(patches), *[a for i in ids for a in ("--only", i)]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise SystemExit(f"ernie-patch apply --dry-run on {site} printed no JSON (exit {done.returncode}): "
                         f"{done.stderr.strip()[-300:]}") from None


def _hunk(series: Series, variant: str, reason: str) -> str:
    """The hunk a conflict reason names (`PATH: hunk #N does not match ...`) with its header."""
    match = re.search(r"([^\s:]+): hunk #(\d+) ", reason)
    if not match:
        return ""
    spec = next(p for p in series.patches if p.file == variant)
    for file in parse_patch(spec.text, spec.module, spec.strip, spec.file).files:
        if match.group(1).endswith("/" + str(file.path)):
            hunk = file.hunks[int(match.group(2)) - 1]
            return (f"hunk #{match.group(2)} `@@ -{hunk.source_start},{len(hunk.old)} "
                    f"+{hunk.target_start},{len(hunk.new)} @@` of {file.path.name}")
    return ""


def _fit(series: Series, patch: dict, site: Path) -> tuple[str, str]:
    """(fit, detail) of one patch of the dry run's document."""
    reason = patch["reason"].replace(f"{site}/", "")
    if patch["state"] == "upstream":
        return ("upstream" if "fixed-in" in reason else "upstream (inferred)"), reason
    if patch["state"] == "not-applied":
        offsets = [o for f in patch["files"] for o in f["offsets"] if o]
        return ("offset " + ",".join(f"{o:+d}" for o in offsets) if offsets else "exact"), ""
    if patch["state"] in ("conflict", "drifted"):
        hunk = _hunk(series, patch["file"], patch["reason"])
        return (f"conflict: {hunk}" if hunk else "conflict"), reason
    return patch["state"], reason


def _probes(document: dict, row: Row, site: Path, patches: Path) -> str:
    """Whether ROW's probes pass on the planned bytes: the whole plan was built and checked, or a plan
    of this patch (and what it requires) alone is."""
    if row.fit.split(" ")[0] not in ("exact", "offset"):
        return ""
    if document["exit_code"] == 0:
        return "pass"
    alone = dry_run(site, patches, [row.patch])
    if alone["exit_code"] == 0:
        return "pass"
    reason = alone["error"]["reason"] if alone["error"] else ""
    if "probe" in reason or "would not compile" in reason:
        return "FAIL: " + reason.replace(f"{site}/", "")
    return "not checked: " + reason.replace(f"{site}/", "")


def check(series: Series, patches: Path, package: str, version: str) -> Release:
    others = {p.package for p in series.patches} - {package}
    stack = [(package, version)] + pinned(package, version, others)
    site = tree(stack)
    installed = {name for name, _ in stack}
    ids = [i for i in series.ids if series.get(i).package in installed]
    document = dry_run(site, patches, ids)
    release = Release(package, version, stack)
    for patch in document["patches"]:
        fit, detail = _fit(series, patch, site)
        row = Row(patch["id"], patch["file"], patch["versions"], patch["untested"], fit, detail)
        row.probes = _probes(document, row, site, patches)
        release.rows.append(row)
    if not document["patches"] and document["error"]:
        raise SystemExit(f"{package} {version}: {document['error']['reason']}")
    return release


def markdown(series: Series, releases: list[Release], elapsed: float) -> str:
    lines = [f"# Canary: the patch set `{series.name}` on the newest releases", "",
             f"Produced by `make canary` (`python bench/canary.py`) on {time.strftime('%Y-%m-%d', time.gmtime())}: "
             "each release below, installed with the releases of the set's other packages it pins "
             "(`pip install --no-deps --target`, real wheels), planned with `ernie-patch apply --dry-run "
             "--allow-untested --json`. Fit: exact / offset (lines) / conflict (with the hunk) / missing / "
             "upstream (the release carries the fix). Probes: whether the patch's probes pass on the planned "
             "bytes. ✅ a patch that fits; ❌ one that needs work (`ernie-patch port ID --to VERSION`).", "",
             "| release | installed with | patch | variant (tested range) | fit | probes on the planned bytes |",
             "|---|---|---|---|---|---|"]
    notes = []
    for release in releases:
        stack = ", ".join(f"{n} {v}" for n, v in release.stack[1:]) or "-"
        for row in release.rows:
            untested = " — **outside the tested range**" if row.untested else ""
            mark = "✅" if row.ok else "❌"
            lines.append(f"| {release.package} {release.version} | {stack} | {mark} `{row.patch}` | "
                         f"`{row.variant}` (`{row.tested}`){untested} | {row.fit} | {row.probes or '-'} |")
            if row.detail:
                notes.append(f"- `{row.patch}` on {release.package} {release.version}: {row.detail}")
    if notes:
        lines += ["", "## Details", ""] + notes
    failing = sum(not r.ok for release in releases for r in release.rows)
    lines += ["", f"_{len(releases)} release(s), {sum(len(r.rows) for r in releases)} patch plans, "
              f"{failing} not fitting, in {elapsed:.0f} s._"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("releases", nargs="*", type=_release_arg, metavar="NAME==VERSION",
                        help="releases to check besides the newest of each package")
    parser.add_argument("--patches", type=Path, help="patch set directory (default: the built-in set)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RELEASES.md", help="Markdown file to write")
    args = parser.parse_args(argv)
    started = time.monotonic()
    series = load_or_say_why(args.patches)
    if series is None:
        return 2
    packages = sorted({str(canonicalize_name(p.package)) for p in series.patches})
    unknown = sorted({name for name, _ in args.releases} - set(packages))
    if unknown:
        print(f"error: {', '.join(unknown)} is not a package of the patch set ({', '.join(packages)})",
              file=sys.stderr)
        return 2
    wanted = list(dict.fromkeys([(p, str(index_versions(p)[-1])) for p in packages] + args.releases))
    print("canary: " + ", ".join(f"{n} {v}" for n, v in wanted), file=sys.stderr)
    releases = [check(series, series.directory, name, version) for name, version in wanted]
    text = markdown(series, releases, time.monotonic() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 1 if any(not row.ok for release in releases for row in release.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
