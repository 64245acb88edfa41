"""Numbers set through the environment (timeouts, worker counts), read here and only here.

A value that is not a plain positive number in ASCII digits (empty, `abc`, `²`, `nan`, `inf`,
`1e999`, `-3`, `0`) means the default, never a failed run; a number past the variable's upper
bound means the bound, so no timeout is disabled or overflows a wait.
"""
from __future__ import annotations

import math
import os


def _text(name: str) -> str:
    return os.environ.get(name, "").strip()


def seconds(name: str, default: float, minimum: float, maximum: float) -> float:
    """The seconds variable NAME says, within [MINIMUM, MAXIMUM]; DEFAULT when it says no positive number."""
    text = _text(name)
    if not text.isascii():  # float() takes other scripts' digits; the variables are documented as ASCII
        return default
    try:
        value = float(text)
    except ValueError:
        return default
    if not math.isfinite(value) or value <= 0:
        return default
    return min(max(value, minimum), maximum)


def count(name: str, maximum: int) -> int | None:
    """The whole number variable NAME says, at most MAXIMUM; None when it says no positive whole number."""
    text = _text(name)
    if not (text.isascii() and text.isdigit()):  # '²'.isdigit() is true, int('²') fails
        return None
    digits = text.lstrip("0")
    if not digits:
        return None
    if len(digits) > 18:  # no int() of thousands of digits (it raises past sys.get_int_max_str_digits)
        return maximum
    return min(int(digits), maximum)
