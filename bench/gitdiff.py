"""Release diffs as git writes them: time and peak memory of `ernie-patch apply`, `verify` and `revert`
beside `git apply` + `python -m compileall` and GNU `patch` + compileall, in one run.

* release: the whole `git diff --no-index --binary` of the real vllm-omni 0.20.0 and 0.30.0 wheels'
  `vllm_omni/` (1 641 files: new subpackages with empty __init__.py, deleted ones, renames, binary
  assets), applied to a `pip install --no-deps --target` of 0.20.0. The reference tools' time is
  their own plus compileall of the .py files the diff writes (what apply's compile check and fresh
  bytecode cost them); GNU patch cannot apply git's binary patches and skips those 5 files.
* big: one patch set rewriting 100 generated modules (64 MB of diff), status/apply/verify/revert.
* chained: 1 000 patches chained on one module, each with a probe: apply and verify --reparse.

Each command is a new process under GNU time (wall, user + system CPU of it and its children, peak
RSS of the largest). Ratios are to the reference tools in the same run: the machine's load varies
between runs. Writes bench/results/gitdiff.txt and prints it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from largediff import ROOT, _wheel, timed  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gitdiff.txt"
RELEASE = ("vllm-omni", "vllm_omni", "0.20.0", "0.30.0")


def _extract(wheel: Path, dest: Path, module: str) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if member.filename.startswith(f"{module}/"):
                archive.extract(member, dest)


def _series(directory: Path, entries: list[tuple[str, str, str, str, list[str]]]) -> None:
    text = 'schema = 1\nname = "bench"\n'
    for patch_id, package, module, version, probes in entries:
        text += (f'\n[[patch]]\nid = "{patch_id}"\nfile = "{patch_id}.patch"\npackage = "{package}"\n'
                 f'module = "{module}"\nversions = "=={version}"\n')
        text += "".join(f'\n[[patch.probe]]\nfile = "{module}/{p.split(":")[0]}"\nkind = "string"\n'
                        f'value = "{p.split(":")[1]}"\n' for p in probes)
    (directory / "series.toml").write_text(text)


def release_case(work: Path) -> tuple[Path, Path, Path, list[str]]:
    """The older release installed, the patch set of the whole git diff, and the .py files it writes."""
    name, module, old, new = RELEASE
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target",
                    str(site), str(_wheel(module, old))], check=True)
    for label, version in (("a", old), ("b", new)):
        _extract(_wheel(module, version), work / label, module)
    patches = work / "set"
    patches.mkdir()
    diff = subprocess.run(["git", "diff", "--no-index", "--binary", f"a/{module}", f"b/{module}"], cwd=work,
                          capture_output=True).stdout
    (patches / "upgrade.patch").write_bytes(diff)
    _series(patches, [("upgrade", name, module, old, [])])
    touched = []
    for path in (work / "b" / module).rglob("*.py"):
        before = work / "a" / path.relative_to(work / "b")
        if not before.exists() or before.read_bytes() != path.read_bytes():
            touched.append(str(path.relative_to(work / "b")))
    return site, patches, patches / "upgrade.patch", sorted(touched)


def _reference(tool: list[str], site: Path, touched: list[str], tool_root: Path) -> tuple[float, float, float]:
    """TOOL run in a copy of SITE, then compileall of the TOUCHED files there: summed wall and CPU, max RSS."""
    applied = timed(tool, tool_root, cwd=site, check=False)
    listing = site / "touched.txt"
    listing.write_text("".join(f"{site / t}\n" for t in touched if (site / t).exists()))
    compiled = timed([sys.executable, "-m", "compileall", "-q", "-i", str(listing)], tool_root)
    return applied[0] + compiled[0], applied[1] + compiled[1], max(applied[2], compiled[2])


def _median(samples: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    return tuple(sorted(column)[len(column) // 2] for column in zip(*samples))  # type: ignore[return-value]


def compare_release(work: Path, rows: list[str], tool_root: Path, rounds: int = 3) -> None:
    """ROUNDS rounds, each on fresh copies, the tools interleaved; medians (the load of a shared
    machine moves any one figure by half)."""
    pristine, patches, patch_file, touched = release_case(work)
    size = patch_file.stat().st_size / 2**20
    tool = [sys.executable, "-m", "ernie_patcher"]
    samples: dict[str, list[tuple[float, float, float]]] = {}
    for number in range(rounds):
        site, git_site, gnu_site = (work / f"{name}-{number}" for name in ("site", "git", "gnu"))
        for copy in (site, git_site, gnu_site):
            shutil.copytree(pristine, copy, symlinks=True)
        steps = {
            "git apply + compileall": lambda: _reference(["git", "apply", "-p2", "--unsafe-paths", str(patch_file)],
                                                         git_site, touched, tool_root),
            "ernie-patch apply": lambda: timed([*tool, "apply", "--site", str(site), "--patches", str(patches)],
                                               tool_root),
            "GNU patch + compileall": lambda: _reference(["patch", "-p2", "--batch", "--silent", "-i",
                                                          str(patch_file)], gnu_site, touched, tool_root),
            "ernie-patch verify": lambda: timed([*tool, "verify", "--site", str(site), "--patches", str(patches)],
                                                tool_root),
            "ernie-patch revert": lambda: timed([*tool, "revert", "--site", str(site)], tool_root),
            "ernie-patch verify, reverted": lambda: timed([*tool, "verify", "--site", str(site), "--patches",
                                                           str(patches)], tool_root, check=False),
        }
        for name, step in steps.items():
            samples.setdefault(name, []).append(step())
        for copy in (site, git_site, gnu_site):
            shutil.rmtree(copy)
    results = {name: _median(values) for name, values in samples.items()}
    git = results["git apply + compileall"]
    rows.append(f"vllm-omni 0.20.0 -> 0.30.0, git diff --binary: {patch_file.read_bytes().count(b'diff --git ')} files, "
                f"patch {size:.1f} MB, {len(touched)} modules written; medians of {rounds} interleaved rounds")
    for name in ("ernie-patch apply", "ernie-patch verify", "ernie-patch revert", "ernie-patch verify, reverted",
                 "git apply + compileall", "GNU patch + compileall"):
        wall, cpu, rss = results[name]
        versus = (f"{wall / git[0]:.2f}x git apply + compileall, peak {rss / size:.1f}x the patch"
                  if name.startswith("ernie") else f"peak {rss / size:.1f}x the patch")
        rows.append(f"  {name:<30} wall {wall:7.2f} s  CPU {cpu:7.2f} s  peak RSS {rss:7.1f} MB  {versus}")
    print("\n".join(rows[-7:]), flush=True)


FUNCTION = "def f_{i}(x):\n    value = x + {i}\n    return value * {k}, 'v{k}'\n\n"


def _big_site(work: Path, modules: int, functions: int) -> tuple[Path, Path]:
    """A site with distribution benchpkg 1.0 of MODULES modules and one patch rewriting every line."""
    from largediff import _record_line

    site, a, b = work / "site", work / "a", work / "b"
    for tree, k in ((site, 2), (a, 2), (b, 3)):
        (tree / "benchpkg").mkdir(parents=True)
        (tree / "benchpkg" / "__init__.py").write_text("")
        for m in range(modules):
            (tree / "benchpkg" / f"m{m}.py").write_text("".join(FUNCTION.format(i=i, k=k) for i in range(functions)))
    info = site / "benchpkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: benchpkg\nVersion: 1.0\n")
    rows = [_record_line(site, str(p.relative_to(site))) for p in sorted((site / "benchpkg").iterdir())]
    (info / "RECORD").write_text("".join(rows) + "benchpkg-1.0.dist-info/RECORD,,\n")
    patches = work / "set"
    patches.mkdir()
    diff = subprocess.run(["git", "diff", "--no-index", "a/benchpkg", "b/benchpkg"], cwd=work, capture_output=True)
    (patches / "big.patch").write_bytes(diff.stdout)
    _series(patches, [("big", "benchpkg", "benchpkg", "1.0", ["m0.py:v3"])])
    return site, patches


def compare_big(work: Path, rows: list[str], tool_root: Path) -> None:
    site, patches = _big_site(work, 100, 7200)
    size = (patches / "big.patch").stat().st_size / 2**20
    tool = [sys.executable, "-m", "ernie_patcher"]
    results = {
        "status": timed([*tool, "status", "--site", str(site), "--patches", str(patches)], tool_root, check=False),
        "apply": timed([*tool, "apply", "--site", str(site), "--patches", str(patches)], tool_root),
        "revert": timed([*tool, "revert", "--site", str(site)], tool_root),
        "verify, reverted": timed([*tool, "verify", "--site", str(site), "--patches", str(patches)], tool_root,
                                  check=False),
    }
    rows.append(f"100 rewritten modules: patch {size:.1f} MB")
    for name, (wall, cpu, rss) in results.items():
        rows.append(f"  ernie-patch {name:<20} wall {wall:7.2f} s  CPU {cpu:7.2f} s  peak RSS {rss:7.1f} MB  "
                    f"peak {rss / size:.2f}x the patch")
    print("\n".join(rows[-5:]), flush=True)


def compare_chained(work: Path, rows: list[str], tool_root: Path, count: int = 1000) -> None:
    """COUNT patches on one module, each adding one line (after the previous one's) and probing it."""
    from largediff import _record_line

    site = work / "site"
    (site / "benchpkg").mkdir(parents=True)
    body = "".join(FUNCTION.format(i=i, k=2) for i in range(3000))
    (site / "benchpkg" / "__init__.py").write_text("")
    (site / "benchpkg" / "chain.py").write_text(body)
    info = site / "benchpkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: benchpkg\nVersion: 1.0\n")
    rows_ = [_record_line(site, p) for p in ("benchpkg/__init__.py", "benchpkg/chain.py")]
    (info / "RECORD").write_text("".join(rows_) + "benchpkg-1.0.dist-info/RECORD,,\n")
    patches = work / "set"
    patches.mkdir()
    lines = body.splitlines(True)
    entries = []
    for n in range(count):
        at = len(lines)
        added = f"MARK_{n} = 'chain-{n}'\n"
        context = lines[at - 3:at]
        diff = (f"--- a/benchpkg/chain.py\n+++ b/benchpkg/chain.py\n@@ -{at - 2},3 +{at - 2},4 @@\n"
                + "".join(" " + c for c in context) + "+" + added)
        (patches / f"p{n}.patch").write_text(diff)
        lines.append(added)
        entries.append((f"p{n}", "benchpkg", "benchpkg", "1.0", [f"chain.py:chain-{n}"]))
    _series(patches, entries)
    tool = [sys.executable, "-m", "ernie_patcher"]
    env_off = {"ERNIE_PATCHER_PROBE_CACHE": "off"}
    results = {
        "apply": timed([*tool, "apply", "--site", str(site), "--patches", str(patches)], tool_root, env=env_off),
        "verify --reparse": timed([*tool, "verify", "--reparse", "--site", str(site), "--patches", str(patches)],
                                  tool_root, env=env_off),
    }
    rows.append(f"{count} patches chained on one module (probe memo off)")
    for name, (wall, cpu, rss) in results.items():
        rows.append(f"  ernie-patch {name:<20} wall {wall:7.2f} s  CPU {cpu:7.2f} s  peak RSS {rss:7.1f} MB")
    print("\n".join(rows[-3:]), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=["release", "big", "chained"])
    parser.add_argument("--tool-root", type=Path, default=ROOT)
    args = parser.parse_args()
    rows = [f"{len(os.sched_getaffinity(0))} CPUs; load average {os.getloadavg()[0]:.1f} at start"]
    workdir = Path(tempfile.mkdtemp(prefix="ernie-patch-gitdiff-"))
    cases = {"release": compare_release, "big": compare_big, "chained": compare_chained}
    try:
        for case in args.cases:
            (workdir / case).mkdir()
            cases[case](workdir / case, rows, args.tool_root)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(rows) + "\n"
    if args.tool_root == ROOT and args.cases == ["release", "big", "chained"]:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
