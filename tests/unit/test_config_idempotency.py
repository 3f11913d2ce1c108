"""The routes[].idempotency section: defaults, and errors naming file:line:key."""

from __future__ import annotations

import textwrap

import pytest

from gateway.config import ConfigInvalid, load_config_text
from gateway.config.model import IdempotencyConfig

BASE = """\
upstreams: {app: {instances: [127.0.0.1:9000]}}
routes:
  - name: payments
    upstream: app
"""


def _load(idempotency: str, extra: str = "") -> IdempotencyConfig:
    config = load_config_text(extra + BASE + "    idempotency: " + idempotency + "\n")
    found = config.routes[0].idempotency
    assert found is not None
    return found


def test_defaults() -> None:
    assert _load("{}") == IdempotencyConfig()
    full = _load(
        "{store: redis, methods: [post], required: true, ttl: 1h, max_response_bytes: 2KiB,"
        " fingerprint: [body], lock_timeout: 5s, principal: 'header:x-api-key',"
        " on_store_error: deny, in_flight: wait, store_4xx: false}",
        extra="redis: {url: 'redis://127.0.0.1:6379/0'}\n",
    )
    assert full.methods == ("POST",) and full.ttl == 3600.0 and full.fingerprint == ("body",)
    assert full.max_response_bytes == 2048 and full.principal == "header:x-api-key"


@pytest.mark.parametrize(
    ("idempotency", "message"),
    [
        ("{store: memcached}", "routes[0].idempotency.store: 'memcached' is not one of"),
        ("{ttl: forever}", "routes[0].idempotency.ttl:"),
        ("{fingerprint: []}", "routes[0].idempotency.fingerprint:"),
        ("{fingerprint: [headers]}", "routes[0].idempotency.fingerprint[0]:"),
        ("{principal: cookie}", "routes[0].idempotency.principal:"),
        ("{in_flight: queue}", "routes[0].idempotency.in_flight:"),
        ("{max_request_bytes: 2MiB}", "routes[0].idempotency.max_request_bytes:"),
        ("{lock: 1s}", "routes[0].idempotency.lock: unknown key 'lock'"),
        ("{store: redis}", "redis: required: idempotency of route payments uses store: redis"),
    ],
)
def test_errors_name_file_line_and_key(idempotency: str, message: str) -> None:
    text = BASE + "    idempotency: " + idempotency + "\n"
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(textwrap.dedent(text), "gateway.yaml")
    errors = [str(error) for error in info.value.errors]
    assert any(error.startswith("gateway.yaml:") and message in error for error in errors), errors
