"""Access log, Server-Timing, /admin/upstreams and body-size metrics on a real gateway."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess
from tests.metrics_text import samples


@pytest.fixture(scope="module")
def access_log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs") / "access.log"


@pytest.fixture(scope="module")
def observed(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess],
    app_backend: AppBackend,
    access_log_path: Path,
) -> GatewayProcess:
    return start_gateway(
        {
            "access_log": {"path": str(access_log_path)},
            "metrics": {"buckets": {"overhead": [0.0005, 0.005, 0.05]}},
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [
                {
                    "name": "timed",
                    "match": {"path": {"prefix": "/timed"}},
                    "upstream": "app",
                    "server_timing": True,
                    "rewrite": {"strip_prefix": "/timed", "prefix": "/echo"},
                },
                {"name": "plain", "upstream": "app"},
            ],
        }
    )


def _get(
    gateway: GatewayProcess, path: str, data: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(gateway.base_url + path, data=data)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()


def test_server_timing_only_on_routes_that_ask(observed: GatewayProcess) -> None:
    _, headers, _ = _get(observed, "/timed/x")
    parts = dict(part.strip().split(";dur=") for part in headers["server-timing"].split(","))
    assert set(parts) == {"gateway", "upstream"}
    assert all(float(value) >= 0 for value in parts.values())
    _, plain_headers, _ = _get(observed, "/echo/plain")
    assert "server-timing" not in plain_headers


def test_access_log_has_one_json_line_per_request(
    observed: GatewayProcess, access_log_path: Path
) -> None:
    _, headers, body = _get(observed, "/echo/logged?q=1", data=b"12345")
    request_id = headers["x-request-id"]
    deadline = time.monotonic() + 5
    entry: dict[str, Any] | None = None
    while entry is None:
        assert time.monotonic() < deadline, "no access log line for the request"
        if access_log_path.exists():
            for line in access_log_path.read_text().splitlines():
                record = json.loads(line)
                if record["request_id"] == request_id:
                    entry = record
        time.sleep(0.05)
    assert entry["method"] == "POST"
    assert entry["path"] == "/echo/logged?q=1"
    assert entry["route"] == "plain"
    assert entry["upstream"] == "app"
    assert entry["status"] == 200
    assert entry["bytes_in"] == 5
    assert entry["bytes_out"] == len(body)
    assert entry["client"] == "127.0.0.1"
    assert entry["instance"].startswith("127.0.0.1:")
    assert entry["retries"] == 0
    assert entry["error"] is None
    assert entry["duration"] >= entry["upstream_duration"] > 0


def test_admin_upstreams_lists_instances(observed: GatewayProcess) -> None:
    _get(observed, "/echo/warm")
    with urllib.request.urlopen(observed.admin_url + "/admin/upstreams", timeout=5) as response:
        upstreams = json.loads(response.read())["upstreams"]
    (app,) = upstreams
    assert app["name"] == "app"
    assert app["balancer"] == "round_robin"
    (instance,) = app["instances"]
    assert instance["state"] == "healthy"
    assert instance["available"] is True
    assert instance["weight"] == 1
    assert instance["recent_latency_seconds"] > 0
    assert instance["ejection"]["times_ejected"] == 0


def test_body_size_histograms_and_bucket_override(observed: GatewayProcess) -> None:
    _get(observed, "/echo/sized", data=b"x" * 2000)
    text = observed.metrics_text()
    assert 'gateway_request_body_bytes_bucket{le="10000.0",route="plain"}' in text
    assert 'gateway_response_body_bytes_count{route="plain"}' in text
    overhead_les = {
        sample.labels["le"] for sample in samples(text, "gateway_overhead_seconds_bucket")
    }
    assert overhead_les == {"0.0005", "0.005", "0.05", "+Inf"}


def test_configured_routes_are_declared_before_traffic(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], app_backend: AppBackend
) -> None:
    gateway = start_gateway(
        {
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [{"name": "idle-route", "upstream": "app"}],
        }
    )
    text = gateway.metrics_text()
    assert 'gateway_request_duration_seconds_count{route="idle-route",upstream="app"} 0.0' in text
