"""The data plane's side of the filter seam (the contract is gateway/filters/api.py).

Only routes whose name has a chain in ``Snapshot.filters`` get here: the lifecycle then keeps a
``FilterState`` on the exchange (``Exchange.filters``; None on every other route, so they pay
one attribute test per phase). This module turns the data plane's raw bytes into what filters
see (``RequestInfo``, a header list for ``ResponseInfo``) and back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from gateway.filters.api import FilterChain, Headers, LocalReply, RequestInfo, ResponseInfo
from gateway.proxy.body import RequestBody
from gateway.proxy.headers import ResponseHead
from gateway.proxy.responses import reason

if TYPE_CHECKING:
    from gateway.proxy.exchange import Exchange


class FilteredConnection(Protocol):
    """What ``FilterState.resume`` uses of the connection (``lifecycle.RequestPhases``; a
    protocol here, as lifecycle imports this module)."""

    active: Exchange | None
    closed: bool

    def _request_filtered(
        self, ex: Exchange, state: FilterState, reply: LocalReply | None, *forward: Any
    ) -> None: ...


# Fields the data plane decides itself (RFC 9110 §7.6.1, RFC 9112 §6): a filter may remove
# content-length (the body is then re-framed), but these are never copied from its list.
_GATEWAY_FIELDS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"trailer",
        b"x-request-id",
    }
)


class FilterState:
    """What one exchange on a filtered route carries between phases.

    Its bound ``resume`` is the callable the chain gets for an asynchronous request hook (no
    closure per request); the arguments of the phase after it are kept in ``forward`` only
    once the chain answered SUSPENDED."""

    __slots__ = (
        "body_hook",
        "chain",
        "conn",
        "decided",
        "exchange",
        "forward",
        "request",
        "request_body",
        "response",
    )

    def __init__(
        self, chain: FilterChain, request: RequestInfo, conn: FilteredConnection, exchange: Exchange
    ) -> None:
        self.chain = chain
        self.request = request
        self.conn = conn
        self.exchange = exchange
        self.forward: tuple[Any, ...] | None = None  # set while the request phase is suspended
        self.response: ResponseInfo | None = None
        self.body_hook = False  # on_response_body is called for this response
        # on_request_body is called for the chunks that arrive from now on (set once the
        # request phase passed, for a chain that wants the body: see ``filter_held_body``).
        self.request_body = False
        self.decided = False  # the request phase is over (a late or second resume is dropped)

    def resume(self, reply: LocalReply | None) -> None:
        """The chain's asynchronous request hooks are done (once, from the event loop); dropped
        if the client went away meanwhile."""
        conn = self.conn
        forward = self.forward
        if self.decided or forward is None or conn.active is not self.exchange or conn.closed:
            return
        conn._request_filtered(self.exchange, self, reply, *forward)


CHUNKED_END = b"0\r\n\r\n"


def filter_request_chunk(state: FilterState, exchange: Exchange, chunk: bytes) -> bytes:
    """One unframed request body chunk through ``on_request_body``. A Content-Length body
    keeps its length (the upstream was told it in the head): a chunk the filters resized is
    sent as received."""
    out = state.chain.on_request_body(state.request, chunk, False)
    if not exchange.chunked and len(out) != len(chunk):
        return chunk
    return out


def end_request_body(state: FilterState, exchange: Exchange) -> bytes:
    """The last call of ``on_request_body`` (``end=True``, empty chunk); returns what the
    filters add at the end (only a chunked body can take more bytes)."""
    tail = state.chain.on_request_body(state.request, b"", True)
    return tail if exchange.chunked else b""


def filter_held_body(state: FilterState, exchange: Exchange) -> None:
    """The request phase passed on a chain that wants the body: the chunks that arrived before
    (held framed in ``RequestBody.pending``, nothing sent yet) go through the filters now, and
    the end too if the request is complete (bodiless requests included: ``end=True`` comes
    once for every request). Later chunks are filtered as they arrive (``request_body``)."""
    state.request_body = True
    body = exchange.body
    chunked = exchange.chunked
    if body is not None and body.pending:
        refiltered: list[bytes] = []
        for framed in body.pending:
            if chunked:
                if framed == CHUNKED_END:
                    continue  # put back after the filters' tail below
                # Our own framing (ClientConnection.on_body): size CRLF data CRLF.
                chunk = framed[framed.index(b"\r\n") + 2 : -2]
            else:
                chunk = framed
            out = filter_request_chunk(state, exchange, chunk)
            if out:
                refiltered.append(b"%x\r\n%b\r\n" % (len(out), out) if chunked else out)
        body.pending = refiltered
        body.pending_bytes = sum(map(len, refiltered))
    if exchange.request_complete:
        tail = end_request_body(state, exchange)
        if chunked:
            if body is None:
                body = exchange.body = RequestBody(exchange.replay_limit)
            if tail:
                body.hold(b"%x\r\n%b\r\n" % (len(tail), tail))
            body.hold(CHUNKED_END)
        if body is not None and not body.pending:
            body.pending = None


def header_list(fields: bytes) -> Headers:
    """A relayed header block (CRLF-terminated lines) as (lowercase name, value) pairs."""
    headers: Headers = []
    for line in fields.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip(b" \t")))
    return headers


def header_block(headers: Headers) -> bytes:
    """Header lines from a filter's list, minus the fields the data plane frames itself."""
    return b"".join(
        b"%s: %s\r\n" % (name, value)
        for name, value in headers
        if name.lower() not in _GATEWAY_FIELDS and name.lower() != b"content-length"
    )


def response_phase(state: FilterState, status: int, head: ResponseHead) -> tuple[int, ResponseHead]:
    """Run ``on_response_headers`` (if wanted) on a final response head; returns the status
    and head to relay. ``content-length`` is in the list the filter sees; if the filter
    removed it, the returned head has none and the caller re-frames the body."""
    chain = state.chain
    if not chain.wants_response_headers:
        return status, head  # (the caller tests this first: kept for other callers)
    headers = header_list(head.fields)
    if head.content_length is not None:
        headers.append((b"content-length", head.content_length))
    response = state.response = ResponseInfo(state.request, status, headers)
    state.body_hook = chain.wants_response_body
    chain.on_response_headers(response)
    content_length: bytes | None = None
    for name, value in response.headers:
        if name.lower() == b"content-length":
            content_length = value
    new_status = response.status
    return new_status, ResponseHead(
        head.reason if new_status == status else reason(new_status),
        header_block(response.headers),
        content_length,
        head.chunked,
        head.upgrade,
    )
