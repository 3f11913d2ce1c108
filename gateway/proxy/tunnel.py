"""The byte tunnel after a successful Upgrade (RFC 9110 §7.8, e.g. WebSocket).

Once the upstream answered 101, neither connection carries HTTP any more. Both transports are
switched (``transport.set_protocol``) to the two ends of one ``Tunnel``; from then on the HTTP
protocols (``ClientConnection``, ``UpstreamConnection``) see no byte of it.

Each end relays what its transport reads to the other transport. Backpressure runs both ways:
when one transport's write buffer is full (``pause_writing``) the other stops reading until it
drained. A FIN from either side ends the tunnel: the other side is closed after what is
buffered for it went out (WebSocket and the like close as a whole; a half-open tunnel would
hold both connections for a peer that may never close). A reset aborts the other side. The
bookkeeping of the original protocols (open-connection counts, the pool's count) still runs:
each end calls its original protocol's ``connection_lost`` once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

Lost = Callable[[Exception | None], None]


class TunnelEnd(asyncio.Protocol):
    """One side of a tunnel: the protocol of one transport, writing to the peer's."""

    __slots__ = ("lost", "on_lost", "peer", "peer_paused", "transport")

    def __init__(self, transport: asyncio.Transport, on_lost: Lost) -> None:
        self.transport = transport
        self.on_lost: Lost | None = on_lost  # the original protocol's connection_lost
        self.peer: TunnelEnd = self  # set by Tunnel.open
        self.lost = False
        self.peer_paused = False  # we paused the peer's reading: our write buffer is full

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if not peer.lost:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close this side; connection_lost then closes the peer

    def pause_writing(self) -> None:
        # Our transport cannot take more: stop reading what would be written to it.
        self.peer_paused = True
        peer = self.peer
        if not peer.lost:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer_paused = False
        peer = self.peer
        if not peer.lost:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        peer = self.peer
        if not peer.lost:
            if exc is None:
                peer.transport.close()  # after what is buffered for it is written
            else:
                peer.transport.abort()  # a reset is passed on as one
        on_lost = self.on_lost
        self.on_lost = None
        if on_lost is not None:
            on_lost(exc)


class Tunnel:
    """The two ends of one tunnel, client and upstream."""

    __slots__ = ("client", "upstream")

    def __init__(self, client: TunnelEnd, upstream: TunnelEnd) -> None:
        self.client = client
        self.upstream = upstream

    @classmethod
    def open(
        cls,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        *,
        client_lost: Lost,
        upstream_lost: Lost,
        to_client: Iterable[bytes],
        to_upstream: Iterable[bytes],
        client_writing_paused: bool,
    ) -> Tunnel:
        """Switch both transports to a new tunnel, first writing the bytes each side already
        sent the other (the tail after the 101 head; the client's bytes after its request).
        ``client_writing_paused``: the client's write buffer is full, so the upstream stays
        paused until it drains."""
        client_end = TunnelEnd(client, client_lost)
        upstream_end = TunnelEnd(upstream, upstream_lost)
        client_end.peer = upstream_end
        upstream_end.peer = client_end
        client.set_protocol(client_end)
        upstream.set_protocol(upstream_end)
        for chunk in to_client:
            if chunk:
                client.write(chunk)
        for chunk in to_upstream:
            if chunk:
                upstream.write(chunk)
        # The HTTP side paused reading around the upgrade (client bytes held back; upstream
        # reading while the client could not take more): the tunnel decides from here.
        client.resume_reading()
        if client_writing_paused:
            client_end.peer_paused = True
            upstream.pause_reading()
        else:
            upstream.resume_reading()
        return cls(client_end, upstream_end)

    def abort(self) -> None:
        for end in (self.client, self.upstream):
            if not end.lost:
                end.transport.abort()
