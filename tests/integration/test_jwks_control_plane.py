"""``jwt`` with a ``jwks_url`` in a multi-worker gateway: the control plane fetches the JWK Set
once for every worker (gateway/filters/jwks.py), a rotated key is picked up on the first
unknown kid and pushed to every worker, and ``jwks_min_refresh`` bounds the fetches of the
whole gateway, however many workers see unknown kids. A real HTTP JWKS server counts fetches.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from tests.integration.backends import AppBackend, ThreadedApp
from tests.integration.conftest import GatewayProcess
from tests.metrics_text import metric_value

ISSUER = "https://issuer.example"
MIN_REFRESH = 4.0  # seconds: long enough for the "refused within it" step on a busy machine
WORKERS = 3
KEYS = {kid: ec.generate_private_key(ec.SECP256R1()) for kid in ("k1", "k2", "k3")}


class RotatingJwks(ThreadedApp):
    """The issuer's JWKS endpoint: ``publish`` changes the key set; counts fetches."""

    def __init__(self) -> None:
        self.fetches = 0
        self.kids = ["k1"]
        super().__init__()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/jwks.json", self._jwks)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        keys = [
            {**ECAlgorithm.to_jwk(KEYS[kid].public_key(), as_dict=True), "kid": kid, "use": "sig"}
            for kid in self.kids
        ]
        return web.json_response({"keys": keys})


@pytest.fixture
def issuer() -> Iterator[RotatingJwks]:
    server = RotatingJwks()
    yield server
    server.close()


def _token(kid: str) -> str:
    claims = {"iss": ISSUER, "sub": "user-1", "exp": int(time.time()) + 300}
    return jwt.encode(claims, KEYS[kid], algorithm="ES256", headers={"kid": kid})


def _status(gateway: GatewayProcess, kid: str) -> int:
    """One request on a new connection (SO_REUSEPORT spreads them over the workers)."""
    request = urllib.request.Request(
        gateway.base_url + "/echo/jwt",
        headers={"authorization": f"Bearer {_token(kid)}", "connection": "close"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _wait_for(condition: Callable[[], bool], what: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {within}s"
        time.sleep(0.05)


def _config(app: AppBackend, issuer: RotatingJwks, workers: int) -> dict[str, Any]:
    return {
        "workers": workers,
        "upstreams": {"app": {"instances": [f"127.0.0.1:{app.port}"]}},
        "routes": [
            {
                "name": "tokens",
                "match": {"path": {"prefix": "/"}},
                "upstream": "app",
                "filters": [
                    {
                        "jwt": {
                            "issuer": ISSUER,
                            "algorithms": ["ES256"],
                            "jwks_url": f"http://127.0.0.1:{issuer.port}/jwks.json",
                            "jwks_min_refresh": f"{MIN_REFRESH}s",
                        }
                    }
                ],
            }
        ],
    }


def _requests_by_worker(gateway: GatewayProcess) -> dict[int, int]:
    """pid -> requests served, as of a /metrics scrape made now."""
    gateway.metrics_text()
    with urllib.request.urlopen(gateway.admin_url + "/admin/workers", timeout=5) as response:
        return {w["pid"]: w["requests"] for w in json.loads(response.read())["workers"]}


def test_workers_share_one_fetch_and_a_rotation_within_the_rate_limit(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend, issuer: RotatingJwks
) -> None:
    gateway = start_gateway(_config(app_backend, issuer, WORKERS))
    # Every worker (and the supervisor's own snapshot) wanted the keys at start: one fetch.
    for _ in range(3 * WORKERS):
        assert _status(gateway, "k1") == 200
    assert issuer.fetches == 1

    # Rotation: the new kid is refused until jwks_min_refresh has passed since the fetch at
    # start; then the first token with it makes one fetch, pushed to every worker.
    issuer.kids = ["k1", "k2"]
    _wait_for(lambda: _status(gateway, "k2") == 200, "k2 accepted")
    rotated_at = time.monotonic()
    assert issuer.fetches == 2

    # Another rotation at once: within jwks_min_refresh of the last fetch no worker gets a
    # fetch, whichever sees the new kid (refused meanwhile), while every worker has k2
    # (new connections) without a fetch.
    issuer.kids = ["k1", "k2", "k3"]
    assert _status(gateway, "k3") == 401
    for _ in range(3 * WORKERS):
        assert _status(gateway, "k2") == 200
        if time.monotonic() - rotated_at < MIN_REFRESH - 1.0:
            assert _status(gateway, "k3") == 401
    assert issuer.fetches == 2
    _wait_for(lambda: _status(gateway, "k3") == 200, "k3 accepted")
    assert issuer.fetches == 3
    assert time.monotonic() - rotated_at >= MIN_REFRESH - 1.0  # not before the limit
    for _ in range(2 * WORKERS):
        assert _status(gateway, "k3") == 200
    assert issuer.fetches == 3
    # (The requests above were spread over the workers, so more than one worker checked.)
    assert sum(1 for served in _requests_by_worker(gateway).values() if served) >= 2
    text = gateway.metrics_text()
    assert metric_value(text, "gateway_jwks_fetches_total") == 3
    assert metric_value(text, "gateway_jwks_fetch_failures_total") == 0


def test_a_restarted_worker_gets_the_keys_without_a_fetch(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend, issuer: RotatingJwks
) -> None:
    import os
    import signal

    gateway = start_gateway(_config(app_backend, issuer, 2))
    assert _status(gateway, "k1") == 200
    before = set(_requests_by_worker(gateway))
    os.kill(next(iter(before)), signal.SIGKILL)
    _wait_for(lambda: len(set(_requests_by_worker(gateway)) - before) == 1, "a new worker")
    (new_pid,) = set(_requests_by_worker(gateway)) - before

    def new_worker_served() -> bool:
        assert _status(gateway, "k1") == 200  # whichever worker: it has the keys
        return _requests_by_worker(gateway).get(new_pid, 0) > 0

    _wait_for(new_worker_served, "a request served by the new worker")
    assert issuer.fetches == 1  # the supervisor answered the new worker from its cache


def test_one_process_fetches_in_process(
    start_gateway: Callable[..., GatewayProcess], app_backend: AppBackend, issuer: RotatingJwks
) -> None:
    gateway = start_gateway(_config(app_backend, issuer, 1))
    for _ in range(3):
        assert _status(gateway, "k1") == 200
    assert issuer.fetches == 1
    issuer.kids = ["k1", "k2"]
    _wait_for(lambda: _status(gateway, "k2") == 200, "k2 accepted")
    assert issuer.fetches == 2
    assert metric_value(gateway.metrics_text(), "gateway_jwks_fetches_total") == 2
