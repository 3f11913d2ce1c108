"""Idempotency-Key replay store with the local store (SQLite in state_dir), real gateway
processes and a backend that counts what it executed (docs/idempotency.md)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
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


@pytest.fixture
def backend() -> Iterator[CountingBackend]:
    counting = CountingBackend()
    yield counting
    counting.close()


def _config(backend: CountingBackend, **idempotency: Any) -> dict[str, Any]:
    return {
        "upstreams": {"app": {"instances": [f"127.0.0.1:{backend.port}"]}},
        "routes": [
            {
                "name": "payments",
                "upstream": "app",
                "idempotency": {"store": "local", **idempotency},
            }
        ],
    }


def _stored(gateway: GatewayProcess, count: float) -> Callable[[], bool]:
    return lambda: idempotency_count(gateway, "stored") >= count


def test_replay_shared_across_two_workers(
    start_gateway: Callable[..., GatewayProcess], backend: CountingBackend
) -> None:
    """workers: 2 share the SQLite store: duplicates on fresh connections (either worker) are
    replayed byte for byte and never reach the backend."""
    gateway = start_gateway({**_config(backend), "workers": 2})
    key = fresh_key()
    first = raw_post(gateway.port, key=key)
    assert status_of(first) == 201
    assert header_of(first, b"idempotent-replayed") is None
    poll(_stored(gateway, 1))  # the record is written after the response went out
    replays = [raw_post(gateway.port, key=key) for _ in range(20)]
    assert backend.executed == 1
    for replay in replays:
        assert header_of(replay, b"idempotent-replayed") == b"true"
        assert without_per_request_lines(replay) == without_per_request_lines(first)
    assert idempotency_count(gateway, "replayed") == 20
    # Another client address would be another scope; another key is another request.
    assert status_of(raw_post(gateway.port, key=fresh_key())) == 201
    assert backend.executed == 2


def test_mismatch_missing_and_invalid_keys(
    start_gateway: Callable[..., GatewayProcess], backend: CountingBackend
) -> None:
    gateway = start_gateway(_config(backend, required=True))
    key = fresh_key()
    assert status_of(raw_post(gateway.port, key=key, body=b'{"amount":1}')) == 201
    poll(_stored(gateway, 1))
    # draft §2.7: the same key with another payload is 422, a problem document.
    mismatch = raw_post(gateway.port, key=key, body=b'{"amount":2}')
    assert status_of(mismatch) == 422
    assert header_of(mismatch, b"content-type") == b"application/problem+json"
    # A different path is a different fingerprint too.
    assert status_of(raw_post(gateway.port, path="/pay?x=1", key=key)) == 422
    # draft §2.7: a required key missing is 400.
    assert status_of(raw_post(gateway.port, key=None)) == 400
    assert backend.executed == 1
    # draft §2.1 / RFC 8941 §3.3.3: the value is an sf-string.
    for raw in (b"no-quotes", b'"' + b"k" * 256 + b'"', b'"bad\\e"', b'""'):
        response = raw_post(gateway.port, key=raw)
        assert status_of(response) == 400, raw
        assert header_of(response, b"content-type") == b"application/problem+json"
    assert backend.executed == 1
    assert idempotency_count(gateway, "mismatch") == 2
    assert idempotency_count(gateway, "rejected") == 5
    # Methods outside `methods` (GET) are never guarded.
    assert status_of(raw_post(gateway.port, key=None, extra=b"")) == 400


def test_ttl_expiry_large_response_and_5xx(
    start_gateway: Callable[..., GatewayProcess], backend: CountingBackend
) -> None:
    gateway = start_gateway(_config(backend, ttl="1s", max_response_bytes="1KiB"))
    key = fresh_key()
    assert status_of(raw_post(gateway.port, key=key)) == 201
    poll(_stored(gateway, 1))
    assert header_of(raw_post(gateway.port, key=key), b"idempotent-replayed") == b"true"
    # After the TTL the key is fresh: the next request executes.
    poll(lambda: header_of(raw_post(gateway.port, key=key), b"idempotent-replayed") is None)
    assert backend.executed == 2
    # A response over max_response_bytes is relayed whole but not stored (metric bypassed).
    large_key = fresh_key()
    large = raw_post(gateway.port, path="/pay?size=4096", key=large_key)
    assert status_of(large) == 201 and large.endswith(b"x" * 4096)
    poll(lambda: idempotency_count(gateway, "bypassed") >= 1)
    assert status_of(raw_post(gateway.port, path="/pay?size=4096", key=large_key)) == 201
    assert backend.executed == 4
    # A 5xx frees the key: the client's retry executes.
    failing = fresh_key()
    assert status_of(raw_post(gateway.port, path="/pay?status=500", key=failing)) == 500
    poll(lambda: idempotency_count(gateway, "released") >= 1)
    assert status_of(raw_post(gateway.port, path="/pay?status=500", key=failing)) == 500
    assert backend.executed == 6


def test_concurrent_duplicates_conflict_or_wait(
    start_gateway: Callable[..., GatewayProcess], backend: CountingBackend
) -> None:
    """While the first is in flight, duplicates get 409 (in_flight: conflict); on a route with
    in_flight: wait they are held and replayed once the first finishes."""
    config = _config(backend)
    config["routes"].append(
        {
            "name": "waiting",
            "upstream": "app",
            "match": {"path": {"prefix": "/wait"}},
            "idempotency": {"store": "local", "in_flight": "wait"},
        }
    )
    config["routes"][0]["match"] = {"path": {"prefix": "/pay"}}
    gateway = start_gateway(config)
    for path, expected in (("/pay?delay_ms=500", {201, 409}), ("/wait?delay_ms=500", {201})):
        key = fresh_key()
        before = backend.executed
        results: list[bytes] = []
        lock = threading.Lock()

        def send(
            path: str = path,
            key: bytes = key,
            results: list[bytes] = results,
            lock: threading.Lock = lock,
        ) -> None:
            response = raw_post(gateway.port, path=path, key=key)
            with lock:
                results.append(response)

        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        statuses = Counter(status_of(response) for response in results)
        assert len(results) == 8
        assert backend.executed == before + 1, statuses
        assert set(statuses) <= expected, statuses
        originals = [r for r in results if header_of(r, b"idempotent-replayed") is None]
        if path.startswith("/pay"):
            assert statuses[201] >= 1 and statuses[409] >= 1, statuses
        else:
            assert len(originals) == 1  # one executed, seven replayed
            for response in results:
                assert without_per_request_lines(response) == without_per_request_lines(
                    originals[0]
                )


def test_backend_dies_mid_request_releases_the_key(
    start_gateway: Callable[..., GatewayProcess], backend: CountingBackend
) -> None:
    config = _config(backend)
    config["routes"][0]["retry"] = {"attempts": 1}  # the client retries, not the gateway
    gateway = start_gateway(config)
    backend.die_times = 1
    key = fresh_key()
    assert status_of(raw_post(gateway.port, path="/die", key=key)) == 502
    poll(lambda: idempotency_count(gateway, "released") >= 1)
    retry = raw_post(gateway.port, path="/die", key=key)
    assert status_of(retry) == 201
    poll(_stored(gateway, 1))
    again = raw_post(gateway.port, path="/die", key=key)
    assert without_per_request_lines(again) == without_per_request_lines(retry)
    assert backend.executed == 2  # the crash and the one successful retry


def test_gateway_retry_of_a_keyed_post_stays_within_its_claim(
    start_gateway: Callable[..., GatewayProcess], backend: CountingBackend
) -> None:
    """An Idempotency-Key marks a POST retryable for the gateway (reset, connect failure): the
    retry happens inside the one claim, so the client sees one response, which is stored."""
    gateway = start_gateway(_config(backend))
    backend.die_times = 1
    key = fresh_key()
    first = raw_post(gateway.port, path="/die", key=key)
    assert status_of(first) == 201  # the reset was retried by the gateway
    assert backend.executed == 2
    poll(_stored(gateway, 1))
    assert without_per_request_lines(raw_post(gateway.port, path="/die", key=key)) == (
        without_per_request_lines(first)
    )
    assert backend.executed == 2


def _chunked_post(port: int, key: bytes, pieces: list[bytes], extra: bytes = b"") -> bytes:
    """A chunked keyed POST whose chunks are written one by one (TCP_NODELAY), so that the
    body usually arrives after the head was dispatched: the request is held, then claimed."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.sendall(
            b"POST /pay HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n"
            b"idempotency-key: %b\r\n%b\r\n" % (key, extra)
        )
        for piece in pieces:
            sock.sendall(b"%x\r\n%b\r\n" % (len(piece), piece))
        sock.sendall(b"0\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(header_of(data, b"content-length") or b"0")
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return head + b"\r\n\r\n" + rest
    finally:
        sock.close()


def test_streamed_bodies_are_fingerprinted_whatever_their_framing(
    start_gateway: Callable[..., GatewayProcess], backend: CountingBackend
) -> None:
    """The body digest is taken over the body bytes, not their framing: the same body sent
    chunked in pieces, then with Content-Length, is one request. A keyed body beyond
    max_request_bytes is refused (413) before anything is claimed or forwarded."""
    gateway = start_gateway(_config(backend, max_request_bytes="1KiB"))
    key = fresh_key()
    first = _chunked_post(gateway.port, key, [b'{"amo', b'unt":', b"1}"])
    assert status_of(first) == 201
    poll(_stored(gateway, 1))
    replay = raw_post(gateway.port, key=key, body=b'{"amount":1}')
    assert header_of(replay, b"idempotent-replayed") == b"true"
    assert status_of(_chunked_post(gateway.port, key, [b'{"amount":2}'])) == 422
    big = fresh_key()
    assert status_of(raw_post(gateway.port, key=big, body=b"x" * 2048)) == 413
    assert status_of(_chunked_post(gateway.port, big, [b"x" * 600, b"y" * 600])) == 413
    assert backend.executed == 1


def test_principal_header_scopes_keys(
    start_gateway: Callable[..., GatewayProcess], backend: CountingBackend
) -> None:
    """principal: header:x-api-key: the same key from two API keys is two requests."""
    gateway = start_gateway(_config(backend, principal="header:x-api-key"))
    key = fresh_key()
    alice = raw_post(gateway.port, key=key, extra=b"x-api-key: alice\r\n")
    bob = raw_post(gateway.port, key=key, extra=b"x-api-key: bob\r\n")
    assert status_of(alice) == 201 and status_of(bob) == 201
    assert header_of(alice, b"x-execution") != header_of(bob, b"x-execution")
    poll(_stored(gateway, 2))
    again = raw_post(gateway.port, key=key, extra=b"x-api-key: alice\r\n")
    assert without_per_request_lines(again) == without_per_request_lines(alice)
    assert backend.executed == 2
