"""Rate limits on a real gateway: 429 with the draft's headers, keys, dry run, max_in_flight."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess
from tests.metrics_text import by_label


@pytest.fixture(scope="module")
def limited(
    start_gateway: Callable[[dict[str, Any]], GatewayProcess], app_backend: AppBackend
) -> GatewayProcess:
    upstream = {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}}

    def route(name: str, **extra: Any) -> dict[str, Any]:
        return {
            "name": name,
            "match": {"path": {"prefix": f"/{name}/"}},
            "upstream": "app",
            "rewrite": {"strip_prefix": f"/{name}"},
            **extra,
        }

    return start_gateway(
        {
            "upstreams": upstream,
            "routes": [
                route(
                    "tight",
                    rate_limit={"rate": "1/min", "burst": 3, "name": "tight"},
                    rate_limit_headers=True,
                ),
                route("keyed", rate_limit={"rate": "1/min", "burst": 1, "key": "header:x-api-key"}),
                route(
                    "keyed2", rate_limit={"rate": "1/min", "burst": 1, "key": "header:x-api-key"}
                ),
                route("dry", rate_limit={"rate": "1/min", "burst": 1, "dry_run": True}),
                route(
                    "strict",
                    rate_limit={"rate": "1/min", "key": "header:x-api-key", "missing": "reject"},
                ),
                route("capped", max_in_flight=1),
            ],
        }
    )


def _get(
    gateway: GatewayProcess, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(gateway.base_url + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def _decisions(gateway: GatewayProcess, route: str) -> dict[str, float]:
    text = gateway.metrics_text()
    return by_label(text, "gateway_ratelimit_decisions_total", "result", route=route)


def test_burst_then_429_with_ratelimit_headers(limited: GatewayProcess) -> None:
    statuses = []
    last: tuple[int, dict[str, str], bytes] | None = None
    for _ in range(5):
        last = _get(limited, "/tight/echo")
        statuses.append(last[0])
    assert statuses == [200, 200, 200, 429, 429]
    assert last is not None
    _, headers, body = last
    error = json.loads(body)
    assert error["error"] == "rate_limited"
    assert error["request_id"] == headers["x-request-id"]
    retry_after = int(headers["retry-after"])
    assert retry_after >= 1
    # draft-ietf-httpapi-ratelimit-headers: policy with quota and window, current remaining/reset.
    assert headers["ratelimit-policy"] == '"tight";q=1;w=60'
    assert headers["ratelimit"].startswith('"tight";r=0;t=')
    assert int(headers["ratelimit"].rsplit("t=", 1)[1]) == retry_after
    admitted = _get(limited, "/keyed/echo", {"x-api-key": "headers-check"})
    assert "ratelimit" not in admitted[1]  # headers only where rate_limit_headers is on
    assert _decisions(limited, "tight") == {"allowed": 3.0, "limited": 2.0}


def test_keys_and_routes_have_independent_buckets(limited: GatewayProcess) -> None:
    assert _get(limited, "/keyed/echo", {"x-api-key": "alice"})[0] == 200
    assert _get(limited, "/keyed/echo", {"x-api-key": "alice"})[0] == 429
    assert _get(limited, "/keyed/echo", {"x-api-key": "bob"})[0] == 200
    assert _get(limited, "/keyed2/echo", {"x-api-key": "alice"})[0] == 200


def test_dry_run_refuses_nothing_but_counts(limited: GatewayProcess) -> None:
    assert [_get(limited, "/dry/echo")[0] for _ in range(3)] == [200, 200, 200]
    assert _decisions(limited, "dry") == {"allowed": 1.0, "dry_run": 2.0}


def test_missing_key_rejected_when_configured(limited: GatewayProcess) -> None:
    status, _, body = _get(limited, "/strict/echo")
    assert status == 400
    assert json.loads(body)["error"] == "missing_key"
    assert _get(limited, "/strict/echo", {"x-api-key": "k"})[0] == 200


def test_max_in_flight_answers_503_with_retry_after(
    limited: GatewayProcess, app_backend: AppBackend
) -> None:
    results: list[int] = []
    slow = threading.Thread(
        target=lambda: results.append(_get(limited, "/capped/slow?delay=1&inflight=1")[0])
    )
    slow.start()
    # Once the backend has the slow request, it holds the route's only slot.
    deadline = time.monotonic() + 10
    while not any(r["path"] == "/slow?delay=1&inflight=1" for r in app_backend.requests):
        assert time.monotonic() < deadline, "the slow request never reached the backend"
        time.sleep(0.01)
    status, headers, body = _get(limited, "/capped/echo")
    slow.join()
    assert status == 503
    assert json.loads(body)["error"] == "max_in_flight"
    assert int(headers["retry-after"]) >= 1
    assert results == [200]
    assert _get(limited, "/capped/echo")[0] == 200  # the slot was given back
