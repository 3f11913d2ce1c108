"""HTTP/2 toward clients (docs/http2.md): h2 by ALPN on TLS listeners, h2c with prior knowledge
on plaintext ones. ``server`` holds the connection protocol, ``bridge`` drives each stream
through the HTTP/1.1 data plane (until the lifecycle's Downstream seam replaces it),
``headers`` the pure header translation.

This module is what the HTTP/1.1 side imports: the two hooks, and nothing of h2 until an
HTTP/2 connection actually arrives.
"""

from __future__ import annotations

import asyncio
from typing import Any

# (ClientConnection, ProxyServer and ListenerState are typed Any here: this module is imported
# by gateway.proxy.listener, and must not import it back, even for type checking.)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4, the client connection preface


def take_over_h2c(client: Any, data: bytes) -> bool:
    """The first bytes of a plaintext connection on an http2 listener: when they start with the
    connection preface, an HTTP/2 protocol replaces the ``ClientConnection`` (keeping its slot
    in the connection count) and gets the bytes. False: leave the connection to HTTP/1.1.

    A preface split over two reads (under 24 bytes in the first) is not recognised: the
    HTTP/1.1 parser then answers it (505), as before.
    """
    if not data.startswith(PREFACE):
        return False
    from gateway.proxy.h2.server import H2ServerConnection

    transport = client.transport
    listener = client.listener
    if transport is None or listener.http2 is None:
        return False
    server = client.server
    server.connections.discard(client)
    client.closed = True  # its slot and gauge now belong to the HTTP/2 connection
    H2ServerConnection(server, listener, listener.http2).adopt(transport, data)
    return True


def start_h2(server: Any, listener: Any, transport: asyncio.Transport) -> None:
    """A TLS connection that negotiated ALPN ``h2``."""
    from gateway.proxy.h2.server import H2ServerConnection

    assert listener.http2 is not None
    protocol = H2ServerConnection(server, listener, listener.http2)
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
