"""The TLS handshake of accepted connections.

uvloop's ``create_server(ssl=...)`` calls the protocol factory before the handshake and, when a
handshake fails or times out, tells the protocol nothing (the error only reaches a debug log),
so failures could not be counted by reason. Instead a TLS listener accepts plain TCP with a
tiny ``_Handshake`` protocol that pauses reading and hands the transport to
``loop.start_tls(server_side=True, ssl_handshake_timeout=...)``: the same uvloop SSL protocol
as ``create_server(ssl=)`` (so the data path is identical), but its outcome comes back to us.
Success: the ``ClientConnection`` gets ``connection_made`` with the TLS transport. Failure:
``gateway_tls_handshake_errors_total{listener,reason}`` and the socket is closed; nothing else
is touched. No Task is created: the ``start_tls`` coroutine is stepped from callbacks (its
waiter's done callback), so a TLS connection costs no more asyncio machinery than a plain one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import ssl
from typing import TYPE_CHECKING, Any, cast

from gateway.tls.certs import resolve
from gateway.tls.contexts import ServerTLS, build_store

if TYPE_CHECKING:
    from gateway.config.model import (
        GatewayConfig,
        Http2Config,
        ListenerConfig,
        ListenerTLSConfig,
    )
    from gateway.proxy.server import ProxyServer
    from gateway.tls.contexts import CertStore

HANDSHAKE_REASONS = (
    "timeout",  # not done within handshake_timeout
    "protocol_version",  # TLS < min_version, or no common version
    "no_shared_cipher",
    "client_certificate",  # client_auth: missing (require) or not verified
    "peer_alert",  # the client refused us (usually our certificate)
    "http_on_https",  # plaintext HTTP sent to a TLS listener
    "closed",  # the client went away mid-handshake
    "other",
)


def handshake_reason(error: BaseException) -> str:
    """A bounded label for why a handshake failed."""
    if isinstance(error, TimeoutError | ConnectionAbortedError) and not isinstance(
        error, ssl.SSLError
    ):
        return "timeout"
    reason = str(getattr(error, "reason", "") or "").upper()
    if not reason:
        if isinstance(error, ConnectionError | EOFError | ssl.SSLEOFError | ssl.SSLZeroReturnError):
            return "closed"
        return "other"
    if reason == "HTTP_REQUEST":
        return "http_on_https"
    if "VERSION" in reason or "PROTOCOL" in reason:
        return "protocol_version"
    if "SHARED_CIPHER" in reason:
        return "no_shared_cipher"
    if (
        "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason
        or "CERTIFICATE_VERIFY_FAILED" in reason
        or "CERTIFICATE_REQUIRED" in reason
    ):
        return "client_certificate"
    if "ALERT" in reason:
        return "peer_alert"
    if "EOF" in reason or "UNEXPECTED_EOF" in reason:
        return "closed"
    return "other"


class ListenerState:
    """Per-listener facts every connection of it shares: name, scheme, TLS, redirect."""

    __slots__ = ("http2", "name", "proto", "redirect", "tls")

    def __init__(
        self,
        name: str,
        tls: ServerTLS | None = None,
        redirect: str | None = None,
        http2: Http2Config | None = None,
    ) -> None:
        self.name = name
        self.tls = tls
        self.proto = b"https" if tls is not None else b"http"
        self.redirect = redirect
        self.http2 = http2  # None unless http2.enabled (gateway.proxy.h2)

    @classmethod
    def build(cls, listener: ListenerConfig, config: GatewayConfig) -> ListenerState:
        tls = None
        tls_config = _with_h2_alpn(listener)
        if tls_config is not None:
            tls = ServerTLS(listener.name, tls_config, config.tls_files, config.source)
        http2 = listener.http2 if listener.http2.enabled else None
        return cls(listener.name, tls, listener.redirect_to, http2)

    def prepare(self, listener: ListenerConfig, config: GatewayConfig) -> object:
        """Build what ``commit`` swaps in; raises if a certificate does not load, before any
        listener changed."""
        tls_config = _with_h2_alpn(listener)
        if self.tls is None or tls_config is None:
            return None
        return (tls_config, build_store(tls_config, config.tls_files, config.source))

    def commit(self, prepared: object) -> None:
        if prepared is None or self.tls is None:
            return
        tls_config, store = cast("tuple[ListenerTLSConfig, CertStore]", prepared)
        self.tls.update(tls_config, store)


def _with_h2_alpn(listener: ListenerConfig) -> ListenerTLSConfig | None:
    """The listener's TLS settings, with ``h2`` offered first when HTTP/2 is enabled."""
    tls = listener.tls
    if tls is not None and listener.http2.enabled and "h2" not in tls.alpn:
        return dataclasses.replace(tls, alpn=("h2", *tls.alpn))
    return tls


