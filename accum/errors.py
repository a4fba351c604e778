"""The library's errors and the checks every module shares. No dependencies beyond the standard library.

Library messages name the *parameters* of the function that was called (`batch_size`,
`gradient_checkpointing`), written in backticks; the command line (accum.cli) turns those names
into its flags (`--batch-size`) when it prints them.
"""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """Bad input: the message is one line naming the value and the fix (the command line exits 2)."""


def check_positive_int(name: str, value: Any) -> int:
    """`value` if it is an int > 0 (not a bool); else ConfigError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer (got {value!r})")
    return value


def check_finite(name: str, value: Any, minimum: float | None = None, maximum: float | None = None) -> float:
    """`value` as a float if it is a finite number within [minimum, maximum]; else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number (got {value!r})")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{name} must be finite (got {value!r})")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{name} must be at least {minimum:g} (got {value!r})")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name} must be at most {maximum:g} (got {value!r})")
    return number


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (its type's name when it has none)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]
