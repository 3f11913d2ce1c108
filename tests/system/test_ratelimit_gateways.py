"""Two gateway processes enforce one Redis-backed limit together, and survive Redis failing."""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess
from tests.metrics_text import by_label
from tests.system.redis_fixture import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, re-exported for pytest

RATE = 50  # per second
BURST = 25


@pytest.fixture
def backend() -> Iterator[AppBackend]:
    app = AppBackend("rl")
    yield app
    app.close()


@pytest.fixture
def gateways(
    tmp_path: Path, redis_server: RedisServer, backend: AppBackend
) -> Iterator[list[GatewayProcess]]:
    config: dict[str, Any] = {
        # Generous: a healthy Redis on loopback must never time out, even on a busy machine.
        "redis": {"url": redis_server.url, "timeout": "500ms"},
        "upstreams": {"app": {"instances": [f"127.0.0.1:{backend.port}"]}},
        "routes": [
            {
                "name": "api",
                "upstream": "app",
                "rate_limit": {
                    "rate": f"{RATE}/s",
                    "burst": BURST,
                    "key": "route",
                    "store": "redis",
                    "on_store_error": "local",
                },
            }
        ],
    }
    started = []
    try:
        for index in range(2):
            workdir = tmp_path / f"gw{index}"
            workdir.mkdir()
            started.append(GatewayProcess(config, workdir))
        yield started
    finally:
        for gateway in started:
            gateway.stop()


class Load:
    """Threads sending GETs on keep-alive connections to each gateway, counting statuses."""

    def __init__(self, gateways: list[GatewayProcess], threads_per_gateway: int = 3) -> None:
        self.counts: Counter[int] = Counter()
        self.stamps: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(gateway.port,), daemon=True)
            for gateway in gateways
            for _ in range(threads_per_gateway)
        ]

    def _run(self, port: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        while not self._stop.is_set():
            try:
                connection.request("GET", "/echo/rl")
                response = connection.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException) as error:
                with self._lock:
                    self.errors.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                continue
            with self._lock:
                self.counts[status] += 1
                self.stamps.append((time.monotonic(), status))
        connection.close()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def _decisions(gateway: GatewayProcess) -> Counter[str]:
    counts = by_label(gateway.metrics_text(), "gateway_ratelimit_decisions_total", "result")
    return Counter({result: int(count) for result, count in counts.items()})


def _wait_for(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_two_gateways_share_one_limit_within_five_percent(gateways: list[GatewayProcess]) -> None:
    load = Load(gateways)
    started = time.monotonic()
    load.start()
    time.sleep(5.0)  # the scenario itself is a 5-second burst-then-steady load
    load.stop()
    assert not load.errors, load.errors[:3]
    first = min(stamp for stamp, _ in load.stamps)
    last_admitted = max(stamp for stamp, status in load.stamps if status == 200)
    elapsed = last_admitted - first
    expected = BURST + RATE * elapsed
    admitted = load.counts[200]
    assert load.counts[429] > admitted, "the load must exceed the limit for the test to mean much"
    assert abs(admitted - expected) <= 0.05 * expected, (admitted, expected, elapsed)
    assert set(load.counts) <= {200, 429}
    assert started <= first


def test_redis_stopping_and_returning_fails_no_request(
    gateways: list[GatewayProcess], redis_server: RedisServer
) -> None:
    load = Load(gateways, threads_per_gateway=2)
    load.start()
    try:
        _wait_for(lambda: load.counts[200] > BURST, "no traffic admitted")
        redis_server.stop()
        _wait_for(
            lambda: all(_decisions(g)["store_error"] > 0 for g in gateways),
            "decisions never fell back to the local bucket",
        )
        fallback = sum(_decisions(g)["store_error"] for g in gateways)
        redis_server.start()

        # Back on Redis: decisions stop being made by the fallback.
        def settled() -> bool:
            nonlocal fallback
            now = sum(_decisions(g)["store_error"] for g in gateways)
            steady = now == fallback
            fallback = now
            return steady

        _wait_for(lambda: (time.sleep(0.5), settled())[1], "still deciding locally after restart")
    finally:
        load.stop()
    assert not load.errors, load.errors[:3]
    assert set(load.counts) <= {200, 429}, load.counts
