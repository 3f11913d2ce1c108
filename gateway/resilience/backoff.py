"""Retry backoff (exponential, full jitter) and ``Retry-After`` parsing.

Full jitter (AWS architecture blog, "Exponential Backoff and Jitter"): the delay before retry
``n`` is uniform in ``[0, min(cap, base * 2 ** (n - 1))]``. Spreading retries over the whole
interval avoids synchronised waves of retries from many clients after a shared failure.
"""

from __future__ import annotations

import random
from calendar import timegm

# RFC 9110 §5.6.7: IMF-fixdate is preferred, but recipients MUST accept the two obsolete forms.
_MONTHS = {
    b"jan": 1,
    b"feb": 2,
    b"mar": 3,
    b"apr": 4,
    b"may": 5,
    b"jun": 6,
    b"jul": 7,
    b"aug": 8,
    b"sep": 9,
    b"oct": 10,
    b"nov": 11,
    b"dec": 12,
}


def full_jitter_backoff(
    retry: int, rng: random.Random, base: float = 0.025, cap: float = 0.25
) -> float:
    """Delay in seconds before retry number ``retry`` (1 for the first retry)."""
    exponent = max(0, retry - 1)
    ceiling = cap if exponent >= 32 else min(cap, base * (1 << exponent))
    return rng.random() * ceiling


class Backoff:
    """Full-jitter backoff with its parameters and RNG bound (one per upstream)."""

    __slots__ = ("base", "cap", "rng")

    def __init__(
        self, base: float = 0.025, cap: float = 0.25, rng: random.Random | None = None
    ) -> None:
        if base < 0 or cap < 0:
            raise ValueError("backoff base and cap must not be negative")
        self.base = base
        self.cap = cap
        self.rng = rng if rng is not None else random.Random()

    def delay(self, retry: int) -> float:
        return full_jitter_backoff(retry, self.rng, self.base, self.cap)


def _parse_time(text: bytes) -> tuple[int, int, int] | None:
    parts = text.split(b":")
    if len(parts) != 3 or not all(len(part) == 2 and part.isdigit() for part in parts):
        return None
    hour, minute, second = (int(part) for part in parts)
    if hour > 23 or minute > 59 or second > 60:  # 60: leap second
        return None
    return hour, minute, second


def parse_http_date(value: bytes) -> float | None:
    """Seconds since the epoch of an HTTP-date (RFC 9110 §5.6.7), or None if malformed.

    IMF-fixdate ``Sun, 06 Nov 1994 08:49:37 GMT``; obsolete RFC 850
    ``Sunday, 06-Nov-94 08:49:37 GMT``; asctime ``Sun Nov  6 08:49:37 1994``.
    """
    fields = value.strip().split()
    try:
        if len(fields) == 6 and fields[0].endswith(b","):  # IMF-fixdate
            if fields[5] != b"GMT" or len(fields[1]) != 2 or len(fields[3]) != 4:
                return None
            day = int(fields[1])
            month = _MONTHS.get(fields[2].lower())
            year = int(fields[3])
            clock = _parse_time(fields[4])
        elif len(fields) == 4 and fields[0].endswith(b","):  # RFC 850
            if fields[3] != b"GMT":
                return None
            date = fields[1].split(b"-")
            if len(date) != 3 or len(date[0]) != 2 or len(date[2]) != 2:
                return None
            day = int(date[0])
            month = _MONTHS.get(date[1].lower())
            two_digit = int(date[2])
            # RFC 9110 §5.6.7: a two-digit year more than 50 years in the future is in the past
            # century; without a clock here, 70..99 → 19xx, 00..69 → 20xx (the usual pivot).
            year = 1900 + two_digit if two_digit >= 70 else 2000 + two_digit
            clock = _parse_time(fields[2])
        elif len(fields) == 5:  # asctime
            month = _MONTHS.get(fields[1].lower())
            day = int(fields[2])
            clock = _parse_time(fields[3])
            if len(fields[4]) != 4:
                return None
            year = int(fields[4])
        else:
            return None
    except ValueError:
        return None
    if month is None or clock is None or not 1 <= day <= 31:
        return None
    hour, minute, second = clock
    try:
        return float(timegm((year, month, day, hour, minute, second, 0, 0, 0)))
    except (OverflowError, ValueError):
        return None


def parse_retry_after(
    value: bytes | str, now_epoch: float, cap: float | None = None
) -> float | None:
    """Seconds to wait per a ``Retry-After`` value (RFC 9110 §10.2.3): ``delay-seconds`` or an
    HTTP-date (a date in the past means 0). Capped at ``cap`` when given. None when malformed.
    """
    raw = value.encode("latin-1") if isinstance(value, str) else value
    raw = raw.strip()
    if not raw:
        return None
    if raw.isdigit():  # delay-seconds = 1*DIGIT
        seconds = float(int(raw))
    else:
        when = parse_http_date(raw)
        if when is None:
            return None
        seconds = max(0.0, when - now_epoch)
    if cap is not None and seconds > cap:
        return cap
    return seconds
