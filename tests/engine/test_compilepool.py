"""The compile check and new bytecode of many files, compiled in worker processes (compilepool):
the same results as compiling here, in order, and no worker outliving ernie-patch."""
from __future__ import annotations

import marshal
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ernie_patcher.fs import compilepool
from ernie_patcher.fs.bytecode import compile_source
from ernie_patcher.fs.compilepool import compile_many, compile_one
from support.cli import ROOT, cli
from support.patchsets import PatchDef, file_diff, write_patchset
from support.tree import snapshot

STATE = ".ernie-patcher"


def _largest_modules(site: Path, count: int) -> list[Path]:
    """COUNT of the largest real diffusers modules: together far above the pool's threshold."""
    modules = sorted((site / "diffusers" / "models").rglob("*.py"), key=lambda p: -p.stat().st_size)
    return modules[:count]


@pytest.fixture
def pooled(monkeypatch) -> list[int]:
    """Two workers, and a count of the pools started (a test that expects parallel work checks it)."""
    monkeypatch.setenv(compilepool.JOBS_ENV, "2")
    started: list[int] = []
    real = compilepool._Pool.run

    def counting(self, sources):
        started.append(self.size)
        return real(self, sources)

    monkeypatch.setattr(compilepool._Pool, "run", counting)
    return started


def _sources(site: Path) -> list[tuple[Path, bytes]]:
    sources = [(path, path.read_bytes()) for path in _largest_modules(site, 12)]
    sources.insert(3, (site / "broken.py", b"def f(:\n    pass\n"))
    sources.insert(7, (site / "deep.py", ("X = " + "+".join(["1"] * 60000) + "\n").encode()))
    sources.insert(9, (site / "latin.py", b"# -*- coding: latin-1 -*-\nNAME = '\xe9'\n"))
    return sources


def test_workers_give_what_compiling_here_gives_in_the_same_order(site: Path, pooled: list[int]):
    sources = _sources(site)
    assert sum(len(data) for _, data in sources) >= compilepool.MIN_POOL_BYTES
    expected = [compile_one(path, data) for path, data in sources]
    assert compile_many(sources) == expected
    assert pooled == [2], "the sources were not compiled by two workers"
    assert [type(r).__name__ for r in expected[3:4] + expected[7:8]] == ["CompileFailure"] * 2
    assert expected[3].kind == "SyntaxError" and "broken.py" in expected[3].message
    assert expected[7].kind == "RecursionError"
    assert marshal.loads(expected[9]).co_consts[0] == "\xe9"


def test_one_job_or_little_source_compiles_here(site: Path, pooled: list[int], monkeypatch):
    sources = _sources(site)
    monkeypatch.setenv(compilepool.JOBS_ENV, "1")
    assert compile_many(sources) == [compile_one(path, data) for path, data in sources]
    monkeypatch.setenv(compilepool.JOBS_ENV, "2")
    small = [(site / f"m{i}.py", b"X = %d\n" % i) for i in range(20)]
    assert compile_many(small) == [compile_source(data, path) for path, data in small]
    assert pooled == [], "a pool was started for one job or for a few bytes"


@pytest.mark.parametrize("value,expected", [("3", 3), ("100", compilepool.MAX_JOBS), ("0", None), ("two", None)])
def test_jobs_come_from_the_environment_else_the_cpus(monkeypatch, value: str, expected: int | None):
    monkeypatch.setenv(compilepool.JOBS_ENV, value)
    cpus = min(len(os.sched_getaffinity(0)), compilepool.MAX_JOBS)
    assert compilepool.jobs() == (expected if expected is not None else cpus)


def test_a_worker_that_dies_leaves_the_compiling_to_this_process(site: Path, pooled: list[int], monkeypatch):
    monkeypatch.setattr(compilepool, "_WORKER", "import os; os._exit(3)")
    sources = _sources(site)
    assert compile_many(sources) == [compile_one(path, data) for path, data in sources]
    assert pooled == [2]


