"""The grpc active health check in a real gateway process: config → HealthManager → probes
against grpcio-health-checking servicers → instance states in /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.conftest import GatewayProcess
from tests.integration.h2_peers import GrpcServer
from tests.metrics_text import by_label


@pytest.fixture
def grpc_pair() -> Iterator[tuple[GrpcServer, GrpcServer]]:
    serving, sick = GrpcServer(workers=4), GrpcServer(workers=4)
    serving.set_health("pkg.Users", serving=True)
    sick.set_health("pkg.Users", serving=False)
    yield serving, sick
    serving.stop(None)
    sick.stop(None)


def _states(gateway: GatewayProcess) -> dict[str, float]:
    return by_label(gateway.metrics_text(), "gateway_upstream_instances", "state", upstream="users")


def _wait_for_states(gateway: GatewayProcess, healthy: float, unhealthy: float) -> None:
    deadline = time.monotonic() + 15
    while True:
        states = _states(gateway)
        if states.get("healthy") == healthy and states.get("unhealthy", 0.0) == unhealthy:
            return
        assert time.monotonic() < deadline, (states, gateway.log()[-3000:])
        time.sleep(0.05)


def test_grpc_health_check_follows_the_servicers(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    grpc_pair: tuple[GrpcServer, GrpcServer],
) -> None:
    serving, sick = grpc_pair
    gateway = start_gateway(
        {
            "upstreams": {
                "users": {
                    "instances": [serving.authority, sick.authority],
                    "protocol": "h2c",
                    "health": {
                        "type": "grpc",
                        "service": "pkg.Users",
                        "interval": "100ms",
                        "timeout": "1s",
                        "healthy_threshold": 1,
                        "unhealthy_threshold": 1,
                    },
                    "retry": {"attempts": 1},
                    "outlier": {"enabled": False},
                }
            },
            "routes": [{"name": "users", "upstream": "users"}],
        }
    )
    _wait_for_states(gateway, healthy=1.0, unhealthy=1.0)
    sick.set_health("pkg.Users", serving=True)
    _wait_for_states(gateway, healthy=2.0, unhealthy=0.0)
    serving.set_health("pkg.Users", serving=False)
    _wait_for_states(gateway, healthy=1.0, unhealthy=1.0)