class _Handshake(asyncio.Protocol):
    """Holds an accepted TCP connection while its TLS handshake runs.

    uvloop may deliver the first bytes (the ClientHello) here even though ``connection_made``
    pauses reading at once; they are kept and handed to the TLS protocol right after it took
    over the transport, before it reads anything itself.
    """

    __slots__ = ("early", "server", "state", "step", "transport")

    def __init__(self, server: ProxyServer, state: ListenerState) -> None:
        self.server = server
        self.state = state
        self.early: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.step: Any = None  # the start_tls coroutine being driven

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.pause_reading()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Later in this loop iteration: uvloop may still hand us bytes read with the accept.
        asyncio.get_running_loop().call_soon(self._start)

    def data_received(self, data: bytes) -> None:
        self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.step is None:  # closed before the handshake began
            self.server.metrics.tls_handshake_error(self.state.name, "closed")
            self.transport = None

    def _start(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        tls = self.state.tls
        assert tls is not None
        from gateway.proxy.listener import ClientConnection

        server = self.server
        conn = ClientConnection(server, self.state)
        server.handshakes.add(self)
        # start_tls is driven by hand rather than by a Task: its synchronous part installs the
        # TLS protocol and schedules its connection_made; the early bytes are queued after that.
        coroutine = asyncio.get_running_loop().start_tls(
            transport,
            conn,
            tls.context,
            server_side=True,
            ssl_handshake_timeout=tls.handshake_timeout,
        )
        self.step = (coroutine, conn)
        self._drive()
        if self.early and self.step is not None:
            early, self.early = b"".join(self.early), []
            asyncio.get_running_loop().call_soon(_replay, transport, early)

    def _drive(self, _future: object = None) -> None:
        assert self.step is not None
        coroutine, conn = self.step
        try:
            waiting = coroutine.send(None)
        except StopIteration as done:
            self.step = None
            self.server.handshakes.discard(self)
            tls_transport = done.value
            if tls_transport is None:
                self.server.metrics.tls_handshake_error(self.state.name, "closed")
                return
            if self.state.http2 is not None and _alpn(tls_transport) == "h2":  # HTTP/2 hook
                from gateway.proxy.h2 import start_h2

                start_h2(self.server, self.state, tls_transport)
                return
            conn.connection_made(tls_transport)
            return
        except (OSError, EOFError, TimeoutError, ValueError) as error:
            self.step = None
            self.server.handshakes.discard(self)
            self.server.metrics.tls_handshake_error(self.state.name, handshake_reason(error))
            if self.transport is not None:
                self.transport.abort()
            return
        waiting.add_done_callback(self._drive)

    def abort(self) -> None:
        """The server closes: drop a handshake still under way."""
        if self.transport is not None:
            self.transport.abort()


def _alpn(transport: asyncio.Transport) -> str | None:
    ssl_object = transport.get_extra_info("ssl_object")
    return ssl_object.selected_alpn_protocol() if ssl_object is not None else None


def _replay(transport: asyncio.Transport, data: bytes) -> None:
    """Hand bytes read before the TLS protocol took over to it (uvloop's is a
    BufferedProtocol)."""
    protocol: Any = transport.get_protocol()
    if transport.is_closing():
        return
    if hasattr(protocol, "get_buffer"):
        view = 0
        while view < len(data):
            buffer = protocol.get_buffer(len(data) - view)
            size = min(len(buffer), len(data) - view)
            buffer[:size] = data[view : view + size]
            protocol.buffer_updated(size)
            view += size
    else:
        protocol.data_received(data)


async def start_tls_listener(
    server: ProxyServer, state: ListenerState, listener: ListenerConfig, reuse_port: bool
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _Handshake(server, state),
        listener.address.host,
        listener.address.port,
        reuse_port=reuse_port or None,
        backlog=4096,
    )


def client_cert_element(ssl_object: ssl.SSLObject) -> bytes | None:
    """The x-forwarded-client-cert element for a *verified* client certificate (Envoy's
    format): Hash (SHA-256 of the DER), Subject, URI and DNS names; None without one."""
    if not ssl_object.getpeercert():  # {} when not verified (CERT_OPTIONAL, none sent)
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    parts = [b"Hash=" + hashlib.sha256(der).hexdigest().encode("ascii")]
    subject = cert.subject.rfc4514_string().replace("\\", "\\\\").replace('"', '\\"')
    parts.append(b'Subject="' + subject.encode("utf-8") + b'"')
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            parts.append(b"URI=" + _xfcc_value(uri))
        for dns in san.get_values_for_type(x509.DNSName):
            parts.append(b"DNS=" + _xfcc_value(dns))
    return b";".join(parts)


def _xfcc_value(text: str) -> bytes:
    """Values with separators are quoted; nothing may break the header line."""
    raw = text.encode("utf-8", "replace")
    if any(c in raw for c in b',;="\r\n'):
        return (
            b'"'
            + raw.replace(b"\\", b"\\\\")
            .replace(b'"', b'\\"')
            .replace(b"\r", b"")
            .replace(b"\n", b"")
            + b'"'
        )
    return raw


__all__ = [
    "HANDSHAKE_REASONS",
    "ListenerState",
    "client_cert_element",
    "handshake_reason",
    "resolve",
    "start_tls_listener",
]
