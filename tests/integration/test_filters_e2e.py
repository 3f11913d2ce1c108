"""Filters end to end: a real gateway process with filters on its routes, real clients (curl,
aiohttp-served JWKS, raw sockets for a browser-style CORS preflight) and real backends.

Needs the data-plane wiring of Snapshot.filters into the request lifecycle (gateway/proxy).
"""

from __future__ import annotations

import gzip
import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from gateway.filters.api_key import hash_key
from tests.integration.backends import AppBackend, ThreadedApp
from tests.integration.conftest import (
    GatewayProcess,
    echoed_headers,
    filtered_echo_route,
    read_response,
)
from tests.metrics_text import metric_value

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_PACKAGE = ROOT / "examples" / "tenant_filter"
SIGNING_KEY = ec.generate_private_key(ec.SECP256R1())
ISSUER = "https://issuer.example"


class JwksServer(ThreadedApp):
    """The issuer's JWKS endpoint, on its own loop thread; counts fetches."""

    def __init__(self) -> None:
        self.fetches = 0
        jwk = ECAlgorithm.to_jwk(SIGNING_KEY.public_key(), as_dict=True)
        self.jwks = {"keys": [{**jwk, "kid": "k1", "use": "sig"}]}
        super().__init__()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/jwks.json", self._jwks)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response(self.jwks)


@pytest.fixture(scope="module")
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def access_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("filters-log") / "access.log"


@pytest.fixture(scope="module")
def filtered(
    start_gateway: Callable[..., GatewayProcess],
    app_backend: AppBackend,
    app_backend_2: AppBackend,
    jwks_server: JwksServer,
    access_log: Path,
) -> GatewayProcess:
    return start_gateway(
        {
            "access_log": {"path": str(access_log)},
            "upstreams": {
                "app": {"instances": [f"127.0.0.1:{app_backend.port}"]},
                "app2": {"instances": [f"127.0.0.1:{app_backend_2.port}"]},
            },
            "filters": [{"headers": {"response": {"set": {"x-served-by": "gateway"}}}}],
            "routes": [
                filtered_echo_route(
                    "keys",
                    "/keys",
                    [{"api_key": {"keys": {"alice": hash_key("alice-key")}, "query": "api_key"}}],
                ),
                filtered_echo_route(
                    "tokens",
                    "/tokens",
                    [
                        {
                            "jwt": {
                                "issuer": ISSUER,
                                "audiences": ["api"],
                                "algorithms": ["ES256"],
                                "jwks_url": f"http://127.0.0.1:{jwks_server.port}/jwks.json",
                                "claims_to_headers": {"sub": "x-user"},
                            }
                        }
                    ],
                ),
                filtered_echo_route(
                    "browser",
                    "/browser",
                    [
                        {
                            "cors": {
                                "allow_origins": ["https://app.example"],
                                "allow_methods": ["GET", "PUT"],
                                "allow_headers": ["x-token"],
                                "allow_credentials": True,
                            }
                        },
                        {"compress": {"min_bytes": 0, "algorithms": ["gzip"]}},
                    ],
                ),
                filtered_echo_route(
                    "rules",
                    "/rules",
                    [
                        {
                            "headers": {
                                "request": {
                                    "set": {"x-client": "{client_ip}", "x-route": "{route}"},
                                    "remove": ["x-debug"],
                                }
                            }
                        }
                    ],
                ),
                filtered_echo_route(
                    "blocked", "/blocked", [{"ip_filter": {"deny": ["127.0.0.0/8"]}}]
                ),
                filtered_echo_route(
                    "tenants",
                    "/tenants",
                    [
                        {
                            "python": {
                                "class": "tenant_filter:TenantHeader",
                                "path": str(EXAMPLE_PACKAGE),
                                "config": {"tenants": ["acme"]},
                            }
                        }
                    ],
                ),
                filtered_echo_route(
                    "broken",
                    "/broken",
                    [{"python": {"class": "tests.integration.test_filters_e2e:Exploding"}}],
                ),
                filtered_echo_route(
                    "traced",
                    "/traced",
                    [
                        {"tracing": {"response_header": "x-trace-id"}},
                        {"traffic_split": {"upstreams": {"app": 0, "app2": 1}}},
                    ],
                ),
                {"name": "plain", "match": {"path": {"prefix": "/"}}, "upstream": "app"},
            ],
        }
    )


from gateway.filters.base import Filter, RequestInfo  # noqa: E402


class Exploding(Filter):
    """A filter with a bug: every request raises."""

    def on_request_headers(self, request: RequestInfo) -> None:
        raise RuntimeError("bug in a filter")


