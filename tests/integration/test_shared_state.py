"""Gateway-wide state with several workers: local rate limits are exact for the whole machine,
upstream-level and global limits are shared by routes, and an outlier ejection made by one
worker is applied by every worker."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess, read_response
from tests.integration.test_reload import admin_json

RATE = 50  # per second
BURST = 25
LOAD_SECONDS = 5.0  # the scenario: a burst, then steady load above the rate


class KeepAliveClients:
    """Threads each sending GETs back to back on one keep-alive connection; statuses and the
    time of each answer are recorded."""

    def __init__(self, port: int, path: str, connections: int) -> None:
        self.port = port
        self.path = path
        self.stamps: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(connections)
        ]

    def _run(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            try:
                connection.request("GET", self.path)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException) as error:
                with self._lock:
                    self.errors.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                continue
            with self._lock:
                self.stamps.append((time.monotonic(), response.status))
        connection.close()

    def run_for(self, seconds: float) -> None:
        for thread in self._threads:
            thread.start()
        self._stop.wait(seconds)
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def counts(self) -> Counter[int]:
        return Counter(status for _, status in self.stamps)


def worker_requests(gateway: GatewayProcess) -> list[int]:
    gateway.metrics_text()  # /admin/workers reports counts as of the last scrape
    return [w["requests"] for w in admin_json(gateway, "/admin/workers")[1]["workers"]]


@pytest.mark.parametrize("workers", [1, 2])
def test_local_limit_is_exact_for_the_whole_gateway(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    workers: int,
) -> None:
    gateway = start_gateway(
        {
            "workers": workers,
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [
                {
                    "name": "api",
                    "upstream": "app",
                    "rate_limit": {"rate": f"{RATE}/s", "burst": BURST, "key": "route"},
                }
            ],
        }
    )
    # Enough connections that SO_REUSEPORT gives each worker some (all on one: 2**-11).
    load = KeepAliveClients(gateway.port, "/echo/limited", connections=12)
    load.run_for(LOAD_SECONDS)
    assert not load.errors, load.errors[:3]
    counts = load.counts()
    assert set(counts) <= {200, 429}, counts
    first = min(stamp for stamp, _ in load.stamps)
    last_admitted = max(stamp for stamp, status in load.stamps if status == 200)
    expected = BURST + RATE * (last_admitted - first)
    admitted = counts[200]
    assert counts[429] > admitted, "the load must exceed the limit for the test to mean much"
    assert abs(admitted - expected) <= 0.05 * expected, (admitted, expected)
    per_worker = worker_requests(gateway)
    assert len(per_worker) == (workers if workers > 1 else 0)
    assert all(count > 0 for count in per_worker), per_worker  # both workers took traffic
    print(
        f"workers={workers}: admitted {admitted}, expected {expected:.1f}, per worker {per_worker}"
    )


def _get(gateway: GatewayProcess, path: str) -> tuple[int, dict[str, str]]:
    sock = gateway.connect()  # a new connection each time: spread over the workers
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        status, headers, _ = read_response(sock)
    finally:
        sock.close()
    return status, headers


@pytest.mark.parametrize("workers", [1, 2])
def test_upstream_and_global_limits_are_shared_by_routes(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    workers: int,
) -> None:
    backend = f"127.0.0.1:{app_backend.port}"
    one = {"rate": "1/h", "key": "route"}  # nothing refills during the test
    gateway = start_gateway(
        {
            "workers": workers,
            "rate_limit": {**one, "burst": 7, "name": "everyone"},
            "upstreams": {
                "app": {"instances": [backend], "rate_limit": {**one, "burst": 4}},
                "other": {"instances": [backend]},
            },
            "routes": [
                {"name": "a", "match": {"path": {"prefix": "/a"}}, "upstream": "app"},
                {
                    "name": "b",
                    "match": {"path": {"prefix": "/b"}},
                    "upstream": "app",
                    "rate_limit": {**one, "burst": 1},
                },
                {"name": "c", "match": {"path": {"prefix": "/c"}}, "upstream": "other"},
            ],
        }
    )
    statuses = [_get(gateway, "/a")[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert _get(gateway, "/b")[0] == 200  # 4 of the upstream's 4, 4 of the global 7
    status, headers = _get(gateway, "/a")  # the upstream's bucket is empty, whatever the route
    assert status == 429
    assert '"upstream0"' in headers["ratelimit"]
    assert headers["ratelimit-policy"] == '"upstream0";q=1;w=3600, "everyone";q=1;w=3600'
    status, headers = _get(gateway, "/b")
    assert status == 429
    assert headers["ratelimit-policy"].startswith('"limit0";q=1;w=3600, "upstream0"')
    # The refused requests gave back what they took from the global bucket: 3 are left.
    assert [_get(gateway, "/c")[0] for _ in range(4)] == [200, 200, 200, 429]
    assert '"everyone"' in _get(gateway, "/c")[1]["ratelimit"]


class ClosingBackend:
    """Accepts connections and closes them at once (a broken instance); counts them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def closing_backend() -> Iterator[ClosingBackend]:
    backend = ClosingBackend()
    yield backend
    backend.close()


def test_an_ejection_by_one_worker_applies_in_every_worker(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    closing_backend: ClosingBackend,
) -> None:
    bad = f"127.0.0.1:{closing_backend.port}"
    gateway = start_gateway(
        {
            "workers": 2,
            "upstreams": {
                "flaky": {
                    "instances": [f"127.0.0.1:{app_backend.port}", bad],
                    "outlier": {
                        "consecutive_gateway_failures": 3,
                        "base_ejection_time": "2m",
                        "max_ejection_percent": 50,
                    },
                    "retry": {"attempts": 2},  # the client sees 200: its connection stays open
                }
            },
            "routes": [{"name": "flaky", "upstream": "flaky"}],
        }
    )

    def bad_state() -> dict[str, Any]:
        upstream = admin_json(gateway, "/admin/upstreams")[1]["upstreams"][0]
        return next(i for i in upstream["instances"] if i["address"] == bad)

    # One keep-alive connection: only the worker that holds it sees the failures.
    sock = gateway.connect()
    try:
        for _ in range(40):
            sock.sendall(b"GET /name HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(sock)[0] == 200
            if bad_state()["state"] == "ejected":
                break
    finally:
        sock.close()
    state = bad_state()
    assert state["state"] == "ejected", state  # the supervisor shows the ejection
    assert state["ejection"]["ejected_for_seconds"] > 60
    # A /metrics scrape asks every worker and each answers after the messages sent to it
    # before, so once it returns every worker has processed the ejection broadcast.
    before = worker_requests(gateway)
    attempts = closing_backend.accepted
    assert attempts >= 3
    statuses = [_get(gateway, "/name")[0] for _ in range(40)]
    served = [b - a for a, b in zip(before, worker_requests(gateway), strict=True)]
    assert statuses == [200] * 40
    assert all(n > 0 for n in served), served  # both workers took part
    assert closing_backend.accepted == attempts  # neither worker tried the ejected instance
    log = gateway.log()
    assert log.count("ejected after consecutive failures") == 1, log  # one worker decided
    # ... and the supervisor and the other worker applied its decision.
    assert log.count("ejected by another worker") == 2, log
