"""Compile many modules at once, one worker process per CPU: compile() holds the GIL, so threads
would not help. Hand-written rather than concurrent.futures: a ProcessPoolExecutor worker outlives
a killed parent (it waits on a queue whose write end it holds itself); these workers read their
work from a pipe only ernie-patch holds, so they end when it does, however it ends.
"""
from __future__ import annotations

import os
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import COMPILE_ERRORS
from ..settings import count
from .bytecode import compile_source

if TYPE_CHECKING:
    import subprocess

JOBS_ENV = "ERNIE_PATCHER_JOBS"
MAX_JOBS = 8
MIN_POOL_BYTES = 256 * 1024  # below this, starting workers (~20 ms each) costs more than it saves
_FRAME = struct.Struct(">II")  # two lengths: path and source in a request, kind and body in a reply

# Runs in `python -I -B -c`: no site-packages, no ernie_patcher import, nothing written. It compiles
# as bytecode.compile_source does; a failure is sent back as its type name and message.
_WORKER = r"""
import marshal, struct, sys
frame = struct.Struct(">II")
read, write = sys.stdin.buffer.read, sys.stdout.buffer.write
while True:
    head = read(frame.size)
    if len(head) < frame.size:
        break
    path_len, data_len = frame.unpack(head)
    path, data = read(path_len).decode("utf-8", "surrogateescape"), read(data_len)
    try:
        kind, body = b"", marshal.dumps(compile(data, path, "exec", dont_inherit=True, optimize=0))
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as exc:
        kind, body = type(exc).__name__.encode(), str(exc).encode("utf-8", "replace")
    write(frame.pack(len(kind), len(body)) + kind + body)
    sys.stdout.buffer.flush()
"""


@dataclass(frozen=True)
class CompileFailure:
    """Why a source did not compile: the exception's type name and message."""

    kind: str
    message: str


Compiled = bytes | CompileFailure


def jobs() -> int:
    """Worker processes to use: ERNIE_PATCHER_JOBS, else the CPUs this process may run on."""
    wanted = count(JOBS_ENV)
    if wanted is not None:
        return min(wanted, MAX_JOBS)
    try:
        return min(len(os.sched_getaffinity(0)), MAX_JOBS)
    except (AttributeError, OSError):
        return min(os.cpu_count() or 1, MAX_JOBS)


def compile_one(path: Path, data: bytes) -> Compiled:
    """DATA at PATH compiled and marshalled in this process, or why it does not compile."""
    try:
        return compile_source(data, path)
    except COMPILE_ERRORS as exc:
        return CompileFailure(type(exc).__name__, str(exc))


def compile_many(sources: Sequence[tuple[Path, bytes]]) -> list[Compiled]:
    """Each (path, source) compiled as compile_one would, in the same order; in parallel when
    there is more than one CPU and enough source to repay starting the workers."""
    workers = min(jobs(), len(sources))
    if workers < 2 or sum(len(data) for _, data in sources) < MIN_POOL_BYTES or not sys.executable:
        return [compile_one(path, data) for path, data in sources]
    try:
        return _Pool(workers).run(sources)
    except _PoolBroken:
        return [compile_one(path, data) for path, data in sources]


class _PoolBroken(Exception):
    """A worker could not start or died (e.g. killed for memory): compile in this process instead."""


def _read_exact(stream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise _PoolBroken()
    return data


class _Pool:
    def __init__(self, size: int) -> None:
        self.size = size
        self.processes: list[subprocess.Popen] = []

    def run(self, sources: Sequence[tuple[Path, bytes]]) -> list[Compiled]:
        import selectors  # with subprocess: only a run with a pool pays for importing them

        order = sorted(range(len(sources)), key=lambda i: -len(sources[i][1]))  # largest first
        results: dict[int, Compiled] = {}
        busy: dict[subprocess.Popen, int] = {}
        selector = selectors.DefaultSelector()
        finished = False
        try:
            for _ in range(self.size):
                process = self._start()
                selector.register(process.stdout, selectors.EVENT_READ, process)
            for process in self.processes:
                if order:
                    busy[process] = self._send(process, order.pop(0), sources)
            while busy:
                for key, _ in selector.select():
                    process = key.data
                    results[busy.pop(process)] = self._receive(process)
                    if order:
                        busy[process] = self._send(process, order.pop(0), sources)
            finished = True
        finally:
            selector.close()
            self._stop(kill=not finished)
        return [results[index] for index in range(len(sources))]

    def _start(self) -> subprocess.Popen:
        import subprocess

        try:
            process = subprocess.Popen([sys.executable, "-I", "-B", "-c", _WORKER], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)
        except OSError:
            raise _PoolBroken() from None
        self.processes.append(process)
        return process

    @staticmethod
    def _send(process: subprocess.Popen, index: int, sources: Sequence[tuple[Path, bytes]]) -> int:
        path, data = sources[index]
        name = str(path).encode("utf-8", "surrogateescape")
        try:
            process.stdin.write(_FRAME.pack(len(name), len(data)) + name)
            process.stdin.write(data)
            process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _PoolBroken() from None
        return index

    @staticmethod
    def _receive(process: subprocess.Popen) -> Compiled:
        kind_len, body_len = _FRAME.unpack(_read_exact(process.stdout, _FRAME.size))
        kind = _read_exact(process.stdout, kind_len).decode("utf-8", "replace")
        body = _read_exact(process.stdout, body_len)
        return CompileFailure(kind, body.decode("utf-8", "replace")) if kind else body

    def _stop(self, kill: bool) -> None:
        """End every worker: a closed stdin ends an idle one; after a failure or an interruption
        (KILL) none is left compiling."""
        import subprocess

        for process in self.processes:
            if kill:
                process.kill()
            try:
                process.stdin.close()
            except OSError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            process.stdout.close()
