"""The connection window of an upstream HTTP/2 connection survives a slow client of the
HTTP/1.1 → HTTP/2 translation (gateway/proxy/h2/from_h1.py, ``TranslatedStream``).

While the client cannot take more (its ``ClientConnection`` paused), the bytes relayed to it are
not acknowledged upstream (``held``): that is how a slow client stops the upstream. When the
upstream stream then ends, the held bytes must still go back to the connection's window (the
stream's own share no longer matters), or every such response shrinks the window that all the
other streams of the connection share, until nothing flows at all.

The slow HTTP/1.1 client here is an HTTP/2 stream with a zero window on a route with a filter:
the bridge drives it through a ``ClientConnection``, which is paused as soon as the first body
byte finds no window, so all of the response is held. The upstream connection's window is the
minimum (65,535 bytes), and the response exactly that, so a leak would leave it at zero.
"""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest

from tests.integration.conftest import free_ports
from tests.integration.h2_http_peer import H2HttpServer
from tests.integration.h2_support import RawH2

WINDOW = 65535


@pytest.mark.parametrize(
    ("size", "client_leaves"),
    [
        # The upstream stream ends while the client holds its bytes (TranslatedStream.on_end).
        pytest.param(WINDOW, False, id="stream-ends-while-held"),
        # A longer response: the client goes away mid-body (the stream is reset, and its
        # unacknowledged bytes go back: H2ClientConnection.reset_stream).
        pytest.param(3 * WINDOW, True, id="client-gone-mid-body"),
    ],
)
def test_held_bytes_go_back_to_the_connection_window(
    start_gateway: Any, size: int, client_leaves: bool
) -> None:
    peer = H2HttpServer()
    try:
        (port,) = free_ports(1)
        start_gateway(
            {
                "listen": [{"address": f"127.0.0.1:{port}", "http2": {"enabled": True}}],
                "upstreams": {
                    "peer": {
                        "instances": [f"127.0.0.1:{peer.port}"],
                        "protocol": "h2c",
                        "timeouts": {"read": "2s"},
                        "retry": {"attempts": 1},
                        "http2": {"connection_window": WINDOW, "max_connections": 1},
                    }
                },
                "routes": [
                    {
                        "name": "filtered",  # a filter: the bridge, then the translation
                        "match": {"path": {"prefix": "/filtered/"}},
                        "upstream": "peer",
                        "rewrite": {"strip_prefix": "/filtered"},
                        "filters": [{"headers": {"response": {"set": {"x-filtered": "1"}}}}],
                    },
                    {"name": "plain", "upstream": "peer"},
                ],
            }
        )
        slow = RawH2(port, settings={0x4: 0}, auto_window=False)  # INITIAL_WINDOW_SIZE 0
        try:
            slow.request(1, f"/filtered/big?n={size}&cl=1")
            # A whole window left the upstream (all the connection allowed), and none of it
            # reached the client.
            deadline = time.monotonic() + 10
            while sum(peer.sent.values()) < WINDOW:
                assert time.monotonic() < deadline, f"upstream sent {peer.sent}"
                time.sleep(0.01)
            slow.pump(lambda: 1 in slow.responses and slow.responses[1].status is not None)
            assert slow.responses[1].status == 200 and slow.responses[1].body == b""
            if client_leaves:
                slow.close()
            # Another exchange on the same upstream connection (max_connections: 1), from an
            # HTTP/1.1 client: it needs the connection window back.
            started = time.monotonic()
            url = f"http://127.0.0.1:{port}/big?n={3 * WINDOW}&cl=1"
            with urllib.request.urlopen(url, timeout=10) as response:
                assert len(response.read()) == 3 * WINDOW
            assert time.monotonic() - started < 2  # (not after a read timeout)
            assert len(peer.connections) == 1
        finally:
            slow.close()
    finally:
        peer.close()
