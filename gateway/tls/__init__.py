"""TLS: listener certificates (SNI, reload), client certificates, TLS to upstreams.

``certs``: reading and checking certificate files (``gateway check``, start, reload).
``contexts``: ``SSLContext`` building, the SNI certificate store, upstream client contexts.
``accept``: the TLS handshake of accepted connections, with failures counted by reason.
See docs/tls.md.
"""
