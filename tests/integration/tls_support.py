"""TLS test material made at run time with trustme (nothing on disk that can expire), and a
real TLS backend that records what each handshake carried (SNI, client certificate)."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import trustme
from aiohttp import web

from tests.integration.backends import LoopThread


class CertFiles:
    """A CA and certificates issued by it, written as PEM files under ``directory``."""

    def __init__(self, directory: Path, name: str = "ca") -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_path = directory / f"{name}.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))

    def issue(self, stem: str, *names: str, **options: Any) -> tuple[Path, Path]:
        cert = self.ca.issue_cert(*names, **options)
        cert_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}.key"
        cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(str(key_path))
        return cert_path, key_path

    def client_context(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        context.set_alpn_protocols(["http/1.1"])
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        return context


def tls_get(
    port: int,
    server_name: str | None,
    context: ssl.SSLContext,
    path: str = "/echo",
    host: str | None = None,
    extra: bytes = b"",
    timeout: float = 10.0,
) -> tuple[int, bytes, dict[str, Any]]:
    """One GET over a fresh TLS connection: (status, body, facts about the handshake)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with context.wrap_socket(raw, server_hostname=server_name) as sock:
        facts = {
            "peer": sock.getpeercert(),
            "version": sock.version(),
            "alpn": sock.selected_alpn_protocol(),
        }
        head = f"GET {path} HTTP/1.1\r\nHost: {host or server_name or '127.0.0.1'}\r\n"
        sock.sendall(head.encode() + extra + b"connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    if not data:
        raise ConnectionResetError("closed without a response")
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, body, facts


def peer_names(peer: dict[str, Any]) -> list[str]:
    return [value for kind, value in peer.get("subjectAltName", ()) if kind == "DNS"]


class TLSBackend:
    """aiohttp over TLS. ``handshakes`` records (SNI, client cert subject or None)."""

    def __init__(
        self, certs: CertFiles, names: tuple[str, ...], *, client_ca: Path | None = None
    ) -> None:
        self.handshakes: list[tuple[str | None, Any]] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert, key = certs.issue(f"backend-{names[0]}", *names)
        self.context.load_cert_chain(str(cert), str(key))
        if client_ca is not None:
            self.context.load_verify_locations(cafile=str(client_ca))
            self.context.verify_mode = ssl.CERT_OPTIONAL
        self.context.sni_callback = self._on_name
        self.thread = LoopThread()
        self.port = self.thread.call(self._start())

    def _on_name(self, ssl_object: Any, name: str | None, _context: Any) -> None:
        self.handshakes.append((name, None))

    async def _start(self) -> int:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._echo)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        return site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _echo(self, request: web.Request) -> web.Response:
        assert request.transport is not None
        ssl_object = request.transport.get_extra_info("ssl_object")
        peer = ssl_object.getpeercert() if ssl_object is not None else None
        subject = dict(x[0] for x in peer["subject"]) if peer else None
        return web.json_response(
            {
                "path": request.path_qs,
                "client_cert": subject,
                "client_san": [v for _, v in peer.get("subjectAltName", ())] if peer else [],
            }
        )

    def close(self) -> None:
        self.thread.call(self.runner.cleanup())
        self.thread.stop()


def s_client(port: int, *args: str, timeout: float = 10.0, request: bytes = b"") -> str:
    """``openssl s_client`` once; its output (the handshake summary). With ``request`` it is
    sent and s_client waits for the server to close (TLS 1.3 tickets arrive after the
    handshake: a client that leaves at once has none to resume with)."""
    extra = ["-ign_eof"] if request else []
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *extra, *args],
        input=request,
        capture_output=True,
        timeout=timeout,
    )
    return result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
