"""Basic proxying through a real gateway process."""

from __future__ import annotations

import json

from tests.integration.conftest import GatewayProcess, read_response


def test_get_is_proxied_with_forwarding_headers(gateway: GatewayProcess) -> None:
    sock = gateway.connect()
    sock.sendall(b"GET /echo/x?a=1 HTTP/1.1\r\nHost: example.test\r\nX-Custom: yes\r\n\r\n")
    status, headers, body = read_response(sock)
    assert status == 200
    echoed = json.loads(body)
    assert echoed["path"] == "/echo/x?a=1"
    upstream_headers = {name.lower(): value for name, value in echoed["headers"]}
    assert upstream_headers["host"] == "example.test"
    assert upstream_headers["x-custom"] == "yes"
    assert upstream_headers["x-forwarded-for"] == "127.0.0.1"
    assert upstream_headers["x-forwarded-proto"] == "http"
    assert upstream_headers["x-forwarded-host"] == "example.test"
    assert upstream_headers["forwarded"] == "for=127.0.0.1;proto=http;host=example.test"
    assert upstream_headers["x-request-id"] == headers["x-request-id"]
    sock.close()
