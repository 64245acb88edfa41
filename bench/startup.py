"""Start-up cost of `ernie-patch verify`, `status` and `apply --dry-run`, each a new process, as
ratios to `python -c pass` of the same interpreter, beside GNU `patch --dry-run` of the same
patches and `pip show`, in two environments measured in one run:

* small: the demo environment (the real diffusers 0.38.0 and vllm-omni 0.20.0, --no-deps);
* large: a throwaway copy of a cached SP-tier environment (~220 real distributions): its
  site-packages without shared libraries, bytecode or files over 512 KiB (discovery and hashing
  read metadata and .py files only), the tool installed into it. Skipped when no such cache exists.

CPU time (user + system, of the process and its children) and wall time are medians; peak RSS
is from one run under GNU time. Commands are interleaved run by run, so the ratios share the
machine's load. The first run of each command also fills the per-user probe memo (probememo), as
any earlier status on the same release would. Also checks with `python -X importtime` that the
CLI imports no torch, diffusers or vllm module. Writes the table to bench/results/startup.txt and prints it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from demo import TARGETS, build  # noqa: E402

from ernie_patcher.patchset.series import load_series  # noqa: E402

FORBIDDEN = ("torch", "torch_npu", "diffusers", "vllm", "vllm_omni")
CACHE = Path(os.environ.get("ERNIE_PATCHER_CACHE", Path.home() / ".cache" / "ernie-patcher"))
RESULTS = ROOT / "bench" / "results" / "startup.txt"
MAX_COPIED = 512 << 10
SKIPPED_SUFFIXES = (".so", ".a", ".pyc", ".pyd", ".dll", ".dylib", ".bin", ".pt", ".safetensors")
BASELINE = "python -c pass"


@dataclass
class Samples:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rss_kb: int = 0


def run_once(command: list[str], expect: int, into: Samples) -> None:
    """One run of COMMAND: wall time, CPU time of it and its children (wait4)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    into.wall.append(time.perf_counter() - start)
    process.returncode = code = os.waitstatus_to_exitcode(status)
    into.cpu.append(usage.ru_utime + usage.ru_stime)
    if code != expect:
        raise SystemExit(f"{' '.join(command)} exited {code}, expected {expect}")


def peak_rss_kb(command: list[str]) -> int:
    """Peak RSS of one run under GNU time: a child's own ru_maxrss would include this process's,
    inherited through the vfork of subprocess."""
    with tempfile.NamedTemporaryFile("r", prefix="ernie-bench-rss-") as out:
        subprocess.run(["/usr/bin/time", "-o", out.name, "-f", "%M", *command], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        return int(out.read().split()[-1])


def measure(commands: dict[str, list[str]], runs: int, rows: dict[str, Samples], slow: set[str]) -> None:
    """Run every command RUNS times, interleaved (SLOW ones every fourth round only), after one run
    each under GNU time for the peak RSS (which also warms the page cache)."""
    for name, command in commands.items():
        rows.setdefault(name, Samples()).rss_kb = peak_rss_kb(command)
    for round_number in range(runs):
        for name, command in commands.items():
            if name in slow and round_number % 4:
                continue
            run_once(command, 0, rows.setdefault(name, Samples()))


def gnu_patch_dry_run(site: Path, versions: dict[str, str]) -> list[str]:
    """One shell command running `patch --dry-run` for every built-in patch, as a user would: of a patch
    with versioned variants, the one for the installed release."""
    series = load_series()
    chosen = [c.chosen for c in series.resolve(list(series.patches), versions)]
    steps = [f"patch -p{p.strip or 1} --dry-run --batch --silent -d {site} -i {p.path}" for p in chosen if p]
    return ["bash", "-c", " && ".join(steps)]


def imported_modules(python: Path, tool_args: list[str]) -> list[str]:
    code = "import sys; from ernie_patcher.cli.quick import main; sys.argv = ['ernie-patch'] + sys.argv[1:]; main()"
    done = subprocess.run([str(python), "-X", "importtime", "-c", code, *tool_args], capture_output=True, text=True)
    names = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    return sorted({n for n in names if n.split(".")[0] in FORBIDDEN})


def purelib(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())


def _skip(directory: str, names: list[str]) -> set[str]:
    skipped = set()
    for name in names:
        path = os.path.join(directory, name)
        if name == "__pycache__" or name.endswith(SKIPPED_SUFFIXES) or ".so." in name:
            skipped.add(name)
        elif os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) > MAX_COPIED:
            skipped.add(name)
    return skipped


