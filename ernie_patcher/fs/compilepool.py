"""Compile many modules at once, one worker process per CPU: compile() holds the GIL, so threads
would not help. Hand-written rather than concurrent.futures: a ProcessPoolExecutor worker outlives
a killed parent (it waits on a queue whose write end it holds itself); these workers read their
work from a pipe only ernie-patch holds, so they end when it does, however it ends. Every reply has
a deadline and the pipes are never waited on past it (non-blocking, polled): a worker that is
stopped (SIGSTOP), hung or starved is killed and what it did not answer is compiled in this process,
so apply never waits on a worker while it holds the lock.
"""
from __future__ import annotations

import os
import struct
import sys
import time
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
_CHUNK = 1 << 20
REPLY_BASE_S = 20.0
REPLY_BYTES_PER_S = 64 * 1024

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
    wanted = count(JOBS_ENV, MAX_JOBS)
    if wanted is not None:
        return wanted
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
    there is more than one CPU and enough source to repay starting the workers. What a worker
    did not answer (it died, stopped, or stayed silent past its reply's deadline) is compiled here."""
    workers = min(jobs(), len(sources))
    if workers < 2 or sum(len(data) for _, data in sources) < MIN_POOL_BYTES or not sys.executable:
        return [compile_one(path, data) for path, data in sources]
    results = _Pool(workers).run(sources)
    return [results[i] if i in results else compile_one(path, data) for i, (path, data) in enumerate(sources)]


def reply_due(size: int) -> float:
    """Seconds a worker has to answer for SIZE bytes of source: compile() takes about 1 s per MB here;
    the deadline is far above that, so only a stopped, hung or starved worker misses it."""
    return REPLY_BASE_S + size / REPLY_BYTES_PER_S


class _PoolBroken(Exception):
    """A worker could not start, died (e.g. killed for memory) or missed its reply's deadline."""


class _Worker:
    """One worker process and its exchange: the request bytes not yet written, the reply bytes read."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.index: int | None = None  # the source it is compiling
        self.due = 0.0
        self.outgoing = memoryview(b"")
        self.incoming = bytearray()
        for stream in (process.stdin, process.stdout):
            os.set_blocking(stream.fileno(), False)

    def give(self, index: int, request: bytes) -> None:
        self.index, self.outgoing, self.due = index, memoryview(request), time.monotonic() + reply_due(len(request))

    def write(self) -> None:
        try:
            written = os.write(self.process.stdin.fileno(), self.outgoing[:_CHUNK])
        except BlockingIOError:
            return
        except OSError:  # it died
            raise _PoolBroken() from None
        self.outgoing = self.outgoing[written:]

    def read(self) -> Compiled | None:
        """The reply, once it has all arrived; None before."""
        try:
            chunk = os.read(self.process.stdout.fileno(), _CHUNK)
        except BlockingIOError:
            return None
        except OSError:
            raise _PoolBroken() from None
        if not chunk:  # it died
            raise _PoolBroken()
        self.incoming += chunk
        if len(self.incoming) < _FRAME.size:
            return None
        kind_len, body_len = _FRAME.unpack_from(self.incoming)
        end = _FRAME.size + kind_len + body_len
        if len(self.incoming) < end:
            return None
        kind = bytes(self.incoming[_FRAME.size:_FRAME.size + kind_len]).decode("utf-8", "replace")
        body = bytes(self.incoming[_FRAME.size + kind_len:end])
        del self.incoming[:end]
        self.index = None
        return CompileFailure(kind, body.decode("utf-8", "replace")) if kind else body


class _Pool:
    def __init__(self, size: int) -> None:
        self.size = size
        self.processes: list[subprocess.Popen] = []

    def run(self, sources: Sequence[tuple[Path, bytes]]) -> dict[int, Compiled]:
        """Results by index: all of them, or those received before a worker broke or missed a deadline."""
        order = sorted(range(len(sources)), key=lambda i: -len(sources[i][1]))  # largest first
        results: dict[int, Compiled] = {}
        finished = False
        try:
            workers = [_Worker(self._start()) for _ in range(self.size)]
            for worker in workers:
                if order:
                    index = order.pop(0)
                    worker.give(index, self._request(worker.process, index, sources))
            while any(w.index is not None for w in workers):
                for worker, readable in self._ready(workers):
                    if not readable:
                        worker.write()
                        continue
                    index, result = worker.index, worker.read()
                    if result is not None:
                        results[index] = result
                        if order:
                            index = order.pop(0)
                            worker.give(index, self._request(worker.process, index, sources))
            finished = True
        except _PoolBroken:
            pass
        finally:
            self._stop(kill=not finished)
        return results

    @staticmethod
    def _ready(workers: list[_Worker]) -> list[tuple[_Worker, bool]]:
        """The busy workers with a reply to read (True) or room for their request (False), once one
        is; _PoolBroken when the earliest reply's deadline passes first."""
        import select  # only a run with a pool pays for importing it

        busy = [w for w in workers if w.index is not None]
        wait = min(w.due for w in busy) - time.monotonic()
        if wait <= 0:
            raise _PoolBroken()  # a worker stopped, hung or starved: the rest is compiled here
        poller, ends = select.poll(), {}
        for worker in busy:
            ends[worker.process.stdout.fileno()] = (worker, True)
            poller.register(worker.process.stdout.fileno(), select.POLLIN)
            if worker.outgoing:
                ends[worker.process.stdin.fileno()] = (worker, False)
                poller.register(worker.process.stdin.fileno(), select.POLLOUT)
        return [ends[fd] for fd, _ in poller.poll(max(1, int(wait * 1000) + 1))]

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
    def _request(process: subprocess.Popen, index: int, sources: Sequence[tuple[Path, bytes]]) -> bytes:
        """The request frame for source INDEX, to be written to PROCESS."""
        path, data = sources[index]
        name = str(path).encode("utf-8", "surrogateescape")
        return _FRAME.pack(len(name), len(data)) + name + data

    def _stop(self, kill: bool) -> None:
        """End every worker: a closed stdin ends an idle one; after a failure, a missed deadline or an
        interruption (KILL) none is left compiling (SIGKILL ends a stopped one too)."""
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