def _fields(message: Any) -> dict[str, str]:
    """Header fields by lowercase name; repeated fields joined as one list (RFC 9110 §5.3)."""
    out: dict[str, str] = {}
    for name, value in message.items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def _get(
    gateway: GatewayProcess, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(gateway.base_url + path, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, _fields(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, _fields(error.headers), error.read()


def test_api_key_with_curl(filtered: GatewayProcess, access_log: Path) -> None:
    url = filtered.base_url + "/keys/x"
    refused = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %header{www-authenticate}", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert refused.stdout == '401 ApiKey realm="gateway"'
    admitted = subprocess.run(
        ["curl", "-s", "-H", "x-api-key: alice-key", url],
        capture_output=True,
        check=True,
        timeout=30,
    )
    echoed = echoed_headers(admitted.stdout)
    assert echoed["x-consumer"] == "alice" and "x-api-key" not in echoed
    status, _, body = _get(filtered, "/keys/x?api_key=alice-key")
    assert status == 200 and echoed_headers(body)["x-consumer"] == "alice"
    deadline = time.monotonic() + 10
    while True:
        lines = access_log.read_text().splitlines() if access_log.exists() else []
        if any(json.loads(line).get("consumer") == "alice" for line in lines):
            break
        assert time.monotonic() < deadline, lines[-3:]
        time.sleep(0.05)


def _token(**claims: Any) -> str:
    payload = {"iss": ISSUER, "aud": "api", "sub": "user-7", "exp": int(time.time()) + 300}
    payload.update(claims)
    return jwt.encode(payload, SIGNING_KEY, algorithm="ES256", headers={"kid": "k1"})


def test_jwt_with_a_jwks_url(filtered: GatewayProcess, jwks_server: JwksServer) -> None:
    status, headers, _ = _get(filtered, "/tokens/a")
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="gateway"'
    for _ in range(3):
        status, _, body = _get(filtered, "/tokens/a", {"authorization": f"Bearer {_token()}"})
        assert status == 200 and echoed_headers(body)["x-user"] == "user-7"
    assert jwks_server.fetches == 1  # fetched once, then cached
    status, headers, _ = _get(
        filtered, "/tokens/a", {"authorization": f"Bearer {_token(exp=int(time.time()) - 3600)}"}
    )
    assert status == 401 and 'error="invalid_token"' in headers["www-authenticate"]


def test_browser_style_cors_preflight_is_answered_by_the_gateway(
    filtered: GatewayProcess, app_backend: AppBackend
) -> None:
    seen = len(app_backend.requests)
    sock = filtered.connect()
    try:
        # What a browser sends before a credentialed cross-origin PUT with a custom header.
        sock.sendall(
            b"OPTIONS /browser/item HTTP/1.1\r\nHost: api.example\r\n"
            b"Origin: https://app.example\r\nAccess-Control-Request-Method: PUT\r\n"
            b"Access-Control-Request-Headers: x-token\r\nSec-Fetch-Mode: cors\r\n\r\n"
        )
        status, headers, _ = read_response(sock)
    finally:
        sock.close()
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert headers["access-control-allow-credentials"] == "true"
    assert headers["access-control-allow-headers"] == "x-token"
    assert len(app_backend.requests) == seen  # never forwarded
    status, response_headers, body = _get(
        filtered,
        "/browser/item",
        {"origin": "https://app.example", "accept-encoding": "gzip"},
    )
    assert status == 200
    assert response_headers["access-control-allow-origin"] == "https://app.example"
    assert "Origin" in response_headers["vary"] and "Accept-Encoding" in response_headers["vary"]
    assert response_headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(body))["path"] == "/echo/item"
    assert response_headers["x-served-by"] == "gateway"  # the global filter


def test_header_rules_ip_filter_and_a_third_party_filter(filtered: GatewayProcess) -> None:
    status, _, body = _get(filtered, "/rules/x", {"x-debug": "1", "x-route": "spoofed"})
    echoed = echoed_headers(body)
    assert status == 200 and "x-debug" not in echoed
    assert echoed["x-client"] == "127.0.0.1" and echoed["x-route"] == "rules"
    assert _get(filtered, "/blocked/x")[0] == 403
    status, _, body = _get(filtered, "/tenants/x", {"host": "acme.api.example"})
    assert status == 200 and echoed_headers(body)["x-tenant"] == "acme"
    assert _get(filtered, "/tenants/x", {"host": "initech.api.example"})[0] == 403


def test_a_raising_filter_is_a_500_counted_and_the_worker_lives(filtered: GatewayProcess) -> None:
    for _ in range(3):
        assert _get(filtered, "/broken/x")[0] == 500
    assert _get(filtered, "/plain")[0] == 200
    labels = {"route": "broken", "filter": "tests.integration.test_filters_e2e:Exploding"}
    assert metric_value(filtered.metrics_text(), "gateway_filter_errors_total", **labels) == 3


def test_reload_applies_new_filters(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend
) -> None:
    def config(value: str) -> dict[str, Any]:
        return {
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [
                filtered_echo_route(
                    "r", "/v", [{"headers": {"request": {"set": {"x-version": value}}}}]
                )
            ],
        }

    gateway = start_gateway(config("one"))
    assert echoed_headers(_get(gateway, "/v/x")[2])["x-version"] == "one"
    full = yaml.safe_load(gateway.config_path.read_text())
    full.update(config("two"))
    gateway.config_path.write_text(yaml.safe_dump(full, sort_keys=False))
    request = urllib.request.Request(gateway.admin_url + "/admin/reload", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert echoed_headers(_get(gateway, "/v/x")[2])["x-version"] == "two"


def test_tracing_and_traffic_split(filtered: GatewayProcess, access_log: Path) -> None:
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    status, headers, body = _get(filtered, "/traced/x", {"traceparent": parent})
    assert status == 200
    assert json.loads(body)["backend"] == "app-2"  # every request to the weight-1 upstream
    sent = echoed_headers(body)["traceparent"]
    assert sent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and sent.endswith("-01")
    assert sent != parent  # the gateway's own span
    assert headers["x-trace-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    deadline = time.monotonic() + 10
    while True:
        lines = access_log.read_text().splitlines() if access_log.exists() else []
        if any(json.loads(line).get("trace_id") == headers["x-trace-id"] for line in lines):
            break
        assert time.monotonic() < deadline, lines[-3:]
        time.sleep(0.05)
