"""Run a program whose behaviour is hostile (a `--python` interpreter, the selftest) bounded in time,
output and descendants.

Hand-written because subprocess's communicate(timeout) reads without a limit, and after a timeout
ends only the direct child and then waits for the pipes to close, which any descendant holding them
(one that called setsid, or double-forked) delays forever. Here:

- stdout is read up to a cap, then reading stops and the run is ended (its answer is refused
  anyway); of stderr the last bytes are kept; neither read outlives the deadline, whoever holds
  the pipes;
- every process the run started is ended when it finishes, at the deadline, or when the caller
  is interrupted: for the run, ernie-patch is a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so
  an orphan (double fork, setsid) is re-parented to it instead of init; the processes descending
  from the program or re-parented to ernie-patch since it started (where prctl is unavailable: also
  those of the program's session) are found through /proc, each frozen with SIGSTOP until a walk
  finds no new one (a stopped process cannot fork), then all killed with SIGKILL; only the killed
  processes are reaped. (No cgroup: ernie-patch does not assume a writable cgroup tree.)
"""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from typing import Iterator, NamedTuple

STDOUT_CAP = 1 << 20
STDERR_TAIL = 1 << 16
CHUNK = 1 << 16
POLL_S = 0.05  # how often the program's exit is checked where no pidfd tells it
GRACE_S = 1.0  # after the run's processes are killed, the longest wait for their pipes and exits
FREEZE_ROUNDS = 200  # walks of /proc before giving up on a process tree that outruns them
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


class Finished(NamedTuple):  # not a dataclass: the fast path (--python) does not load dataclasses
    """How a bounded run ended."""

    code: int | None  # the program's exit status; None when it was ended (deadline, stdout over the cap)
    stdout: bytes  # at most the cap
    stdout_over: bool  # it printed more than the cap on stdout (and was ended)
    stderr: bytes  # the last bytes it printed on stderr
    timed_out: bool


def run_bounded(argv: list[str], timeout: float, stdout_cap: int = STDOUT_CAP,
                stderr_tail: int = STDERR_TAIL) -> Finished:
    """Run ARGV (stdin empty) for at most TIMEOUT seconds; OSError when it cannot be started."""
    import subprocess  # only runs of another program pay for it

    deadline = time.monotonic() + timeout
    with _subreaper() as reaping:
        before = _own_children()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True, close_fds=True)
        tree, reading = _Tree(process, before, reaping), None
        try:
            reading = _Reading(process, stdout_cap, stderr_tail)
            ended = reading.until(deadline, tree.end)
        finally:
            tree.end()  # whatever happened: a deadline, the cap, an interrupt, or done
            if reading is not None:
                reading.close()
    timed_out = ended == "deadline"
    code = None if timed_out or reading.over else process.returncode
    return Finished(code, bytes(reading.out), reading.over, bytes(reading.err[-stderr_tail:]), timed_out)


class _Reading:
    """The program's stdout (first CAP bytes) and stderr (last TAIL bytes), read as they come."""

    def __init__(self, process, cap: int, tail: int) -> None:  # process: subprocess.Popen
        import selectors

        self.process, self.cap, self.tail = process, cap, tail
        self.out, self.err = bytearray(), bytearray()
        self.over = False
        self.selector = selectors.DefaultSelector()
        self.selector.register(process.stdout, selectors.EVENT_READ, "out")
        self.selector.register(process.stderr, selectors.EVENT_READ, "err")
        self.exit_fd = _pidfd(process.pid)
        if self.exit_fd is not None:
            self.selector.register(self.exit_fd, selectors.EVENT_READ, "exit")

    def until(self, deadline: float, on_exit) -> str:
        """Read until both pipes are closed ("done"), stdout passes the cap ("over") or DEADLINE
        ("deadline"). When the program exits, ON_EXIT ends what it left running, and the pipes
        are read for at most GRACE_S more (a process outside the reach of _Tree.end may hold them)."""
        exited = False
        while self._pipes_open():
            now = time.monotonic()
            if now >= deadline:
                return "done" if exited else "deadline"
            wait = deadline - now if self.exit_fd is not None or exited else min(POLL_S, deadline - now)
            for key, _ in self.selector.select(wait):
                if key.data == "exit":
                    self.selector.unregister(key.fileobj)
                elif self._read(key) == "over":
                    return "over"
            if not exited and _exited(self.process.pid):
                exited = True
                on_exit()
                deadline = min(deadline, time.monotonic() + GRACE_S)
        return "done"

    def _pipes_open(self) -> bool:
        return any(key.data in ("out", "err") for key in self.selector.get_map().values())

    def _read(self, key) -> str | None:
        try:
            chunk = os.read(key.fd, CHUNK)
        except BlockingIOError:
            return None
        if not chunk:
            self.selector.unregister(key.fileobj)
            return None
        if key.data == "err":
            self.err += chunk
            if len(self.err) > 2 * self.tail:
                del self.err[:-self.tail]
            return None
        self.out += chunk
        if len(self.out) > self.cap:
            del self.out[self.cap:]
            self.over = True
            return "over"
        return None

    def close(self) -> None:
        self.selector.close()
        if self.exit_fd is not None:
            os.close(self.exit_fd)
        self.process.stdout.close()
        self.process.stderr.close()


