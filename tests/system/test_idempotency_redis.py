"""Idempotency-Key replay store on a real Redis shared by two real gateway processes."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import GatewayProcess
from tests.integration.idempotency_backend import (
    CountingBackend,
    fresh_key,
    header_of,
    idempotency_count,
    poll,
    raw_post,
    status_of,
    without_per_request_lines,
)
from tests.system.redis_fixture import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, re-exported for pytest

REDIS_TIMEOUT = 0.3  # generous for a loaded machine; the store-down checks bound on it


@pytest.fixture
def backend() -> Iterator[CountingBackend]:
    counting = CountingBackend()
    yield counting
    counting.close()


def _config(redis: RedisServer, backend: CountingBackend, **idempotency: Any) -> dict[str, Any]:
    return {
        "redis": {"url": redis.url, "timeout": f"{int(REDIS_TIMEOUT * 1000)}ms"},
        "upstreams": {"app": {"instances": [f"127.0.0.1:{backend.port}"]}},
        "routes": [
            {
                "name": "payments",
                "upstream": "app",
                "retry": {"attempts": 1},
                "idempotency": {"store": "redis", **idempotency},
            }
        ],
    }


def _start(config: dict[str, Any], tmp_path: Path, count: int) -> list[GatewayProcess]:
    started = []
    for index in range(count):
        workdir = tmp_path / f"gw{index}"
        workdir.mkdir()
        started.append(GatewayProcess(config, workdir))
    return started


def test_fifty_concurrent_duplicates_through_two_gateways(
    tmp_path: Path, redis_server: RedisServer, backend: CountingBackend
) -> None:
    """50 POSTs with one key, at once, through two gateways on one Redis: the backend
    executes exactly one; one client gets its response, the others 409; every later
    duplicate, through either gateway, gets a byte-identical replay."""
    gateways = _start(_config(redis_server, backend), tmp_path, 2)
    try:
        key = fresh_key()
        results: list[bytes] = []
        lock = threading.Lock()
        barrier = threading.Barrier(50)

        def send(index: int) -> None:
            barrier.wait()
            response = raw_post(gateways[index % 2].port, path="/pay?delay_ms=300", key=key)
            with lock:
                results.append(response)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(50)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        statuses = Counter(status_of(response) for response in results)
        assert len(results) == 50
        assert backend.executed == 1, statuses
        originals = [
            r
            for r in results
            if status_of(r) == 201 and header_of(r, b"idempotent-replayed") is None
        ]
        assert len(originals) == 1, statuses
        assert set(statuses) <= {201, 409}, statuses
        poll(lambda: sum(idempotency_count(g, "stored") for g in gateways) >= 1)
        for index in range(20):
            replay = raw_post(gateways[index % 2].port, path="/pay?delay_ms=300", key=key)
            assert header_of(replay, b"idempotent-replayed") == b"true"
            assert without_per_request_lines(replay) == without_per_request_lines(originals[0])
        assert backend.executed == 1
        assert sum(idempotency_count(g, "conflict") for g in gateways) == statuses[409]
    finally:
        for gateway in gateways:
            gateway.stop()


def test_mismatch_ttl_and_crash_release(
    tmp_path: Path, redis_server: RedisServer, backend: CountingBackend
) -> None:
    (gateway,) = _start(_config(redis_server, backend, ttl="1s"), tmp_path, 1)
    try:
        # First, on a fresh upstream connection (a pooled one that breaks before answering is
        # retried once on a new one: RFC 9112 §9.3.1, the key marks the POST idempotent).
        # The backend dies mid-request: 502, key released, the client's retry runs once.
        backend.die_times = 1
        crash = fresh_key()
        assert status_of(raw_post(gateway.port, path="/die", key=crash)) == 502
        poll(lambda: idempotency_count(gateway, "released") >= 1)
        retry = raw_post(gateway.port, path="/die", key=crash)
        assert status_of(retry) == 201
        poll(lambda: idempotency_count(gateway, "stored") >= 1)
        again = raw_post(gateway.port, path="/die", key=crash)
        assert without_per_request_lines(again) == without_per_request_lines(retry)
        assert backend.executed == 2
        key = fresh_key()
        assert status_of(raw_post(gateway.port, key=key)) == 201
        poll(lambda: idempotency_count(gateway, "stored") >= 2)
        assert status_of(raw_post(gateway.port, key=key, body=b'{"amount":9}')) == 422
        # After the TTL (Redis PX expiry) the key is fresh.
        poll(lambda: header_of(raw_post(gateway.port, key=key), b"idempotent-replayed") is None)
        assert backend.executed == 4
    finally:
        gateway.stop()


@pytest.mark.parametrize("on_store_error", ["allow", "deny"])
@pytest.mark.parametrize("failure", ["stopped", "frozen"])
def test_redis_down_fallback_without_hanging(
    tmp_path: Path,
    redis_server: RedisServer,
    backend: CountingBackend,
    on_store_error: str,
    failure: str,
) -> None:
    """Redis killed, or frozen (SIGSTOP: connection open, nothing answers): allow forwards
    without the guarantee, deny answers 503; no request waits much past redis.timeout."""
    (gateway,) = _start(_config(redis_server, backend, on_store_error=on_store_error), tmp_path, 1)
    try:
        assert status_of(raw_post(gateway.port, key=fresh_key())) == 201  # connected and working
        poll(lambda: idempotency_count(gateway, "stored") >= 1)
        if failure == "stopped":
            redis_server.stop()
        else:
            redis_server.pause()
        expected = 201 if on_store_error == "allow" else 503
        for _ in range(5):
            started = time.monotonic()
            response = raw_post(gateway.port, key=fresh_key())
            elapsed = time.monotonic() - started
            assert status_of(response) == expected
            assert elapsed < REDIS_TIMEOUT + 1.0, elapsed  # bounded by the store timeout
        assert idempotency_count(gateway, "store_error") == 5
        # Requests without a key never touch the store.
        assert status_of(raw_post(gateway.port, key=None)) == 201
    finally:
        if failure == "frozen":
            redis_server.resume()
        gateway.stop()
