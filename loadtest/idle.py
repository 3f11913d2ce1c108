"""Idle keep-alive connections: open N, one request each, hold them, measure the proxy's RSS."""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    content_length: int | None
    keep_alive: bool


def parse_response_head(head: bytes) -> ResponseHead:
    """Status, Content-Length and persistence of an HTTP/1.x response head (RFC 9112 §9.3)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    version, status = parts[0], int(parts[1])
    length: int | None = None
    connection = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"connection":
            connection = value.strip().lower()
    tokens = {t.strip() for t in connection.split(b",")}
    keep_alive = b"keep-alive" in tokens if version == b"HTTP/1.0" else b"close" not in tokens
    return ResponseHead(status, length, keep_alive)


def raise_nofile_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _open_one(host: str, port: int, request: bytes, sem: asyncio.Semaphore) -> Conn:
    async with sem:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        try:
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parsed = parse_response_head(head)
            if parsed.content_length:
                await asyncio.wait_for(reader.readexactly(parsed.content_length), 10)
            if parsed.status != 200:
                raise RuntimeError(f"status {parsed.status}")
            if not parsed.keep_alive:
                raise RuntimeError("server will close the connection")
        except BaseException:
            writer.close()
            raise
        return reader, writer


async def hold_idle_connections(
    host: str,
    port: int,
    count: int,
    measure: Callable[[], int],
    path: str = "/small",
    settle_s: float = 1.0,
    concurrency: int = 100,
) -> tuple[int, int, list[str]]:
    """Open ``count`` keep-alive connections (one request each), then call ``measure`` while
    they are all open and idle. Returns (connections held, measure() result, error samples)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    sem = asyncio.Semaphore(concurrency)
    results = await asyncio.gather(
        *(_open_one(host, port, request, sem) for _ in range(count)), return_exceptions=True
    )
    conns = [r for r in results if not isinstance(r, BaseException)]
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    try:
        await asyncio.sleep(settle_s)  # let the proxy finish its per-request work and go idle
        # The proxy must not have closed them in the meantime.
        alive = [c for c in conns if not c[0].at_eof()]
        value = measure()
    finally:
        for _, writer in conns:
            writer.close()
        for _, writer in conns:
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return len(alive), value, errors[:5]
