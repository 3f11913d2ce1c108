"""TLS to upstream instances: one client context per (settings, file contents), shared.

SNI and the name checked: ``tls.sni`` when set (like Envoy's configured ``sni``: one name for
every instance, typically the service's internal name); otherwise the instance's own host, so
``instances: [payments.internal:443]`` just works. An IP instance without ``sni`` sends no SNI
(RFC 6066 §3 forbids IP literals there) and its certificate must carry the IP address. The
request's Host is never used: it is client-chosen, and a pool would then be needed per Host.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass

from gateway.config.model import GatewayConfig, UpstreamConfig
from gateway.tls.certs import material_digest, resolve
from gateway.tls.contexts import client_context

log = logging.getLogger("gateway.tls")

# (settings, files digest, source, ALPN) -> context: snapshots rebuilt by discovery or a reload
# reuse the context (and pools keyed by it); bounded by the configs a process ever saw.
_CONTEXTS: dict[tuple[object, str, str, tuple[str, ...]], ssl.SSLContext] = {}
_CONTEXTS_MAX = 256


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    context: ssl.SSLContext | None
    sni: str | None
    key: object  # part of the pool key

    def server_hostname(self, instance_host: str) -> str | None:
        if self.context is None:
            return None
        return self.sni or instance_host


_PLAIN = UpstreamTLS(None, None, None)

HTTP1_ALPN = ("http/1.1",)
H2_ALPN = ("h2",)  # upstreams.NAME.protocol h2, and gRPC health checks over TLS


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def upstream_tls(
    upstream: UpstreamConfig, config: GatewayConfig, *, alpn: tuple[str, ...] = HTTP1_ALPN
) -> UpstreamTLS:
    """The TLS of ``upstream``'s connections; ``alpn`` is what they offer (the key of a
    context with another ALPN differs, so its pools differ too)."""
    tls = upstream.tls
    if tls is None:
        return _PLAIN
    source = config.source
    paths = tuple(
        resolve(p, source) if p is not None else None for p in (tls.ca, tls.cert, tls.key)
    )
    files = config.tls_files
    missing = [p for p in paths if p is not None and p not in files]
    if missing:  # a config parsed without its TLS files (tests, tools): read them now
        files = {**files, **{p: _read(p) for p in missing}}
    digest = material_digest(files, paths)
    cache_key = (tls, digest, source, alpn)
    context = _CONTEXTS.get(cache_key)
    if context is None:
        context = client_context(tls, files, source, alpn)
        if not tls.verify:
            log.warning(
                "upstream %r: tls.verify is false: its instances' certificates are not checked",
                upstream.name,
            )
        if len(_CONTEXTS) >= _CONTEXTS_MAX:
            _CONTEXTS.clear()
        _CONTEXTS[cache_key] = context
    key = (tls, digest) if alpn == HTTP1_ALPN else (tls, digest, alpn)
    return UpstreamTLS(context, tls.sni, key)
