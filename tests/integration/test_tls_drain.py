"""Over TLS: streaming with backpressure, graceful drain on SIGTERM, and active health checks
that use the upstream's TLS settings."""

from __future__ import annotations

import hashlib
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from tests.integration.backends import AppBackend, _payload
from tests.integration.conftest import free_ports
from tests.integration.test_reload import metric
from tests.integration.tls_support import CertFiles, TLSBackend


def _tls_listener(certs: CertFiles, port: int) -> dict[str, Any]:
    cert, key = certs.issue("api", "api.test")
    return {
        "address": f"127.0.0.1:{port}",
        "name": "https",
        "tls": {"certificates": [{"cert": str(cert), "key": str(key)}]},
    }


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(1 << 16):
        data += chunk
    return data


def test_streaming_and_graceful_drain_over_tls(
    tmp_path: Path, app_backend: AppBackend, start_gateway: Any
) -> None:
    certs = CertFiles(tmp_path)
    (port,) = free_ports(1)
    gateway = start_gateway(
        {
            "listen": [f"127.0.0.1:{free_ports(1)[0]}", _tls_listener(certs, port)],
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [{"name": "all", "upstream": "app"}],
        }
    )
    context = certs.client_context()
    size = 8 * 1024 * 1024
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    with context.wrap_socket(raw, server_hostname="api.test") as sock:
        sock.sendall(f"GET /stream/{size} HTTP/1.1\r\nHost: api.test\r\n\r\n".encode())
        time.sleep(0.3)  # a slow reader: the gateway must hold back, not buffer 8 MiB
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: api.test\r\nconnection: close\r\n\r\n")
        data = _read_all(sock)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in head.lower()
    body = b""
    while True:  # de-chunk the first response; the pipelined one follows it
        line, _, rest = rest.partition(b"\r\n")
        length = int(line, 16)
        if length == 0:
            rest = rest[2:]
            break
        body, rest = body + rest[:length], rest[length + 2 :]
    assert hashlib.sha256(body).digest() == hashlib.sha256(_payload(size)).digest()
    assert rest.startswith(b"HTTP/1.1 200 ")

    # Drain: a request in flight over TLS finishes after SIGTERM, new connections are refused.
    result: dict[str, bytes] = {}

    def slow() -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        with context.wrap_socket(raw, server_hostname="api.test") as tls:
            tls.sendall(b"GET /slow?delay=1 HTTP/1.1\r\nHost: api.test\r\n\r\n")
            result["data"] = _read_all(tls)

    before = len([r for r in app_backend.requests if r["path"].startswith("/slow")])
    client = threading.Thread(target=slow)
    client.start()
    deadline = time.monotonic() + 10
    while len([r for r in app_backend.requests if r["path"].startswith("/slow")]) == before:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    gateway.process.send_signal(signal.SIGTERM)
    client.join(20)
    assert gateway.process.wait(20) == 0
    data = result["data"]
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"slow\n")
    assert b"connection: close" in data.lower()


def test_active_health_checks_use_the_upstream_tls(tmp_path: Path, start_gateway: Any) -> None:
    certs = CertFiles(tmp_path)
    other = CertFiles(tmp_path, "other")
    backend = TLSBackend(certs, ("backend.internal",))
    try:
        health = {"path": "/healthz", "interval": "200ms", "timeout": "1s",
                  "healthy_threshold": 1, "unhealthy_threshold": 1}  # fmt: skip
        address = f"127.0.0.1:{backend.port}"
        gateway = start_gateway(
            {
                "upstreams": {
                    "good": {
                        "instances": [address],
                        "tls": {"sni": "backend.internal", "ca": str(certs.ca_path)},
                        "health": health,
                    },
                    "bad": {
                        "instances": [address],
                        "tls": {"sni": "backend.internal", "ca": str(other.ca_path)},
                        "health": health,
                    },
                },
                "routes": [{"name": "good", "upstream": "good"}],
            }
        )
        deadline = time.monotonic() + 10
        while not (
            metric(gateway, "gateway_upstream_instances", upstream="bad", state="unhealthy") == 1
            and metric(gateway, "gateway_upstream_instances", upstream="good", state="healthy") == 1
            # several probe rounds of both upstreams, each with the configured SNI
            and sum(name == "backend.internal" for name, _ in backend.handshakes) >= 8
        ):
            assert time.monotonic() < deadline, gateway.metrics_text()
            time.sleep(0.05)
        # With unhealthy_threshold 1, one failed probe of "good" would have marked it down.
        assert metric(gateway, "gateway_upstream_instances", upstream="good", state="healthy") == 1
    finally:
        backend.close()
