"""Response header lines and the error body of rate-limit decisions.

Header syntax follows draft-ietf-httpapi-ratelimit-headers-11 (May 2026), §3 and §4: both fields
are Structured Field Lists (RFC 9651) of Items whose value is a String naming the policy.

    RateLimit-Policy: "default";q=100;w=10        (§3.2: quota q units per window w seconds)
    RateLimit: "default";r=50;t=30                (§4.2: r units available, effective window t s)

``q`` and ``r`` are non-negative Integers, ``w`` a non-zero Integer of seconds (§3.1.3), ``t`` a
non-negative Integer of seconds (§4.1.2). When a response also carries Retry-After, Retry-After
must not point earlier than the end of the effective window (§6): on a denial ``t`` equals it.

Lines are rendered as ``name: value\\r\\n`` bytes with lowercase names, ready to be appended to a
response head. The legacy ``X-RateLimit-Limit/-Remaining/-Reset`` trio (GitHub/Twitter style,
Reset in delta seconds as in draft-polli-ratelimit-headers) is optional.
"""

from __future__ import annotations

import orjson

__all__ = [
    "error_body",
    "legacy_lines",
    "policy_item",
    "policy_line",
    "ratelimit_line",
    "retry_after_line",
    "sf_string",
]


def sf_string(value: str) -> bytes:
    """An RFC 9651 §3.3.3 String: printable ASCII in quotes, ``"`` and ``\\`` escaped."""
    if any(not (0x20 <= ord(ch) <= 0x7E) for ch in value):
        raise ValueError(f"policy name {value!r} must be printable ASCII")
    return b'"' + value.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'


def policy_item(name: str, quota: int, window: int) -> bytes:
    """One Quota Policy Item (§3.1)."""
    if quota < 0:
        raise ValueError("quota must be non-negative")
    if window < 1:
        raise ValueError("window must be a non-zero number of seconds")
    return b"%s;q=%d;w=%d" % (sf_string(name), quota, window)


def policy_line(items: list[bytes]) -> bytes:
    """``ratelimit-policy`` line for all policies of a route (constant: rendered at build)."""
    return b"ratelimit-policy: " + b", ".join(items) + b"\r\n"


def ratelimit_line(items: list[tuple[bytes, int, int]]) -> bytes:
    """``ratelimit`` line from ``(quoted name, r, t)`` per policy (§4.1)."""
    return (
        b"ratelimit: "
        + b", ".join(b"%s;r=%d;t=%d" % (name, max(r, 0), max(t, 0)) for name, r, t in items)
        + b"\r\n"
    )


def retry_after_line(seconds: int) -> bytes:
    """RFC 9110 §10.2.3 delay-seconds; callers pass an integer >= 1."""
    return b"retry-after: %d\r\n" % seconds


def legacy_lines(limit: int, remaining: int, reset: int) -> bytes:
    return b"x-ratelimit-limit: %d\r\nx-ratelimit-remaining: %d\r\nx-ratelimit-reset: %d\r\n" % (
        limit,
        max(remaining, 0),
        max(reset, 0),
    )


def error_body(status: int, code: str, message: str, request_id: bytes | str) -> bytes:
    """The gateway's JSON error document (same shape as the listener's other errors)."""
    if isinstance(request_id, bytes):
        request_id = request_id.decode("ascii", "replace")
    return orjson.dumps(
        {"error": code, "message": message, "status": status, "request_id": request_id}
    )
