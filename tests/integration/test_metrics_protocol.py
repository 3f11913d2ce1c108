"""gateway_downstream_requests_total{protocol}: exact counts after HTTP/1.1 requests, HTTP/2
streams the bridge carries (HTTP/1.1 upstream) and HTTP/2 streams exchanged natively (gRPC to
an h2c upstream), on one h2c listener that also takes HTTP/1.1."""

from __future__ import annotations

import re
import subprocess
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess, free_ports
from tests.integration.h2_peers import SERVICE, GrpcServer

_SAMPLE = re.compile(r"^(gateway_(?:downstream_)?requests_total)\{(.*)\} ([0-9.e+]+)$")


def counts(gateway: GatewayProcess) -> dict[str, float]:
    """{"http1": n, "h2": n, "total": n} from one scrape."""
    out = {"http1": 0.0, "h2": 0.0, "total": 0.0}
    for line in gateway.metrics_text().splitlines():
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        if name == "gateway_requests_total":
            out["total"] += float(value)
        else:
            out[re.search(r'protocol="([^"]+)"', labels).group(1)] = float(value)  # type: ignore[union-attr]
    return out


@pytest.fixture(scope="module")
def gateway(start_gateway: Any, app_backend: AppBackend) -> Iterator[tuple[GatewayProcess, int]]:
    server = GrpcServer()
    (port,) = free_ports(1)
    process = start_gateway(
        {
            "listen": [{"address": f"127.0.0.1:{port}", "http2": {"enabled": True}}],
            "upstreams": {
                "app": {"instances": [f"127.0.0.1:{app_backend.port}"]},
                "rpc": {"instances": [f"127.0.0.1:{server.port}"], "protocol": "h2c"},
            },
            "routes": [
                {"name": "rpc", "match": {"path": {"prefix": f"/{SERVICE}/"}}, "upstream": "rpc"},
                {"name": "all", "upstream": "app"},
            ],
        }
    )
    yield process, port
    server.stop(None)


def curl(url: str, *options: str) -> bytes:
    out = subprocess.run(
        ["curl", "-sS", *options, "-o", "/dev/null", "-w", "%{http_version} %{http_code}", url],
        capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    return out.stdout


def test_protocol_counts_are_exact(gateway: tuple[GatewayProcess, int]) -> None:
    process, port = gateway
    before = counts(process)
    for i in range(3):  # HTTP/1.1, keep-alive off and on
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/echo/h1-{i}", timeout=10) as r:
            assert r.status == 200
    assert curl(f"http://127.0.0.1:{port}/echo/h1-curl", "--http1.1") == b"1.1 200"
    # HTTP/2 through the bridge (HTTP/1.1 upstream), 404s included: every stream is a request.
    for path in ("/echo/h2-a", "/echo/h2-b", "/status/404"):
        status = curl(f"http://127.0.0.1:{port}{path}", "--http2-prior-knowledge")
        assert status.startswith(b"2 ")
    # HTTP/2 natively (gRPC to the h2c upstream): three calls on one connection.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/Unary")
        for i in range(3):
            assert call(b"m%d" % i, timeout=10) == b"m%d" % i
    after = counts(process)
    assert after["http1"] - before["http1"] == 4
    assert after["h2"] - before["h2"] == 6
    # The two add up to gateway_requests_total, exactly.
    assert after["http1"] + after["h2"] == after["total"]
    assert after["total"] - before["total"] == 10
