"""Numbers set through the environment (timeouts, worker counts): a malformed value means the
default, never a failed run."""
from __future__ import annotations

import os


def seconds(name: str, default: float, minimum: float) -> float:
    """The number of seconds variable NAME says (at least MINIMUM), else DEFAULT."""
    try:
        return max(float(os.environ.get(name, default)), minimum)
    except ValueError:
        return default


def count(name: str) -> int | None:
    """The positive whole number variable NAME says, else None."""
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