def _exited(pid: int) -> bool:
    """Whether child PID has exited, leaving it unreaped (its pid and session stay its own until
    _Tree.end has found what it left)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when PID exits (Linux >= 5.3), else None (then polled)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


@contextmanager
def _subreaper() -> Iterator[bool]:
    """This process as a child subreaper for the block (whether it is): orphans of the run come to
    it, not to init. Where prctl is unavailable, _members adds the run's session to its descendants."""
    libc = _libc()
    previous = None
    if libc is not None:
        import ctypes

        flag = ctypes.c_int(0)
        if libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 \
                and libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            previous = flag.value
    try:
        yield previous is not None
    finally:
        if previous is not None:
            libc.prctl(_PR_SET_CHILD_SUBREAPER, previous, 0, 0, 0)


def _libc():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return None


def _processes() -> dict[int, tuple[int, int]]:
    """Every visible process: pid -> (parent pid, session id), from /proc/PID/stat."""
    table: dict[int, tuple[int, int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        try:
            table[int(name)] = (int(fields[1]), int(fields[3]))
        except (IndexError, ValueError):
            continue
    return table


def _children_files() -> bool:
    """Whether /proc lists each thread's children (CONFIG_PROC_CHILDREN): a walk of the run's tree
    then reads a few files instead of every process's stat."""
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _children(pid: int) -> list[int]:
    """The children of PID, from /proc/PID/task/*/children; none when it is gone."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children", "rb") as handle:
                found += [int(child) for child in handle.read().split()]
        except (OSError, ValueError):
            continue
    return found


def _own_children() -> set[int]:
    me = os.getpid()
    if _children_files():
        return set(_children(me))
    return {pid for pid, (parent, _) in _processes().items() if parent == me}


def _members(leader: int, before: set[int], reaping: bool) -> set[int]:
    """The processes of the run led by LEADER: it, its descendants, the processes re-parented to this
    one since the run started (not in BEFORE) and theirs. Without REAPING (no subreaper, orphans go
    to init) also every process of the leader's session and theirs, from a scan of all processes."""
    me = os.getpid()
    if reaping and _children_files():
        children = _children
        roots = {leader} | (set(_children(me)) - before)
    else:
        table = _processes()
        by_parent: dict[int, list[int]] = {}
        for pid, (parent, _) in table.items():
            by_parent.setdefault(parent, []).append(pid)
        children = lambda pid: by_parent.get(pid, [])  # noqa: E731
        roots = {leader} | (set(by_parent.get(me, [])) - before)
        roots |= {pid for pid, (_, session) in table.items() if session == leader}
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children(pid))
    return {pid for pid in found if pid > 1 and pid != me}


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except OSError:  # gone already
        pass


class _Tree:
    """The processes of one run, ended once: frozen, then killed, then the killed ones reaped."""

    def __init__(self, process, before: set[int], reaping: bool) -> None:  # process: subprocess.Popen
        self.process, self.before, self.reaping = process, before, reaping
        self.ended = False

    def end(self) -> None:
        """End every process of the run (see _members), the program too. Idempotent."""
        if self.ended:
            return
        leader = self.process.pid
        try:
            os.killpg(leader, signal.SIGSTOP)  # its own group at once; those that left it are walked to
        except OSError:
            pass
        frozen: set[int] = set()
        for _ in range(FREEZE_ROUNDS):
            new = _members(leader, self.before, self.reaping) - frozen
            if not new:
                break
            for pid in new:
                _signal(pid, signal.SIGSTOP)
            frozen |= new
        try:
            os.killpg(leader, signal.SIGKILL)
        except OSError:
            pass
        for pid in frozen:
            _signal(pid, signal.SIGKILL)
        _reap(self.process, frozen)
        self.ended = True


def _reap(process, killed: set[int]) -> None:
    """Wait (at most GRACE_S) for PROCESS and the other KILLED processes that are this one's children:
    an orphan re-parented here, or whose parent (killed too) dies meanwhile."""
    import subprocess

    until = time.monotonic() + GRACE_S
    try:
        process.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    pending = killed - {process.pid}
    while pending and time.monotonic() < until:
        for pid in sorted(pending):
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not (yet) this process's child: gone, or its parent still dying
                reaped = 0 if os.path.exists(f"/proc/{pid}") else pid
            if reaped:
                pending.discard(pid)
        if pending:
            time.sleep(0.01)
