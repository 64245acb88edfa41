"""Large patches: time and peak memory of `ernie-patch apply` and `revert` beside GNU `patch -p1`.

* hunks: one generated module of N small functions, a patch changing every one of them (one hunk
  each), for N = 1 000 and 20 000;
* upgrade: a whole-release upgrade of a large pure-Python package as a user patch set: the diff
  between the real diffusers 0.38.0 and 0.39.0 wheels (hundreds of files, over a thousand hunks),
  applied to an install of 0.38.0.

Each command is a new process measured by GNU time (wall, user + system CPU of it and its worker
processes, peak RSS of the largest of them), beside compile() alone of the same patched modules in
one bare interpreter: the compile check apply keeps (and reuses as the new bytecode) cannot cost
less than that, in memory above all (CPython needs about 130 bytes per byte of source). Writes
the table to bench/results/largediff.txt and prints it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ERNIE_PATCHER_CACHE", Path.home() / ".cache" / "ernie-patcher"))
WHEELS = CACHE / "wheels"
RESULTS = ROOT / "bench" / "results" / "largediff.txt"
UPGRADE = ("diffusers", "0.38.0", "0.39.0")
FUNCTION = ('def f_{i}(x):\n    """Function {i}."""\n    a = x\n    b = a\n    y = x + {i}{extra}\n'
            '    c = y\n    d = c\n    return d\n\n')


def timed(command: list[str], tool_root: Path, cwd: Path | None = None, check: bool = True,
          env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MB) of COMMAND, run under GNU time (in CWD, with ENV added); it must
    succeed unless CHECK is false."""
    out = Path(tempfile.mktemp(prefix="ernie-bench-time-"))
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    environ.update(env or {})
    environ["PYTHONPATH"] = str(tool_root)
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-o", str(out), "-f", "%U %S %M", *command], env=environ, cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    fields = out.read_text().split()[-3:]
    out.unlink()
    if done.returncode and check:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    user, system, rss = map(float, fields)
    return wall, user + system, rss / 1024


def _record_line(site: Path, relpath: str) -> str:
    import base64
    import hashlib

    data = (site / relpath).read_bytes()
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{relpath},sha256={digest},{len(data)}\n"


def hunk_site(directory: Path, count: int) -> tuple[Path, Path]:
    """A site with distribution benchpkg 1.0 (module of COUNT functions) and a patch set changing each."""
    site, before, after = directory / "site", directory / "a", directory / "b"
    for tree, extra in ((site, ""), (before, ""), (after, " + 1")):
        (tree / "benchpkg").mkdir(parents=True)
        (tree / "benchpkg" / "__init__.py").write_text("")
        (tree / "benchpkg" / "big.py").write_text("".join(FUNCTION.format(i=i, extra=extra) for i in range(count)))
    info = site / "benchpkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: benchpkg\nVersion: 1.0\n")
    (info / "INSTALLER").write_text("pip\n")
    rows = [_record_line(site, p) for p in ("benchpkg/__init__.py", "benchpkg/big.py",
                                             "benchpkg-1.0.dist-info/METADATA", "benchpkg-1.0.dist-info/INSTALLER")]
    (info / "RECORD").write_text("".join(rows) + "benchpkg-1.0.dist-info/RECORD,,\n")
    patches = directory / "set"
    patches.mkdir()
    _diff(directory, "a/benchpkg", "b/benchpkg", patches / "bench.patch")
    (patches / "series.toml").write_text('schema = 1\nname = "bench"\n\n[[patch]]\nid = "bench"\nfile = "bench.patch"\n'
                                         'package = "benchpkg"\nversions = "==1.0"\nstrip = 1\n')
    return site, patches


def _diff(cwd: Path, old: str, new: str, out: Path) -> None:
    with out.open("wb") as handle:
        done = subprocess.run(["diff", "-ruN", old, new], cwd=cwd, stdout=handle)
    if done.returncode not in (0, 1):
        raise SystemExit(f"diff failed in {cwd}")


def _wheel(name: str, version: str) -> Path:
    found = sorted(WHEELS.glob(f"{name}-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--dest", str(WHEELS), f"{name}=={version}"], check=True)
        found = sorted(WHEELS.glob(f"{name}-{version}-*.whl"))
    return found[0]


