"""The one exception type anita raises for bad user input, and the one check of a number read from
the user (a flag, a config file, an adapter's or a model's config.json).

Every message names the thing that is wrong (file, line, tensor, field) and what was expected.
The CLI turns an `AnitaError` into a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import math


class AnitaError(Exception):
    """A problem with the user's input (a file, a tensor, a config field, a flag)."""


class Interrupted(Exception):
    """A run stopped by SIGTERM or SIGINT after saving what it had (see `anita.train.signals`).

    The CLI prints the message and exits with 128 + the signal's number (143 for SIGTERM, 130 for
    SIGINT), the code a shell reports for a process ended by that signal, so a scheduler or a
    script sees that the run did not finish."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def check_number(where: str, value, low=None, high=None, *, low_open: bool = False, high_open: bool = False,
                 integer: bool = False, shown: str | None = None):
    """`value` if it is a finite number (an int with `integer`) within the bounds, else `AnitaError`
    "{where} must be a finite number > 0, got nan". NaN, ±inf, a bool and a float too large for a
    double (JSON's 1e400) are never numbers here: NaN passes every `x < 0` test, so ranges alone miss it.
    `low_open`/`high_open` exclude the bound itself; `shown` is the value as the user wrote it."""
    if integer:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        try:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        except OverflowError:  # an int beyond a double's range
            ok = False
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise AnitaError(f"{where} must be {'an integer' if integer else 'a finite number'}"
                         f"{range_text(low, high, low_open, high_open)}, got {shown or repr(value)[:40]}")
    return value


def range_text(low, high, low_open: bool = False, high_open: bool = False) -> str:
    """' >= 0', ' > 0', ' in (0, 1]' or '' (no bounds): the range in words, for messages."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""
