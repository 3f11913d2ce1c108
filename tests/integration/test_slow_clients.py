"""Slow clients are cut off by their own timeouts and never blamed on an upstream.

Real gateway processes, raw sockets, short configured timeouts (docs/slow-clients.md):
- a slow but steady upload lasting longer than the upstream read timeout succeeds, and the
  instance is not ejected (the read timer starts once the request was sent whole);
- a client that stops mid-body gets 408 ``client_body_timeout`` (a slow upstream: 504
  ``upstream_timeout``), counted apart;
- a client that reads nothing is closed at ``send_timeout`` and the memory comes back;
- ``max_connections`` holds for the whole gateway with ``workers: 2``; clients over it get 503.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess, is_closed, read_response, read_until_close
from tests.metrics_text import metric_sum, metric_value

GUARD = 15.0  # upper bound of every poll below; the expected events take about a second


def _metric(process: GatewayProcess, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` that carry all of ``labels``."""
    return metric_sum(process.metrics_text(), name, **labels)


def _poll(condition: Callable[[], bool], what: str, within: float = GUARD) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def slow(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    log_path = tmp_path_factory.mktemp("slow-access") / "access.log"
    process = start_gateway(
        {
            "limits": {
                "client_body_timeout": "1s",
                "send_timeout": "1s",
                "client_write_buffer": "16KiB",
            },
            "access_log": {"path": str(log_path)},
            "upstreams": {
                "app": {
                    "instances": [f"127.0.0.1:{app_backend.port}"],
                    "timeouts": {"read": "1s"},
                    # The first failure would eject the only instance: any blame shows.
                    "outlier": {"consecutive_failures": 1, "max_ejection_percent": 100},
                    "retry": {"attempts": 2, "on": ["reset", "timeout", 504]},
                },
                # Its own outlier state: the 504 test must not eject "app".
                "app-slow": {
                    "instances": [f"127.0.0.1:{app_backend.port}"],
                    "timeouts": {"read": "1s"},
                },
            },
            "routes": [
                {"name": "slow", "match": {"path": {"prefix": "/slow"}}, "upstream": "app-slow"},
                {"name": "app", "match": {"path": {"prefix": "/"}}, "upstream": "app"},
            ],
        }
    )
    process.access_log_path = log_path  # type: ignore[attr-defined]
    yield process
    process.stop()


def _access_records(process: GatewayProcess) -> list[dict[str, Any]]:
    path: Path = process.access_log_path  # type: ignore[attr-defined]
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ejected(process: GatewayProcess) -> float:
    return _metric(process, "gateway_upstream_instances", upstream="app", state="ejected")


def test_steady_slow_upload_longer_than_read_timeout_succeeds(slow: GatewayProcess) -> None:
    # 24 KiB at 8 KiB/s: about 3 s of upload against a 1 s upstream read timeout.
    piece = b"u" * 2048
    pieces = 12
    sock = slow.connect()
    try:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: t.test\r\ncontent-length: %d\r\n\r\n"
            % (len(piece) * pieces)
        )
        started = time.monotonic()
        for i in range(pieces):
            sock.sendall(piece)
            # The traffic shape under test (a steady rate), not a wait for a condition.
            time.sleep(max(0.0, started + (i + 1) * 0.25 - time.monotonic()))
        assert time.monotonic() - started > 2.0  # longer than the read timeout, twice over
        status, _, body = read_response(sock)
        assert status == 200, body
        assert json.loads(body)["body_size"] == len(piece) * pieces
    finally:
        sock.close()
    assert _ejected(slow) == 0
    assert _metric(slow, "gateway_retries_total") == 0
    # The instance still serves.
    sock = slow.connect()
    try:
        sock.sendall(b"GET /name HTTP/1.1\r\nHost: t.test\r\n\r\n")
        assert read_response(sock)[0] == 200
    finally:
        sock.close()


def test_client_stalling_mid_body_gets_408(slow: GatewayProcess) -> None:
    before_408 = _metric(slow, "gateway_requests_total", code="408")
    sock = slow.connect()
    try:
        sock.sendall(
            b"POST /echo/stall HTTP/1.1\r\nHost: t.test\r\ncontent-length: 1000\r\n\r\n"
            + b"s" * 100
        )
        started = time.monotonic()
        data, closed = read_until_close(sock, timeout=GUARD)
        waited = time.monotonic() - started
    finally:
        sock.close()
    assert closed
    assert 0.8 < waited < 5.0, waited  # client_body_timeout is 1 s (the sweep is 100 ms)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert b"connection: close" in head.lower()
    assert json.loads(body)["error"] == "client_body_timeout"
    _poll(
        lambda: _metric(slow, "gateway_requests_total", code="408") == before_408 + 1,
        "the 408 in gateway_requests_total",
    )
    assert _metric(slow, "gateway_client_timeouts_total", kind="body") >= 1
    assert _ejected(slow) == 0  # the upstream waited for the client: not its failure
    assert _metric(slow, "gateway_retries_total") == 0
    _poll(
        lambda: any(r.get("error") == "client_body_timeout" for r in _access_records(slow)),
        "the access log to name client_body_timeout",
    )


