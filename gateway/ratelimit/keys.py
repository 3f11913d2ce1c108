"""Rate-limit key extraction: which bucket a request belongs to.

Specs: ``client_ip`` (the peer address, or when the peer is a trusted proxy the rightmost
untrusted address of ``X-Forwarded-For``), ``header:NAME``, ``query:NAME``, ``route`` (one bucket
for the whole route), and a list of these (``[header:x-api-key, route]``) whose parts all must be
present. An extractor is called with what the listener already holds, so no request view object
is allocated:

    extract(peer_ip: str, peer_trusted: bool, headers: list[(lowercase name, value)],
            query: bytes) -> str | bytes | None      # None: the value is missing

Values longer than ``MAX_KEY_BYTES`` are replaced by a digest, so that the bucket table's
memory per key stays small whatever clients send.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = [
    "MAX_KEY_BYTES",
    "KeyExtractor",
    "TrustedAddresses",
    "compile_key",
    "forwarded_client_ip",
    "parse_key_spec",
]

Headers = Sequence[tuple[bytes, bytes]]
KeyExtractor = Callable[[str, bool, Headers, bytes], "str | bytes | None"]

MAX_KEY_BYTES = 128
_SEPARATOR = b"\x00"  # cannot occur in a header value (RFC 9110 §5.5) nor in a raw query


class TrustedAddresses(Protocol):
    """The trusted proxies (``gateway.proxy.headers.TrustedProxies``, or any container)."""

    def __contains__(self, ip: str, /) -> bool: ...


def _bounded(value: bytes) -> bytes:
    if len(value) > MAX_KEY_BYTES:
        return b"#" + hashlib.blake2b(value, digest_size=16).digest()
    return value


def _strip_port(entry: str) -> str:
    """``[2001:db8::1]:443`` -> ``2001:db8::1``; ``192.0.2.1:8080`` -> ``192.0.2.1``."""
    if entry.startswith("["):
        end = entry.find("]")
        return entry[1:end] if end > 0 else entry
    if entry.count(":") == 1:
        return entry.split(":", 1)[0]
    return entry


def forwarded_client_ip(
    peer_ip: str, headers: Headers, trusted: TrustedAddresses, max_hops: int = 32
) -> str:
    """The client address behind a trusted proxy: walk ``X-Forwarded-For`` from the right
    (each proxy appends the address it received from) and take the first hop that is not a
    trusted proxy. Entries left of it were written by the client and are not believed. If every
    entry is trusted, the leftmost one is the client. Several header lines form one list (RFC
    9110 §5.3)."""
    xff: bytes | None = None
    for name, value in headers:
        if name == b"x-forwarded-for":
            xff = value if xff is None else xff + b"," + value
    if xff is None:
        return peer_ip
    hops = [part.strip() for part in xff.split(b",")]
    last = peer_ip
    for raw in reversed(hops[-max_hops:]):
        if not raw:
            continue
        hop = _strip_port(raw.decode("latin-1"))
        if hop not in trusted:
            return hop
        last = hop
    return last


def _client_ip(trusted: TrustedAddresses) -> KeyExtractor:
    def extract(peer_ip: str, peer_trusted: bool, headers: Headers, query: bytes) -> str:
        if not peer_trusted:
            return peer_ip
        return forwarded_client_ip(peer_ip, headers, trusted)

    return extract


def _header(name: bytes) -> KeyExtractor:
    def extract(peer_ip: str, peer_trusted: bool, headers: Headers, query: bytes) -> bytes | None:
        for hname, value in headers:
            if hname == name:
                return _bounded(value) if value else None
        return None

    return extract


def _query(name: bytes) -> KeyExtractor:
    prefix = name + b"="

    def extract(peer_ip: str, peer_trusted: bool, headers: Headers, query: bytes) -> bytes | None:
        if not query:
            return None
        for part in query.split(b"&"):
            if part.startswith(prefix):
                value = part[len(prefix) :]
                return _bounded(value) if value else None
        return None

    return extract


def _route(peer_ip: str, peer_trusted: bool, headers: Headers, query: bytes) -> bytes:
    return b""


def parse_key_spec(spec: str) -> tuple[str, str]:
    """``"header:X-Api-Key"`` -> ``("header", "x-api-key")``; raises ValueError when invalid."""
    if spec in ("client_ip", "route"):
        return spec, ""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in ("header", "query") or not arg:
        raise ValueError(
            f"invalid rate-limit key {spec!r}: expected client_ip, route, header:NAME or query:NAME"
        )
    return kind, arg.lower() if kind == "header" else arg


def _compile_one(spec: str, trusted: TrustedAddresses) -> KeyExtractor:
    kind, arg = parse_key_spec(spec)
    if kind == "client_ip":
        return _client_ip(trusted)
    if kind == "route":
        return _route
    if kind == "header":
        return _header(arg.encode("latin-1"))
    return _query(arg.encode("latin-1"))


def compile_key(spec: str | Sequence[str], trusted: TrustedAddresses = ()) -> KeyExtractor:
    """An extractor for ``spec``; ``trusted`` is the trusted-proxy set (``TrustedProxies``)."""
    if isinstance(spec, str):
        return _compile_one(spec, trusted)
    parts = [_compile_one(item, trusted) for item in spec]
    if not parts:
        raise ValueError("empty rate-limit key list")
    if len(parts) == 1:
        return parts[0]

    def extract(peer_ip: str, peer_trusted: bool, headers: Headers, query: bytes) -> bytes | None:
        values: list[bytes] = []
        for part in parts:
            value = part(peer_ip, peer_trusted, headers, query)
            if value is None:
                return None
            values.append(value.encode("latin-1") if isinstance(value, str) else value)
        return _SEPARATOR.join(values)

    return extract
