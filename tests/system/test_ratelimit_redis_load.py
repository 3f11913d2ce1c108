"""A reachable Redis never makes a shared limit admit more than its rate plus the stated error,
on a loaded machine and behind a slow network (two real gateway processes, a real redis-server).

The stated error (docs/ratelimit.md): over any window of ``t`` seconds the gateways admit at
most ``burst + rate * t`` plus one more burst and ``rate * timeout`` (decisions in flight when
the deciding side changes), when ``fallback_share`` is 1/N for N gateways.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.integration.backends import AppBackend
from tests.integration.conftest import ROOT, GatewayProcess
from tests.metrics_text import by_label
from tests.system.redis_fixture import RedisServer, free_port, redis_server

__all__ = ["redis_server"]  # the fixture, re-exported for pytest

RATE = 200  # per second: a few times below what a loaded 2-core machine can offer
BURST = 20
LOAD_SECONDS = 5.0


@pytest.fixture
def backend() -> Iterator[AppBackend]:
    app = AppBackend("rl")
    yield app
    app.close()


def _config(redis_url: str, backend: AppBackend, **redis: Any) -> dict[str, Any]:
    return {
        "redis": {"url": redis_url, **redis},
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


@contextmanager
def two_gateways(tmp_path: Path, config: dict[str, Any]) -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    try:
        for index in range(2):
            workdir = tmp_path / f"gw{index}"
            workdir.mkdir()
            started.append(GatewayProcess(config, workdir))
        yield started
    finally:
        for gateway in started:
            gateway.stop()


@contextmanager
def cpu_hogs(count: int, longest: float) -> Iterator[None]:
    """``count`` processes spinning on the CPU, each ending by itself after ``longest`` s."""
    code = f"import time\nend = time.monotonic() + {longest}\nwhile time.monotonic() < end: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


class DelayProxy:
    """A TCP proxy to Redis that holds every chunk Redis sends for a random delay (in order:
    a chunk never overtakes the one before it). Runs its own event loop in a thread."""

    def __init__(self, target_port: int, delays: tuple[float, float], seed: int = 7) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.delays = delays
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.delayed_chunks = 0

    def __enter__(self) -> DelayProxy:
        self._thread.start()
        assert self._ready.wait(10), "delay proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()
        self._server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        queue: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()

        async def upstream() -> None:  # gateway -> Redis: as is
            while data := await reader.read(65536):
                up_writer.write(data)
            up_writer.close()

        async def downstream() -> None:  # Redis -> gateway: each chunk held, in order
            release = 0.0
            while data := await up_reader.read(65536):
                release = max(release, time.monotonic() + self._rng.uniform(*self.delays))
                queue.append((release, data))
                self.delayed_chunks += 1
                arrived.set()
            queue.append((0.0, b""))
            arrived.set()

        async def deliver() -> None:
            while True:
                while not queue:
                    arrived.clear()
                    await arrived.wait()
                release, data = queue.popleft()
                if not data:
                    break
                await asyncio.sleep(max(0.0, release - time.monotonic()))
                writer.write(data)
            writer.close()

        tasks = [asyncio.ensure_future(t()) for t in (upstream, downstream, deliver)]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            task.cancel()


def decisions(gateway: GatewayProcess) -> dict[str, int]:
    text = gateway.metrics_text()
    counts = by_label(text, "gateway_ratelimit_decisions_total", "result")
    return {result: int(count) for result, count in counts.items()}


class Measured:
    def __init__(self, results: list[dict[str, Any]]) -> None:
        self.counts: dict[int, int] = {}
        for result in results:
            assert not result["errors"], result["errors"]
            for status, count in result["counts"].items():
                self.counts[int(status)] = self.counts.get(int(status), 0) + count
        self.admitted = self.counts.get(200, 0)
        first = min(result["first"] for result in results)
        self.elapsed = max(result["last_admitted"] for result in results) - first


def measure(gateways: list[GatewayProcess], seconds: float, connections: int = 16) -> Measured:
    """Drive each gateway from a load-generator process of its own for ``seconds``."""
    argv = [sys.executable, "-m", "tests.system.loadgen", "--connections", str(connections)]
    argv += ["--seconds", str(seconds), "--path", "/echo/rl"]
    procs = [
        subprocess.Popen([*argv, "--port", str(g.port)], cwd=ROOT, stdout=subprocess.PIPE)
        for g in gateways
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 30)
        assert proc.returncode == 0, out
        results.append(json.loads(out))
    measured = Measured(results)
    assert set(measured.counts) <= {200, 429}, measured.counts
    return measured


def bound(elapsed: float, timeout: float) -> float:
    """burst + rate * t, plus the stated error: one burst and rate * timeout, plus 5 % for the
    client-side clock of the measurement."""
    expected = BURST + RATE * elapsed
    return expected * 1.05 + BURST + RATE * timeout


def test_two_gateways_stay_within_the_limit_on_a_loaded_machine(
    tmp_path: Path, redis_server: RedisServer, backend: AppBackend
) -> None:
    """The default redis.timeout, a CPU hog on every core: no over-admission."""
    config = _config(redis_server.url, backend, fallback_share=0.5)
    with two_gateways(tmp_path, config) as gateways:
        with cpu_hogs(os.cpu_count() or 1, longest=LOAD_SECONDS + 5):
            measured = measure(gateways, LOAD_SECONDS)
        counts = [decisions(g) for g in gateways]
    admitted, elapsed = measured.admitted, measured.elapsed
    assert measured.counts[429] > admitted, "the load must exceed the limit to mean much"
    assert admitted <= bound(elapsed, 0.05), (admitted, elapsed, counts)
    # Not starved either: the hogs slow the gateways, they must not make the limit collapse.
    assert admitted >= 0.6 * (BURST + RATE * elapsed), (admitted, elapsed, counts)
    assert all(c.get("allowed", 0) > 0 for c in counts), counts  # both drew from Redis


def test_two_gateways_stay_within_the_limit_behind_a_slow_redis(
    tmp_path: Path, redis_server: RedisServer, backend: AppBackend
) -> None:
    """Every Redis answer is held 0-40 ms against a 20 ms timeout: many decisions fall back,
    Redis stays reachable, and the two gateways together still admit about the limit."""
    timeout = 0.02
    with DelayProxy(redis_server.port, (0.0, 0.04)) as proxy:
        config = _config(
            f"redis://127.0.0.1:{proxy.port}/0", backend, timeout="20ms", fallback_share=0.5
        )
        with two_gateways(tmp_path, config) as gateways:
            measured = measure(gateways, LOAD_SECONDS)
            counts = [decisions(g) for g in gateways]
        assert proxy.delayed_chunks > 0
    admitted, elapsed = measured.admitted, measured.elapsed
    fallback = sum(c.get("store_error", 0) for c in counts)  # admitted by the fallback
    from_redis = sum(c.get("allowed", 0) for c in counts)
    assert measured.counts[429] > admitted
    assert fallback > 0 and from_redis > 0, counts  # both paths decided: the test means much
    assert admitted <= bound(elapsed, timeout), (admitted, elapsed, counts)
    assert admitted >= 0.6 * (BURST + RATE * elapsed), (admitted, elapsed, counts)
