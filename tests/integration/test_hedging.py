"""Hedged requests: a slow first try is overtaken by a second one on another instance."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.backends import LoopThread, _cancel_other_tasks
from tests.integration.conftest import GatewayProcess
from tests.metrics_text import metric_sum


class DelayedServer:
    """Answers every request with its name after ``delay`` seconds; counts requests."""

    def __init__(self, name: str, delay: float) -> None:
        self.name = name.encode()
        self.delay = delay
        self.requests = 0
        self.thread = LoopThread()
        self.server = self.thread.call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, _, buffer = buffer.partition(b"\r\n\r\n")
                    self.requests += 1
                    await asyncio.sleep(self.delay)
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s"
                        % (len(self.name), self.name)
                    )
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()
        self.thread.call(_cancel_other_tasks())
        self.thread.stop()


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[DelayedServer, DelayedServer]]:
    slow, fast = DelayedServer("slow", 3.0), DelayedServer("fast", 0.0)
    yield slow, fast
    slow.close()
    fast.close()


@pytest.fixture(scope="module")
def hedged(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    servers: tuple[DelayedServer, DelayedServer],
) -> GatewayProcess:
    slow, fast = servers
    return start_gateway(
        {
            "upstreams": {
                "pair": {
                    "instances": [f"127.0.0.1:{slow.port}", f"127.0.0.1:{fast.port}"],
                    "hedge": {"after": "100ms"},
                    "outlier": {"enabled": False},
                }
            },
            "routes": [{"name": "pair", "upstream": "pair"}],
        }
    )


def _retries(gateway: GatewayProcess, reason: str) -> float:
    return metric_sum(gateway.metrics_text(), "gateway_retries_total", reason=reason)


def test_slow_first_try_is_hedged_and_the_fast_answer_wins(
    hedged: GatewayProcess, servers: tuple[DelayedServer, DelayedServer]
) -> None:
    slow, _ = servers
    hedges_before = _retries(hedged, "hedge")
    slow_before = slow.requests
    for _ in range(4):
        started = time.monotonic()
        with urllib.request.urlopen(hedged.base_url + "/work", timeout=10) as response:
            assert response.read() == b"fast"
        # A first try on the slow instance (3 s) is overtaken by its hedge to the fast one.
        assert time.monotonic() - started < 2.0
    slow_first_tries = slow.requests - slow_before
    assert slow_first_tries >= 1
    # Exactly the tries that went to the slow instance were hedged (hedges never go to it: the
    # hedge excludes the first try's instance, and the fast instance never needs one).
    assert _retries(hedged, "hedge") - hedges_before == slow_first_tries


def test_fast_requests_are_not_hedged(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    servers: tuple[DelayedServer, DelayedServer],
) -> None:
    _, fast = servers
    gateway = start_gateway(
        {
            "upstreams": {
                "fast": {"instances": [f"127.0.0.1:{fast.port}"], "hedge": {"after": "1s"}}
            },
            "routes": [{"name": "fast", "upstream": "fast"}],
        }
    )
    for _ in range(10):
        with urllib.request.urlopen(gateway.base_url + "/work", timeout=5) as response:
            assert response.read() == b"fast"
    assert _retries(gateway, "hedge") == 0


def test_post_is_never_hedged(hedged: GatewayProcess) -> None:
    hedges_before = _retries(hedged, "hedge")
    answers = set()
    for _ in range(2):  # one of the two lands on the slow instance and must wait for it
        request = urllib.request.Request(hedged.base_url + "/work", data=b"x", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            answers.add(response.read())
    assert answers == {b"slow", b"fast"}
    assert _retries(hedged, "hedge") == hedges_before
