"""The contract between the data plane and filters (issue: filters).

The data plane knows only the names in this module. A route's filters are compiled into one
``FilterChain`` per route (``Snapshot.filters``, keyed by route name, empty when no route has
filters), and the request lifecycle calls the chain at its phases:

    request headers ─▶ route ─▶ chain.on_request_headers (if chain.wants_request_headers) ─▶
    admit (limits) ─▶ select peer ─▶
    upstream request (chain.on_request_body per chunk, if chain.wants_request_body) ─▶
    response headers (chain.on_response_headers, if chain.wants_response_headers) ─▶
    response body (chain.on_response_body per chunk, if chain.wants_response_body) ─▶
    done (chain.on_log, if chain.wants_log)

A route without filters pays one falsy-dict test per request. Exceptions raised by a filter
never reach the data plane: the chain catches them, counts them in
``gateway_filter_errors_total{route,filter}`` and turns a request-phase failure into a 500
``LocalReply``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, Protocol

Headers = list[tuple[bytes, bytes]]  # field names lowercase, values as received

# One upstream try of an exchange, as ``RequestInfo.attempts`` gives it to ``on_log``:
# (instance address "host:port", start, end, label, outcome). Times are
# ``time.perf_counter()`` seconds: start when the request was sent (a try that never got a
# connection: when the try before it ended, or the exchange began); end when the response
# was complete or the try failed. ``label`` is what ``retry_head`` returned for the try
# ("" for the first). ``outcome``: "" for the try whose response the client got, else why
# it ended: connect_failure, reset, timeout, a status code ("503"), or cancelled (a hedge
# race lost, or the exchange ended while it ran).
Attempt = tuple[str, float, float, str, str]


class LocalReply:
    """A response made by a filter instead of forwarding the request (401, 403, a preflight)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Headers | None = None, body: bytes = b"") -> None:
        self.status = status
        self.headers: Headers = headers if headers is not None else []
        self.body = body


class RequestInfo:
    """What filters see of one request; built by the data plane only for routes with filters.

    ``headers`` is the request's own header list: changes made by request-phase hooks are what
    the upstream receives (hop-by-hop and framing fields are still decided by the data plane).
    ``path`` is the normalised path the route matched (before the route's rewrite).
    ``upstream`` may be set by a request-phase hook (traffic splitting) to the name of another
    upstream of the snapshot; ``vars`` carries values between filters and into the access log
    (the keys ``consumer`` and ``trace_id`` are written to the access log when present).

    ``retry_head``, when a request-phase hook sets it, is called by the data plane with the
    upstream request head (bytes) before every try after the first (retries and hedges) and
    returns the head to send and a label for that try (tracing: a fresh span id in
    ``traceparent``). Only those tries pay for it. ``attempts``: the tries of the exchange
    (``Attempt``, in the order they were made), set before ``on_log``.
    """

    __slots__ = (
        "attempts",
        "client_ip",
        "headers",
        "host",
        "method",
        "path",
        "protocol",
        "query",
        "request_id",
        "retry_head",
        "route",
        "tls",
        "upstream",
        "vars",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        host: str,
        headers: Headers,
        client_ip: str,
        route: str,
        request_id: str,
        protocol: str = "http/1.1",
        tls: bool = False,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.host = host
        self.headers = headers
        self.client_ip = client_ip
        self.route = route
        self.request_id = request_id
        self.protocol = protocol  # "http/1.1", "http/1.0" or "h2"
        self.tls = tls
        self.upstream: str | None = None
        self.vars: dict[str, Any] = {}
        self.retry_head: Callable[[bytes], tuple[bytes, str]] | None = None
        self.attempts: tuple[Attempt, ...] = ()


class ResponseInfo:
    """The upstream's response head as response-phase hooks see (and may change) it."""

    __slots__ = ("headers", "request", "status")

    def __init__(self, request: RequestInfo, status: int, headers: Headers) -> None:
        self.request = request
        self.status = status
        self.headers = headers


class _Suspended:
    __slots__ = ()

    def __repr__(self) -> str:
        return "SUSPENDED"


# Returned by ``FilterChain.on_request_headers`` while an async hook runs: the data plane parks
# the exchange and continues when the chain calls ``resume`` (once, from the event loop).
SUSPENDED: Final = _Suspended()

Resume = Callable[[LocalReply | None], None]


class FilterChain(Protocol):
    """One route's compiled filters, in order. The data plane calls only these members."""

    route: str
    wants_request_headers: bool
    wants_request_body: bool
    wants_response_headers: bool
    wants_response_body: bool
    wants_log: bool
    # No hook after on_request_headers: once that phase passed without choosing an upstream or
    # setting vars, the data plane treats the rest of the exchange as a route without filters.
    request_phase_only: bool

    def on_request_headers(
        self, request: RequestInfo, resume: Resume | None = None
    ) -> LocalReply | _Suspended | None:
        """``None``: go on; a ``LocalReply``: answer with it; ``SUSPENDED``: wait for resume.
        Called only if ``wants_request_headers``. Without ``resume`` the chain calls the
        request's own ``resume`` method (the data plane's request has one)."""
        ...

    def on_request_body(self, request: RequestInfo, chunk: bytes, end: bool) -> bytes:
        """A request body chunk (unframed), returned as it should be sent on; after the last
        chunk one call with ``b""`` and ``end=True`` (bodiless requests too). A Content-Length
        body keeps its length: a resized chunk is sent as received (docs/filters.md)."""
        ...

    def on_response_headers(self, response: ResponseInfo) -> None:
        """May change ``response.status`` and ``response.headers`` in place. A hook that changes
        the body's length removes ``content-length``; the data plane then re-frames."""
        ...

    def on_response_body(self, response: ResponseInfo, chunk: bytes, end: bool) -> bytes:
        """A response body chunk (unframed); ``end`` on the last call, whose chunk may be
        empty. Returns the bytes to send (possibly empty)."""
        ...

    def on_log(self, request: RequestInfo, status: int, duration_s: float) -> None:
        """After the response went out (or the exchange ended): never fails the request."""
        ...
