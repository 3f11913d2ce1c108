"""Hash keys for ``ring_hash`` / ``maglev``: which part of a request decides the instance.

Specs (config ``hash_key``): ``header:NAME``, ``cookie:NAME``, ``client_ip``, ``path``,
``query:NAME``. A request without the part yields ``None``; the hash balancers then pick as if
no key were given (a random instance), as Envoy does for a missing hash policy value.

Also the key hash itself: ``hash_key_bytes`` is CRC-32 (C speed, ~60 ns) followed by
MurmurHash3's 32-bit finaliser so that similar keys (``user-1``, ``user-2``) land far apart.
It is stable across processes and runs, unlike ``hash()``, so every worker maps a key the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from urllib.parse import unquote_to_bytes
from zlib import crc32

Headers = Iterable[tuple[bytes, bytes]]
KeyFunction = Callable[..., bytes | None]

_MASK32 = 0xFFFFFFFF


def mix32(value: int) -> int:
    """MurmurHash3 fmix32: full avalanche of a 32-bit value."""
    value ^= value >> 16
    value = (value * 0x85EBCA6B) & _MASK32
    value ^= value >> 13
    value = (value * 0xC2B2AE35) & _MASK32
    value ^= value >> 16
    return value


def hash_key_bytes(key: bytes) -> int:
    """Stable, well-spread 32-bit hash of a request key."""
    value = crc32(key)
    value ^= value >> 16
    value = (value * 0x85EBCA6B) & _MASK32
    value ^= value >> 13
    value = (value * 0xC2B2AE35) & _MASK32
    return value ^ (value >> 16)


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")


def cookie_value(cookies_header: bytes, name: bytes) -> bytes | None:
    """Value of cookie ``name`` in a Cookie header (RFC 6265 §4.2.1: ``a=b; c=d``)."""
    for part in cookies_header.split(b";"):
        cookie_name, sep, value = part.partition(b"=")
        if sep and cookie_name.strip() == name:
            value = value.strip()
            # RFC 6265 §4.1.1: a cookie value may be wrapped in double quotes.
            if len(value) >= 2 and value[:1] == b'"' and value[-1:] == b'"':
                value = value[1:-1]
            return value
    return None


def query_value(query: bytes, name: bytes) -> bytes | None:
    """First value of parameter ``name`` in a query string (``application/x-www-form-urlencoded``
    rules: ``+`` is a space, percent escapes decoded)."""
    for part in query.split(b"&"):
        raw_name, _, value = part.partition(b"=")
        if unquote_to_bytes(raw_name.replace(b"+", b" ")) == name:
            return unquote_to_bytes(value.replace(b"+", b" "))
    return None


def compile_hash_key(spec: str) -> KeyFunction:
    """Turn a spec into a function of the request parts (same keywords as
    :func:`hash_key_from`). Validates the spec once, so per-request work is only the lookup."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind == "header":
        if not arg:
            raise ValueError("hash_key 'header:' needs a header name")
        header_name = arg.lower().encode("latin-1")

        def from_header(*, headers: Headers = (), **_: object) -> bytes | None:
            # Names arrive lowercased (the listener folds them; RFC 9110 §5.1: case-insensitive).
            values = [value for name, value in headers if name == header_name]
            # Several field lines of one name combine with commas (RFC 9110 §5.3).
            return b", ".join(values) if values else None

        return from_header
    if kind == "cookie":
        if not arg:
            raise ValueError("hash_key 'cookie:' needs a cookie name")
        cookie_name = arg.encode("latin-1")

        def from_cookie(*, cookies_header: bytes | None = None, **_: object) -> bytes | None:
            if not cookies_header:
                return None
            return cookie_value(cookies_header, cookie_name)

        return from_cookie
    if kind == "query":
        if not arg:
            raise ValueError("hash_key 'query:' needs a parameter name")
        param = arg.encode("latin-1")

        def from_query(*, query: bytes | str = b"", **_: object) -> bytes | None:
            return query_value(_as_bytes(query), param) if query else None

        return from_query
    if arg:
        raise ValueError(f"hash_key {kind!r} takes no argument")
    if kind == "client_ip":

        def from_client_ip(*, client_ip: bytes | str | None = None, **_: object) -> bytes | None:
            return _as_bytes(client_ip) if client_ip else None

        return from_client_ip
    if kind == "path":

        def from_path(*, path: bytes | str = b"", **_: object) -> bytes | None:
            return _as_bytes(path) if path else None

        return from_path
    raise ValueError(
        f"unknown hash_key {spec!r} (header:NAME, cookie:NAME, client_ip, path, query:NAME)"
    )


def hash_key_from(
    spec: str,
    *,
    headers: Headers = (),
    cookies_header: bytes | None = None,
    client_ip: bytes | str | None = None,
    path: bytes | str = b"",
    query: bytes | str = b"",
) -> bytes | None:
    """The hash key of a request per ``spec``; ``None`` when the request lacks that part.

    ``headers`` are (lowercased name, value) byte pairs as the listener collects them;
    ``cookies_header`` is the Cookie header's value; ``query`` is the raw query string without
    ``?``. The data plane should keep a :func:`compile_hash_key` function per upstream.
    """
    return compile_hash_key(spec)(
        headers=headers, cookies_header=cookies_header, client_ip=client_ip, path=path, query=query
    )
