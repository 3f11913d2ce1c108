"""Helpers shared by the HTTP discovery clients (Consul, etcd, Eureka)."""

from __future__ import annotations

import ssl

from gateway.config.model import DiscoveryConfig


def client_ssl_context(config: DiscoveryConfig) -> ssl.SSLContext | bool:
    """The ``ssl`` argument of the backend's ``aiohttp.TCPConnector``.

    ``True`` (aiohttp's default verification) for a plain-HTTP address, ``False`` with
    ``tls_verify: false``, else a context with the configured CA and client certificate.
    """
    if config.address is None or not config.address.startswith("https"):
        return True  # what aiohttp does with ssl=None: no TLS is used for http:// anyway
    if not config.tls_verify:
        return False
    context = ssl.create_default_context(cafile=config.ca_file)
    if config.cert_file and config.key_file:
        context.load_cert_chain(config.cert_file, config.key_file)
    return context