def test_slow_upstream_is_504_not_408(slow: GatewayProcess) -> None:
    sock = slow.connect()
    try:
        sock.sendall(b"GET /slow?delay=3 HTTP/1.1\r\nHost: t.test\r\n\r\n")
        status, _, body = read_response(sock)
    finally:
        sock.close()
    assert status == 504
    assert json.loads(body)["error"] == "upstream_timeout"
    _poll(
        lambda: any(
            r.get("status") == 504 and r.get("error") == "upstream_timeout"
            for r in _access_records(slow)
        ),
        "the access log to name upstream_timeout",
    )
    assert _metric(slow, "gateway_requests_total", code="504") >= 1


def _slow_reader(process: GatewayProcess, path: bytes) -> socket.socket:
    """A client that asks for a large response and never reads it (tiny receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", process.port))
    sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: t.test\r\n\r\n")
    return sock


def test_slow_reader_closed_at_send_timeout(slow: GatewayProcess) -> None:
    before = _metric(slow, "gateway_client_timeouts_total", kind="send")
    # More than the kernel buffers of both sockets hold, so the gateway has bytes waiting.
    size = 64 * 1024 * 1024
    sock = _slow_reader(slow, b"/stream/%d" % size)
    try:
        _poll(
            lambda: _metric(slow, "gateway_client_timeouts_total", kind="send") == before + 1,
            "the send timeout",
        )
        data, closed = read_until_close(sock, timeout=GUARD)
        assert closed
        assert len(data) < size  # cut off, not finished
    finally:
        sock.close()
    _poll(lambda: _metric(slow, "gateway_client_connections") == 0, "connections to close")


def test_memory_of_slow_readers_comes_back(slow: GatewayProcess) -> None:
    clients = 40
    for _ in range(3):  # warm-up: pools and buffers in use once
        warm = slow.connect()
        warm.sendall(b"GET /bytes/1048576 HTTP/1.1\r\nHost: t.test\r\n\r\n")
        read_response(warm)
        warm.close()
    baseline = slow.rss_kib()
    before = _metric(slow, "gateway_client_timeouts_total", kind="send")
    readers = [_slow_reader(slow, b"/stream/%d" % (16 * 1024 * 1024)) for _ in range(clients)]
    try:
        _poll(
            lambda: _metric(slow, "gateway_client_timeouts_total", kind="send") >= before + clients,
            "send_timeout to close every slow reader",
            within=60.0,  # the backend streams to every reader first: slow on a loaded machine
        )
    finally:
        for sock in readers:
            sock.close()
    _poll(lambda: _metric(slow, "gateway_client_connections") == 0, "connections to close")
    # Generous: within 30% (or 16 MiB) of the baseline once the flood is over.
    bound = max(baseline * 1.3, baseline + 16 * 1024)
    _poll(lambda: slow.rss_kib() <= bound, f"RSS back under {bound / 1024:.0f} MiB")
    assert metric_value(slow.metrics_text(), "gateway_malloc_trims_total") is not None


# -- max_connections across workers -----------------------------------------------------------


@pytest.fixture(scope="module")
def capped_workers(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], app_backend: AppBackend
) -> Iterator[GatewayProcess]:
    process = start_gateway(
        {
            "workers": 2,
            "limits": {"max_connections": 4},
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [{"name": "app", "match": {"path": {"prefix": "/"}}, "upstream": "app"}],
        }
    )
    yield process
    process.stop()


def test_max_connections_is_gateway_wide_with_two_workers(capped_workers: GatewayProcess) -> None:
    held = [capped_workers.connect() for _ in range(4)]
    extra: list[socket.socket] = []
    try:
        for sock in held:
            sock.sendall(b"GET /name HTTP/1.1\r\nHost: t.test\r\n\r\n")
            assert read_response(sock)[0] == 200
        # Per worker, 4 more would pass (4 each); gateway-wide, every one of them is refused.
        for _ in range(4):
            sock = capped_workers.connect()
            extra.append(sock)
            sock.sendall(b"GET /name HTTP/1.1\r\nHost: t.test\r\n\r\n")
            status, headers, body = read_response(sock)
            assert status == 503, body
            assert headers["retry-after"] == "1"
            assert json.loads(body)["error"] == "max_connections"
            assert is_closed(sock, timeout=GUARD)
        for sock in held:  # the admitted ones are untouched
            sock.sendall(b"GET /name HTTP/1.1\r\nHost: t.test\r\n\r\n")
            assert read_response(sock)[0] == 200
        _poll(
            lambda: (
                _metric(
                    capped_workers, "gateway_connections_refused_total", reason="max_connections"
                )
                == 4
            ),
            "the refusals in the merged worker metrics",
        )
        # A freed slot serves a new client, whichever worker it lands on.
        held.pop().close()

        def admitted() -> bool:
            with capped_workers.connect() as sock:
                sock.sendall(b"GET /name HTTP/1.1\r\nHost: t.test\r\n\r\n")
                return read_response(sock)[0] == 200

        _poll(admitted, "the freed slot")
    finally:
        for sock in held + extra:
            sock.close()
