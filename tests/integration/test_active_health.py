"""Active health checks through a real gateway: a failing instance stops getting traffic."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.backends import AppBackend, RawBackend
from tests.integration.conftest import GatewayProcess
from tests.metrics_text import by_label, metric_sum


def _sick(buffer: bytes) -> bytes | None:
    if b"\r\n\r\n" not in buffer:
        return None
    return b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nsick"


@pytest.fixture(scope="module")
def sick_backend() -> Iterator[RawBackend]:
    backend = RawBackend(_sick)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def checked_gateway(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    sick_backend: RawBackend,
) -> GatewayProcess:
    return start_gateway(
        {
            "upstreams": {
                "checked": {
                    "instances": [
                        f"127.0.0.1:{app_backend.port}",
                        f"127.0.0.1:{sick_backend.port}",
                    ],
                    "health": {
                        "path": "/healthz",
                        "interval": "100ms",
                        "timeout": "1s",
                        "healthy_threshold": 1,
                        "unhealthy_threshold": 1,
                    },
                    # Only active checks decide here: no retries, no passive ejection.
                    "retry": {"attempts": 1},
                    "outlier": {"enabled": False},
                }
            },
            "routes": [{"name": "checked", "upstream": "checked"}],
        }
    )


def _instance_states(gateway: GatewayProcess) -> dict[str, float]:
    text = gateway.metrics_text()
    return by_label(text, "gateway_upstream_instances", "state", upstream="checked")


def test_unhealthy_instance_gets_no_traffic(checked_gateway: GatewayProcess) -> None:
    deadline = time.monotonic() + 10
    while _instance_states(checked_gateway).get("unhealthy") != 1.0:
        assert time.monotonic() < deadline, _instance_states(checked_gateway)
        time.sleep(0.05)
    assert _instance_states(checked_gateway)["healthy"] == 1.0
    transitions = metric_sum(
        checked_gateway.metrics_text(),
        "gateway_health_transitions_total",
        to="unhealthy",
        upstream="checked",
    )
    assert transitions >= 1
    for _ in range(10):
        with urllib.request.urlopen(checked_gateway.base_url + "/echo/health", timeout=5) as r:
            assert r.status == 200
            assert json.loads(r.read())["backend"] == "app-1"
