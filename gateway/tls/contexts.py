"""``SSLContext`` building: listener contexts with SNI selection, upstream client contexts.

Listener: one *front* context per TLS listener is given to the server (it never changes, so
session-ticket keys and the session cache survive reloads). Its SNI callback switches each
handshake to the context of the certificate the server name selects, from the current
``CertStore``; a reload builds a new store and swaps one reference, so new handshakes get the
new certificates while open connections keep theirs.

Files come as bytes (``GatewayConfig.tls_files``): ``load_cert_chain`` only takes paths, so a
certificate and key are handed to OpenSSL through an anonymous memfd (``/proc/self/fd/N``),
never written to disk.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.config.model import ListenerTLSConfig, UpstreamTLSConfig
    from gateway.tls.certs import CertInfo

# TLS 1.2 suites: forward secrecy and AEAD only (Mozilla "intermediate" minus DHE). TLS 1.3
# suites are all modern and left to OpenSSL's defaults.
MODERN_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@contextlib.contextmanager
def _pem_path(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds ``data``: a memfd, or a private temp file."""
    try:
        fd = os.memfd_create("gateway-tls", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        with tempfile.NamedTemporaryFile(prefix="gateway-tls-") as handle:
            handle.write(data)
            handle.flush()
            yield handle.name
        return
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def load_chain(context: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` from bytes; ssl.SSLError when the key does not match."""
    with _pem_path(cert_pem) as cert_path, _pem_path(key_pem) as key_path:
        context.load_cert_chain(cert_path, key_path)


def _harden(context: ssl.SSLContext, min_version: str) -> None:
    context.minimum_version = VERSIONS[min_version]
    context.set_ciphers(MODERN_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def server_context(
    tls: ListenerTLSConfig,
    files: dict[str, bytes],
    cert_path: str | None,
    key_path: str | None,
    client_ca: str | None,
) -> ssl.SSLContext:
    """A server context for one certificate (None: no certificate, for the front context)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, tls.min_version)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.set_alpn_protocols(list(tls.alpn))
    # Session tickets (RFC 8446 §4.6.1 / RFC 5077): OpenSSL's default, stateless.
    if not tls.session_tickets:
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    if cert_path is not None and key_path is not None:
        load_chain(context, files[cert_path], files[key_path])
    if tls.client_auth is not None and client_ca is not None:
        context.load_verify_locations(cadata=files[client_ca].decode("ascii", "replace"))
        context.verify_mode = (
            ssl.CERT_REQUIRED if tls.client_auth.mode == "require" else ssl.CERT_OPTIONAL
        )
    return context


class CertEntry:
    """One listener certificate: its context and the names it covers."""

    __slots__ = ("context", "covers_cache", "exact", "info", "wildcards")

    def __init__(self, context: ssl.SSLContext, info: CertInfo) -> None:
        self.context = context
        self.info = info
        self.exact = frozenset(name for name in info.names if not name.startswith("*."))
        self.wildcards = frozenset(name[1:] for name in info.names if name.startswith("*."))
        # Host header bytes -> covered: the same few Hosts repeat on a connection.
        self.covers_cache: dict[bytes, bool] = {}

    def covers_name(self, name: str) -> bool:
        if name in self.exact:
            return True
        dot = name.find(".")
        return dot > 0 and name[dot:] in self.wildcards

    def covers_host(self, host: bytes) -> bool:
        """Whether a Host header value (port and trailing dot ignored) is one of our names."""
        known = self.covers_cache.get(host)
        if known is not None:
            return known
        text = host.decode("latin-1").lower()
        if text.startswith("["):
            text = text[1 : text.find("]")]
        else:
            text = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
        text = text.rstrip(".")
        covered = self.covers_name(text) or text in self.info.ips
        if len(self.covers_cache) < 1024:  # bounded: Host values are client-chosen
            self.covers_cache[host] = covered
        return covered


class CertStore:
    """A listener's certificates, looked up by SNI: exact names, then the longest wildcard,
    then the default."""

    __slots__ = ("default", "entries", "exact", "wildcards")

    def __init__(self, entries: list[CertEntry], default: CertEntry) -> None:
        self.entries = entries
        self.default = default
        self.exact: dict[str, CertEntry] = {}
        self.wildcards: dict[str, CertEntry] = {}
        for entry in entries:  # list order: the first certificate naming a name keeps it
            for name in entry.exact:
                self.exact.setdefault(name, entry)
            for suffix in entry.wildcards:
                self.wildcards.setdefault(suffix, entry)

    def pick(self, server_name: str | None) -> CertEntry:
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        entry = self.exact.get(name)
        if entry is not None:
            return entry
        dot = name.find(".")
        if dot > 0:
            entry = self.wildcards.get(name[dot:])
            if entry is not None:
                return entry
        return self.default


def build_store(tls: ListenerTLSConfig, files: dict[str, bytes], source: str) -> CertStore:
    """Contexts for every certificate of a listener; raises ssl.SSLError/ValueError/KeyError."""
    from gateway.tls.certs import describe_pem, resolve

    client_ca = resolve(tls.client_auth.ca, source) if tls.client_auth is not None else None
    entries: list[CertEntry] = []
    default: CertEntry | None = None
    for pair in tls.certificates:
        cert_path, key_path = resolve(pair.cert, source), resolve(pair.key, source)
        context = server_context(tls, files, cert_path, key_path, client_ca)
        entry = CertEntry(context, describe_pem(files[cert_path], cert_path))
        entries.append(entry)
        if default is None and (tls.default_certificate in (None, pair.cert)):
            default = entry
    assert default is not None  # the schema requires one certificate, and a listed default
    return CertStore(entries, default)


class ServerTLS:
    """The TLS side of one listener: the front context the server holds, and the store its
    SNI callback picks from (swapped by ``update``)."""

    __slots__ = ("config", "context", "forward_client_cert", "handshake_timeout", "name", "store")

    def __init__(
        self, name: str, tls: ListenerTLSConfig, files: dict[str, bytes], source: str
    ) -> None:
        self.name = name
        self.store = build_store(tls, files, source)
        self.config = tls
        # The front context carries what OpenSSL reads from the context a handshake *started*
        # with (protocol versions, verify mode, session tickets); SNI then switches the
        # certificate (and the CA list) to the chosen entry's context.
        front = self.store.default.context
        self.context = front
        front.sni_callback = self._on_server_name
        self.forward_client_cert = tls.forward_client_cert
        self.handshake_timeout = tls.handshake_timeout

    def _on_server_name(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext
    ) -> None:
        ssl_object.gateway_sni = server_name  # type: ignore[attr-defined]  # read by the connection
        entry = self.store.pick(server_name)
        ssl_object.gateway_entry = entry  # type: ignore[attr-defined]
        if entry.context is not ssl_object.context:
            ssl_object.context = entry.context
        return None

    def update(self, tls: ListenerTLSConfig, store: CertStore) -> None:
        """Swap in new certificates (``build_store`` made them; it raises, changing nothing,
        if one does not load)."""
        front = self.context
        # Settings read from the front context at the start of each handshake.
        front.minimum_version = VERSIONS[tls.min_version]
        front.verify_mode = store.default.context.verify_mode
        self.store = store
        self.config = tls
        self.forward_client_cert = tls.forward_client_cert
        self.handshake_timeout = tls.handshake_timeout

    def entry_for(self, ssl_object: ssl.SSLObject) -> CertEntry:
        """The certificate a finished handshake used (recorded by the SNI callback, so a
        handshake that straddled a reload still names its own certificate)."""
        entry = getattr(ssl_object, "gateway_entry", None)
        return entry if entry is not None else self.store.default


def client_context(
    tls: UpstreamTLSConfig,
    files: dict[str, bytes],
    source: str,
    alpn: tuple[str, ...] = ("http/1.1",),
) -> ssl.SSLContext:
    """The context for connections to an upstream's instances, offering ``alpn``."""
    from gateway.tls.certs import resolve

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context, tls.min_version)
    if tls.verify:
        if tls.ca is not None:
            context.load_verify_locations(
                cadata=files[resolve(tls.ca, source)].decode("ascii", "replace")
            )
        else:
            context.load_default_certs()
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.cert is not None and tls.key is not None:
        load_chain(context, files[resolve(tls.cert, source)], files[resolve(tls.key, source)])
    context.set_alpn_protocols(list(alpn))
    return context
