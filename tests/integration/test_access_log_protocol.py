"""The access log's ``protocol``: ``h2`` for every HTTP/2 stream (bridged to an HTTP/1.1
upstream, native to an h2c upstream, or bridged then translated because the route has filters),
``http1`` for HTTP/1.x requests, whatever the upstream speaks."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.integration.conftest import AppBackend, free_ports
from tests.integration.h2_http_peer import H2HttpServer
from tests.integration.h2_support import RawH2


def test_protocol_of_each_kind_of_exchange(
    app_backend: AppBackend, start_gateway: Any, tmp_path: Path
) -> None:
    peer = H2HttpServer()
    try:
        (port,) = free_ports(1)
        log_path = tmp_path / "access.log"
        start_gateway(
            {
                "listen": [{"address": f"127.0.0.1:{port}", "http2": {"enabled": True}}],
                "access_log": {"path": str(log_path)},
                "upstreams": {
                    "app": {"instances": [f"127.0.0.1:{app_backend.port}"]},
                    "peer": {"instances": [f"127.0.0.1:{peer.port}"], "protocol": "h2c"},
                },
                "routes": [
                    {
                        "name": "bridged",
                        "match": {"path": {"prefix": "/bridged/"}},
                        "upstream": "app",
                        "rewrite": {"strip_prefix": "/bridged"},
                    },
                    {
                        "name": "native",
                        "match": {"path": {"prefix": "/native/"}},
                        "upstream": "peer",
                        "rewrite": {"strip_prefix": "/native"},
                    },
                    {
                        "name": "filtered",
                        "match": {"path": {"prefix": "/filtered/"}},
                        "upstream": "peer",
                        "rewrite": {"strip_prefix": "/filtered"},
                        "filters": [{"headers": {"request": {"set": {"x-filtered": "1"}}}}],
                    },
                ],
            }
        )
        client = RawH2(port)
        try:
            paths = ["/bridged/echo/a", "/native/echo", "/filtered/echo"]
            for n, path in enumerate(paths):
                client.request(1 + 2 * n, path)
            for n in range(len(paths)):
                assert client.response(1 + 2 * n).status == 200
        finally:
            client.close()
        for path in ("/bridged/echo/h1", "/native/echo?h1"):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
                assert reply.status == 200
        expected = {
            ("bridged", "/bridged/echo/a"): "h2",
            ("native", "/native/echo"): "h2",  # the client's target, as on the HTTP/1.1 path
            ("filtered", "/filtered/echo"): "h2",
            ("bridged", "/bridged/echo/h1"): "http1",
            ("native", "/native/echo?h1"): "http1",
        }
        found: dict[tuple[str, str], str] = {}
        deadline = time.monotonic() + 10
        while set(found) != set(expected):
            assert time.monotonic() < deadline, f"access log lines: {found}"
            time.sleep(0.05)
            if log_path.exists():
                entries = [json.loads(line) for line in log_path.read_text().splitlines() if line]
                found = {(e["route"], e["path"]): e.get("protocol") for e in entries}
        assert found == expected
    finally:
        peer.close()