_KILLED_PARENT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from ernie_patcher.fs import compilepool

    os.environ[compilepool.JOBS_ENV] = "2"
    start, send = compilepool._Pool._start, compilepool._Pool._request
    sent = []

    def reporting(self):
        process = start(self)
        print(process.pid, flush=True)
        return process

    def stalling(process, index, sources):  # in "waiting", the workers wait for more work
        sent.append(index)
        if sys.argv[1] == "waiting" and len(sent) > 2:
            time.sleep(120)
        return send(process, index, sources)

    compilepool._Pool._start, compilepool._Pool._request = reporting, staticmethod(stalling)
    big = "".join(f"def f_{i}(x):\\n    return x + {i}\\n" for i in range(40000)).encode()
    compilepool.compile_many([(Path(f"/nonexistent/m{i}.py"), big) for i in range(8)])
""")


@pytest.mark.parametrize("moment", ["compiling", "waiting"])
def test_no_worker_outlives_a_killed_ernie_patch(moment: str):
    parent = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT, moment], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    workers = [int(parent.stdout.readline()) for _ in range(2)]
    time.sleep(0.3 if moment == "compiling" else 3)
    assert all(_running(pid) for pid in workers), "the workers were not running"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.1)
    assert not any(_running(pid) for pid in workers), "a compile worker kept running after ernie-patch was killed"


def _running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" not in status.read_text()
    except OSError:
        return False


def _append(line: str):
    return lambda lines: lines + [line]


def _bytecode_body(path: Path) -> bytes:
    from importlib.util import cache_from_source

    return Path(cache_from_source(str(path))).read_bytes()[16:]


def test_apply_and_revert_of_many_files_write_the_workers_bytecode(site: Path, tmp_path: Path, pooled: list[int]):
    modules = _largest_modules(site, 12)
    subprocess.run([sys.executable, "-m", "compileall", "-q", *map(str, modules)], check=True)  # as pip does
    relpaths = [str(p.relative_to(site)) for p in modules]
    originals = {p: p.read_bytes() for p in modules}
    diff = "".join(file_diff(site, rel, _append("ERNIE_PATCH_MARK = 1\n")) for rel in relpaths)
    patches = write_patchset(tmp_path / "set", [PatchDef("many", "diffusers", "diffusers", diff)])
    result = cli("apply", "--site", site, "--patches", patches)
    assert result.code == 0, result.stderr
    assert len(pooled) == 1, "apply's compile check did not use the workers"
    for path in modules:
        assert path.read_bytes() == originals[path] + b"ERNIE_PATCH_MARK = 1\n"
        assert _bytecode_body(path) == compile_source(path.read_bytes(), path), f"stale bytecode for {path}"
    result = cli("revert", "--site", site)
    assert result.code == 0, result.stderr
    assert len(pooled) == 2, "revert's new bytecode was not compiled by the workers"
    for path in modules:
        assert path.read_bytes() == originals[path]
        assert _bytecode_body(path) == compile_source(originals[path], path)


def test_a_file_that_does_not_compile_among_many_refuses_apply(site: Path, tmp_path: Path, pooled: list[int]):
    relpaths = [str(p.relative_to(site)) for p in _largest_modules(site, 12)]
    broken = relpaths[5]
    diff = "".join(file_diff(site, rel, _append("def broken(:\n" if rel == broken else "MARK = 1\n"))
                   for rel in relpaths)
    patches = write_patchset(tmp_path / "set", [PatchDef("many", "diffusers", "diffusers", diff)])
    before = snapshot(site)
    result = cli("apply", "--site", site, "--patches", patches)
    assert result.code == 5, result.stderr
    assert f"patched {site / broken} would not compile: SyntaxError" in result.reason, result.reason
    assert pooled == [2]
    assert not (site / STATE).exists()
    assert snapshot(site) == before


def test_bytecode_written_under_python_O_is_still_unoptimized(site: Path, tmp_path: Path):
    """The plain .pyc (no .opt-N tag) must hold code with its asserts, whatever -O ernie-patch runs with."""
    module = _largest_modules(site, 1)[0]
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(module)], check=True)
    diff = file_diff(site, str(module.relative_to(site)), _append("assert ERNIE_PATCH_MARK, 'kept'\n"))
    patches = write_patchset(tmp_path / "set", [PatchDef("one", "diffusers", "diffusers", diff)])
    done = subprocess.run([sys.executable, "-O", "-m", "ernie_patcher", "apply", "--site", str(site),
                           "--patches", str(patches)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert _bytecode_body(module) == compile_source(module.read_bytes(), module)
    assert "kept" in repr(marshal.loads(_bytecode_body(module)).co_consts)