def upgrade_site(directory: Path) -> tuple[Path, Path, int]:
    """A pip --target install of the older release and a patch set holding the whole diff to the
    newer one (files in subpackages the older release does not have included)."""
    name, old, new = UPGRADE
    site = directory / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                    str(_wheel(name, old))], check=True)
    for label, version in (("a", old), ("b", new)):
        with zipfile.ZipFile(_wheel(name, version)) as wheel:
            wheel.extractall(directory / label, [m for m in wheel.namelist() if m.startswith(f"{name}/")])
    patches = directory / "set"
    patches.mkdir()
    _diff(directory, f"a/{name}", f"b/{name}", patches / "upgrade.patch")
    files = sum(1 for line in (patches / "upgrade.patch").open("rb") if line.startswith(b"diff "))
    (patches / "series.toml").write_text(f'schema = 1\nname = "upgrade"\n\n[[patch]]\nid = "upgrade"\n'
                                         f'file = "upgrade.patch"\npackage = "{name}"\nversions = "=={old}"\n'
                                         'strip = 1\n')
    return site, patches, files


_COMPILE_ONLY = ("import sys\nfor name in sys.argv[1:]:\n"
                 "    compile(open(name, 'rb').read(), name, 'exec', dont_inherit=True, optimize=0)\n")


def _patched_modules(patch_file: Path, tree: Path) -> list[str]:
    """The .py files PATCH_FILE writes, in TREE (a copy already patched)."""
    names = {line.split()[1].split(b"/", 1)[1].decode() for line in patch_file.open("rb")
             if line.startswith(b"+++ ") and line.split()[1] != b"/dev/null"}
    return sorted(str(tree / n) for n in names if n.endswith(".py") and (tree / n).is_file())


def compare(label: str, site: Path, patches: Path, rows: list[str], tool_root: Path) -> None:
    """apply and revert by ernie-patch, then GNU patch -p1 and -R -p1 on a copy of the same site, and
    compile() alone of the patched files in one bare interpreter: the floor of apply's compile check."""
    patch_file = next(patches.glob("*.patch"))
    hunks = sum(1 for line in patch_file.open("rb") if line.startswith(b"@@ "))
    copy = site.parent / "gnu"
    shutil.copytree(site, copy, symlinks=True)
    tool = [sys.executable, "-m", "ernie_patcher"]
    results = {
        "ernie-patch apply": timed([*tool, "apply", "--site", str(site), "--patches", str(patches)], tool_root),
        "ernie-patch revert": timed([*tool, "revert", "--site", str(site)], tool_root),
        "GNU patch -p1": timed(["patch", "-p1", "--batch", "--silent", "-d", str(copy), "-i", str(patch_file)],
                               tool_root),
    }
    modules = _patched_modules(patch_file, copy)
    results["compile() alone, 1 CPU"] = timed([sys.executable, "-c", _COMPILE_ONLY, *modules], tool_root)
    results["GNU patch -R -p1"] = timed(["patch", "-R", "-p1", "--batch", "--silent", "-d", str(copy), "-i",
                                         str(patch_file)], tool_root)
    largest = max(p.stat().st_size for p in site.rglob("*.py")) / 2**20
    rows.append(f"{label}: {hunks} hunks, patch {patch_file.stat().st_size / 2**20:.1f} MB, "
                f"largest target file {largest:.1f} MB, {len(modules)} modules compiled")
    gnu = {"apply": results["GNU patch -p1"][0], "revert": results["GNU patch -R -p1"][0]}
    floor_rss = results["compile() alone, 1 CPU"][2]
    for name, (wall, cpu, rss) in results.items():
        versus = next((f"{wall / gnu[k]:.1f}x GNU, peak {rss / floor_rss:.2f}x compile()" for k in gnu
                       if name == f"ernie-patch {k}"), "")
        rows.append(f"  {name:<24} wall {wall:7.2f} s  CPU {cpu:7.2f} s  peak RSS {rss:7.1f} MB  {versus}")
    print("\n".join(rows[-6:]), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hunks", type=int, nargs="*", default=[1000, 20000])
    parser.add_argument("--no-upgrade", action="store_true")
    parser.add_argument("--tool-root", type=Path, default=ROOT,
                        help="run ernie-patch from this checkout (e.g. an older one, for before/after figures)")
    args = parser.parse_args()
    rows: list[str] = [f"{len(os.sched_getaffinity(0))} CPUs; ernie-patch compiles on all of them, "
                       "compile() alone on one"]
    workdir = Path(tempfile.mkdtemp(prefix="ernie-patch-largediff-"))
    try:
        for count in args.hunks:
            site, patches = hunk_site(workdir / f"hunks-{count}", count)
            compare(f"{count} hunks in one file", site, patches, rows, args.tool_root)
        if not args.no_upgrade:
            site, patches, files = upgrade_site(workdir / "upgrade")
            name, old, new = UPGRADE
            compare(f"{name} {old} -> {new} as a patch set ({files} files)", site, patches, rows, args.tool_root)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = "\n".join(rows) + "\n"
    if args.tool_root != ROOT:
        print(text, end="")
        return 0
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    print(text, end="")
    print(f"(written to {RESULTS.relative_to(ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
