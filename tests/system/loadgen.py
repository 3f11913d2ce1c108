"""A small HTTP/1.1 load generator process: keep-alive connections driven by one selector loop.

``python -m tests.system.loadgen --port P --connections C --seconds S --path /x`` sends GETs back
to back on every connection for S seconds and prints one JSON object: status counts, the
monotonic time of the first request and of the last 200, and errors. Its own process (own GIL),
so a test can offer several thousand requests per second per gateway, which the threads of the
test process cannot.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import time
from collections import Counter


class _Conn:
    __slots__ = ("buf", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""


def _response_end(buf: bytes) -> tuple[int, int] | None:
    """(status, bytes of the first complete response in ``buf``) or None if incomplete."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buf[:head_end].lower()
    status = int(head[9:12])
    start = head_end + 4
    marker = head.find(b"\r\ncontent-length:")
    if marker >= 0:
        line_end = head.find(b"\r\n", marker + 2)
        length = int(head[marker + 17 : line_end if line_end >= 0 else len(head)])
        return (status, start + length) if len(buf) >= start + length else None
    if b"transfer-encoding: chunked" in head:
        end = buf.find(b"\r\n0\r\n\r\n", start - 2)
        return (status, end + 7) if end >= 0 else None
    return status, start


def run(port: int, connections: int, seconds: float, path: str) -> dict[str, object]:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    selector = selectors.DefaultSelector()
    counts: Counter[int] = Counter()
    errors: list[str] = []
    first = time.monotonic()
    last_admitted = 0.0
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        sock.send(request)
        selector.register(sock, selectors.EVENT_READ, _Conn(sock))
    end = first + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        for key, _ in selector.select(timeout=end - now):
            conn: _Conn = key.data
            try:
                data = conn.sock.recv(65536)
            except OSError as exc:
                errors.append(repr(exc))
                data = b""
            if not data:
                errors.append("connection closed")
                selector.unregister(conn.sock)
                conn.sock.close()
                continue
            conn.buf += data
            while (parsed := _response_end(conn.buf)) is not None:
                status, size = parsed
                conn.buf = conn.buf[size:]
                counts[status] += 1
                if status == 200:
                    last_admitted = time.monotonic()
                conn.sock.send(request)
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    return {
        "counts": {str(k): v for k, v in counts.items()},
        "first": first,
        "last_admitted": last_admitted,
        "errors": errors[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--path", default="/")
    args = parser.parse_args()
    json.dump(run(args.port, args.connections, args.seconds, args.path), sys.stdout)


if __name__ == "__main__":
    main()
