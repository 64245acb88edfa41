"""Cold wall time of `ernie-patch status`, `verify` and `apply --dry-run`, each a new process, against
`python -c pass` and GNU `patch --dry-run` of the same patches, measured in one run; prints ratios.

Also checks with `python -X importtime` that the CLI imports no torch, diffusers or vllm module.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from demo import TARGETS, build  # noqa: E402

from ernie_patcher.series import load_series  # noqa: E402

FORBIDDEN = ("torch", "torch_npu", "diffusers", "vllm", "vllm_omni")


def timed(command: list[str], runs: int, expect: int = 0) -> list[float]:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        samples.append(time.perf_counter() - start)
        if done.returncode != expect:
            raise SystemExit(f"{' '.join(command)} exited {done.returncode}, expected {expect}")
    return samples


def gnu_patch_dry_run(site: Path) -> list[str]:
    """One shell command running `patch --dry-run` for every built-in patch, as a user would: of a patch
    with versioned variants, the one for the demo's release."""
    series = load_series()
    versions = dict(target.split("==") for target in TARGETS)
    chosen = [c.chosen for c in series.resolve(list(series.patches), versions)]
    steps = [f"patch -p{p.strip or 1} --dry-run --batch --silent -d {site} -i {p.path}" for p in chosen if p]
    return ["bash", "-c", " && ".join(steps)]


def imported_modules(python: Path, tool_args: list[str]) -> list[str]:
    code = "import sys; from ernie_patcher.cli import main; sys.argv = ['ernie-patch'] + sys.argv[1:]; main()"
    done = subprocess.run([str(python), "-X", "importtime", "-c", code, *tool_args], capture_output=True, text=True)
    names = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    return sorted({n for n in names if n.split(".")[0] in FORBIDDEN})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ernie-patch-bench-"))
    try:
        tool = build(workdir / "env")
        python = workdir / "env" / "bin" / "python"
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        rows: dict[str, list[float]] = {}
        rows["python -c pass (baseline)"] = timed([str(python), "-c", "pass"], args.runs)
        rows["GNU patch --dry-run, 5 patches"] = timed(gnu_patch_dry_run(site), args.runs)
        rows["ernie-patch status"] = timed([str(tool), "status"], args.runs)
        rows["ernie-patch apply --dry-run"] = timed([str(tool), "apply", "--dry-run"], args.runs)
        subprocess.run([str(tool), "apply"], check=True, stdout=subprocess.DEVNULL)
        rows["ernie-patch verify"] = timed([str(tool), "verify"], args.runs)
        rows["ernie-patch verify --json"] = timed([str(tool), "verify", "--json"], args.runs)
        rows["ernie-patch verify --reparse"] = timed([str(tool), "verify", "--reparse"], args.runs)
        rows["python -c 'import click' (reference)"] = timed([str(python), "-c", "import click"], args.runs)
        leaked = imported_modules(python, ["verify"]) + imported_modules(python, ["apply", "--dry-run"])
        subprocess.run([str(tool), "revert"], check=True, stdout=subprocess.DEVNULL)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = statistics.median(rows["python -c pass (baseline)"])
    gnu = statistics.median(rows["GNU patch --dry-run, 5 patches"])
    print(f"{'command':<34} {'median ms':>10} {'min ms':>8} {'x python':>9} {'x GNU patch':>12}")
    for name, samples in rows.items():
        med = statistics.median(samples)
        print(f"{name:<34} {med * 1000:>10.1f} {min(samples) * 1000:>8.1f} {med / base:>9.2f} {med / gnu:>12.2f}")
    print(f"\nruns per command: {args.runs}; target/CLI imports of {', '.join(FORBIDDEN)}: {leaked or 'none'}")
    return 1 if leaked else 0


if __name__ == "__main__":
    sys.exit(main())
