"""`make demo`: a throwaway environment with the real diffusers 0.38.0 and vllm-omni 0.20.0, and the
tool installed into it as a user would (`pip install .`), then status → apply → verify → status →
revert → verify, printing exactly what a user sees."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["diffusers==0.38.0", "vllm-omni==0.20.0"]
STEPS = [["status"], ["apply"], ["verify"], ["status"], ["revert"], ["verify"]]


def run(command: list[str], quiet: bool = False) -> int:
    done = subprocess.run(command, capture_output=quiet, text=True)
    if done.returncode and quiet:
        sys.stdout.write(done.stdout + done.stderr)
        raise SystemExit(f"demo setup failed: {' '.join(command)}")
    return done.returncode


def build(env: Path) -> Path:
    print(f"# building a throwaway environment in {env}", flush=True)
    run([sys.executable, "-m", "venv", str(env)], quiet=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run(pip + ["--no-deps", *TARGETS], quiet=True)
    run(pip + [str(ROOT)], quiet=True)
    return env / "bin" / "ernie-patch"


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="ernie-patch-demo-"))
    try:
        tool = build(workdir / "env")
        print(f"# installed: {', '.join(TARGETS)} (--no-deps) and ernie-patcher (pip install .)\n", flush=True)
        codes = []
        for step in STEPS:
            print(f"$ ernie-patch {' '.join(step)}", flush=True)
            code = run([str(tool), *step])
            print(f"[exit {code}]\n", flush=True)
            codes.append(code)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    expected = [0, 0, 0, 0, 0, 1]
    if codes != expected:
        print(f"demo: exit codes {codes}, expected {expected}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("COLUMNS", "120")
    sys.exit(main())