def cached_large_site() -> Path | None:
    """site-packages of a cached SP-tier environment holding the demo's releases (read only)."""
    wanted = {t.replace("==", "-").replace("-omni", "_omni") + ".dist-info" for t in TARGETS}
    for venv in sorted(CACHE.glob("venv-sp-*")):
        for site in venv.glob("lib/python*/site-packages"):
            if venv.is_dir() and wanted <= set(os.listdir(site)):
                return site
    return None


def build_large(env: Path) -> Path | None:
    """A venv whose site-packages is a trimmed copy of a cached one, with the tool installed."""
    source = cached_large_site()
    if source is None:
        return None
    print(f"# copying {source} (without shared libraries and large files) to {env}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    site = purelib(env / "bin" / "python")
    shutil.rmtree(site)
    shutil.copytree(source, site, ignore=_skip, symlinks=True)
    subprocess.run([str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--no-deps", str(ROOT)], check=True, stdout=subprocess.DEVNULL)
    return env / "bin" / "ernie-patch"


def bench_env(label: str, tool: Path, runs: int) -> tuple[dict[str, Samples], list[str], int]:
    python = tool.parent / "python"
    site = purelib(python)
    dists = sum(1 for n in os.listdir(site) if n.endswith(".dist-info"))
    versions = dict(t.split("==") for t in TARGETS)
    base = [str(python), "-c", "pass"]
    rows: dict[str, Samples] = {}
    print(f"# {label}: {dists} distributions, {runs} runs per command", flush=True)
    measure({BASELINE: base,
             "status (before apply)": [str(tool), "status"],
             "apply --dry-run": [str(tool), "apply", "--dry-run"],
             "GNU patch --dry-run (same patches)": gnu_patch_dry_run(site, versions),
             "pip show diffusers": [str(python), "-m", "pip", "show", "diffusers"],
             "python -c 'import click'": [str(python), "-c", "import click"]},
            runs, rows, slow={"pip show diffusers"})
    leaked = imported_modules(python, ["status"]) + imported_modules(python, ["apply", "--dry-run"])
    subprocess.run([str(tool), "apply"], check=True, stdout=subprocess.DEVNULL)
    try:
        measure({BASELINE: base, "verify": [str(tool), "verify"], "status (applied)": [str(tool), "status"],
                 "verify --reparse": [str(tool), "verify", "--reparse"]}, runs, rows, slow=set())
        leaked += imported_modules(python, ["verify"])
    finally:
        subprocess.run([str(tool), "revert"], check=True, stdout=subprocess.DEVNULL)
    return rows, sorted(set(leaked)), dists


ORDER = [BASELINE, "verify", "status (applied)", "status (before apply)", "apply --dry-run", "verify --reparse",
         "GNU patch --dry-run (same patches)", "pip show diffusers", "python -c 'import click'"]


def table(label: str, dists: int, rows: dict[str, Samples]) -> list[str]:
    base_cpu = statistics.median(rows[BASELINE].cpu)
    base_wall = statistics.median(rows[BASELINE].wall)
    lines = [f"{label} ({dists} distributions); ratios to `{BASELINE}` of the same interpreter",
             f"{'command':<36} {'CPU ms':>8} {'x CPU':>7} {'wall ms':>8} {'x wall':>7} {'peak RSS MB':>12}"]
    for name in ORDER:
        samples = rows.get(name)
        if samples is None:
            continue
        cpu, wall = statistics.median(samples.cpu), statistics.median(samples.wall)
        lines.append(f"{name:<36} {cpu * 1000:>8.1f} {cpu / base_cpu:>7.2f} {wall * 1000:>8.1f} "
                     f"{wall / base_wall:>7.2f} {samples.rss_kb / 1024:>12.1f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--small-only", action="store_true", help="skip the ~220-distribution environment")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ernie-patch-bench-"))
    lines: list[str] = []
    leaked: list[str] = []
    try:
        envs = [("small environment (demo)", build(workdir / "small"))]
        large = None if args.small_only else build_large(workdir / "large")
        if large is not None:
            envs.append(("large environment (trimmed copy of an SP-tier venv)", large))
        elif not args.small_only:
            lines.append("large environment skipped: no cached SP-tier environment with the demo's releases")
        for label, tool in envs:
            rows, found, dists = bench_env(label, tool, args.runs)
            leaked += found
            lines += table(label, dists, rows) + [""]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    lines.append(f"target/CLI imports of {', '.join(FORBIDDEN)}: {', '.join(sorted(set(leaked))) or 'none'}")
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    print(text, end="")
    print(f"(written to {RESULTS.relative_to(ROOT)})")
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
