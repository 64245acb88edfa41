"""Which processes hold a flock on an open file: the pid a refused run names.

Read from /proc/locks (Linux), since the lock file's own content names only the last run that
locked it exclusively, not whoever holds it now (a reader holding a shared lock writes nothing).
"""
from __future__ import annotations

import os

PROC_LOCKS = "/proc/locks"


def holders(fd: int) -> list[int]:
    """The pids holding a flock on the file FD is open on (this process excluded); [] when unknown."""
    found = os.fstat(fd)
    inode = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}:{found.st_ino}"
    try:
        with open(PROC_LOCKS, encoding="ascii", errors="replace") as table:
            lines = table.read(1 << 20).splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        fields = line.split()
        if "->" in fields:  # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode and fields[4].isdigit():
            pid = int(fields[4])
            if pid != os.getpid() and pid not in pids:
                pids.append(pid)
    return pids


def holder_text(fd: int) -> str:
    """'pid 123' (or 'pids 123, 456'), else 'another process'."""
    pids = holders(fd)
    if not pids:
        return "another process"
    return f"pid{'s' if len(pids) > 1 else ''} {', '.join(map(str, pids))}"
