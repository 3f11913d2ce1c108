"""Durations ("250ms", "5s", "2m") and sizes ("64KiB", "1MiB", 512) as users write them.

The regular expressions here are also published in the JSON Schema, so an editor and the
validator accept exactly the same spellings.
"""

from __future__ import annotations

import re
from fractions import Fraction

DURATION_UNITS: dict[str, Fraction] = {
    "us": Fraction(1, 1_000_000),
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
}
SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}

_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
# Unanchored bodies; callers use re.fullmatch, the JSON Schema wraps them in ^...$.
DURATION_PATTERN = _NUMBER + "(?:" + "|".join(sorted(DURATION_UNITS, key=len, reverse=True)) + ")"
SIZE_PATTERN = _NUMBER + "(?:" + "|".join(sorted(SIZE_UNITS, key=len, reverse=True)) + ")?"

_DURATION_RE = re.compile(f"({_NUMBER})({'|'.join(DURATION_UNITS)})")
_SIZE_RE = re.compile(f"({_NUMBER})({'|'.join(SIZE_UNITS)})?")
_BARE_NUMBER_RE = re.compile(r"[+-]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?")

DURATION_HINT = "a number followed by us, ms, s, m or h (e.g. '250ms', '5s', '2m', '1.5s')"
SIZE_HINT = (
    "a byte count or a number followed by B, KB, MB, GB, TB, KiB, MiB, GiB or TiB "
    "(e.g. 512, '64KiB', '10MB')"
)


def parse_duration(text: str) -> float:
    """Return the duration in seconds; ValueError (saying the expected format) if malformed."""
    if not isinstance(text, str):  # YAML may hand over any scalar
        raise ValueError(f"expected a duration string: {DURATION_HINT}")
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        if _BARE_NUMBER_RE.fullmatch(text.strip()):
            # A bare number is ambiguous (seconds? milliseconds?), so it is refused.
            raise ValueError(f"duration {text!r} has no unit: expected {DURATION_HINT}")
        raise ValueError(f"invalid duration {text!r}: expected {DURATION_HINT}")
    return float(Fraction(match.group(1)) * DURATION_UNITS[match.group(2)])


def parse_size(value: str | int) -> int:
    """Return the size in bytes; ValueError (saying the expected format) if malformed."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size: {SIZE_HINT}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: expected {SIZE_HINT}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size: {SIZE_HINT}")
    match = _SIZE_RE.fullmatch(value)
    if match is None:
        raise ValueError(f"invalid size {value!r}: expected {SIZE_HINT}")
    amount = Fraction(match.group(1)) * SIZE_UNITS[match.group(2) or "B"]
    if amount.denominator != 1:
        raise ValueError(f"size {value!r} is not a whole number of bytes")
    return int(amount)
