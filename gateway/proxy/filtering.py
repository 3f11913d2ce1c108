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
    from gateway.tls.accept import ListenerState


class FilteredConnection(Protocol):
    """What ``FilterState.resume`` uses of the connection (``lifecycle.RequestPhases``; a
    protocol here, as lifecycle imports this module)."""

    active: Exchange | None
    closed: bool
    listener: ListenerState  # FilterState.tls
    peer_ip: str  # FilterState.client_ip

    def request_id_of(self, ex: Exchange) -> bytes: ...

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


class FilterState(RequestInfo):
    """One exchange on a filtered route: the request as its filters see it, and what the data
    plane carries between phases (one object per request, built in ``_filter_request``).

    It is a ``RequestInfo`` whose costly fields are worked out when a hook reads them: the
    header list (``headers``; ``header_list`` stays None until then, so a chain that never
    reads it leaves the exchange's list untouched), ``vars`` (``var_dict``: None until a hook
    uses it), and the fields read from the exchange or the connection (``method``, ``route``,
    ``client_ip``, ``host``, ``query``, ``request_id``, ``protocol``, ``tls``; a hook assigning
    one of these is kept in ``overrides``). ``path`` and ``upstream`` are plain. The data plane
    builds it without ``__init__``: ``_filter_request`` sets every slot below but
    ``forward``, which is set when the chain suspends.

    Its bound ``resume`` is what the chain calls after an asynchronous request hook; the
    arguments of the phase after it are kept in ``forward`` only once the chain answered
    SUSPENDED (None again once resumed: a late or second resume is dropped)."""

    __slots__ = (
        "body_hook",
        "chain",
        "conn",
        "exchange",
        "forward",
        "header_list",
        "overrides",
        "raw_host",
        "raw_query",
        "request_body",
        "response",
        "var_dict",
    )

    chain: FilterChain
    conn: FilteredConnection
    exchange: Exchange
    forward: tuple[Any, ...] | None  # set while the request phase is suspended
    header_list: Headers | None  # what filters made of the request's fields (None: untouched)
    overrides: dict[str, Any] | None  # lazy fields a hook assigned to
    raw_host: bytes | None
    raw_query: bytes
    # on_request_body is called for the chunks that arrive from now on (set once the request
    # phase passed, for a chain that wants the body: see ``filter_held_body``).
    request_body: bool
    response: ResponseInfo  # set (with body_hook) when the response-headers phase ran
    body_hook: bool  # on_response_body is called for this response
    var_dict: dict[str, Any] | None

    __init__ = object.__init__  # built slot by slot (no Python frame): see _filter_request

    def resume(self, reply: LocalReply | None) -> None:
        """The chain's asynchronous request hooks are done (once, from the event loop); dropped
        if the client went away meanwhile."""
        conn = self.conn
        forward = getattr(self, "forward", None)  # unset: the chain never suspended
        if forward is None or conn.active is not self.exchange or conn.closed:
            return
        self.forward = None
        conn._request_filtered(self.exchange, self, reply, *forward)

    @property
    def request(self) -> FilterState:
        """The request filters see (this object)."""
        return self

    # --- the lazy fields of RequestInfo ---------------------------------------------------

    def _assigned(self, name: str, value: Any) -> None:
        overrides = self.overrides
        if overrides is None:
            overrides = self.overrides = {}
        overrides[name] = value

    @property
    def headers(self) -> Headers:
        headers = self.header_list
        if headers is None:
            exchange = self.exchange
            # A chunked request's HeadFields drops what is appended to it (trailers arrive
            # that way): filters get a plain copy, put back as HeadFields after their phase.
            headers = list(exchange.headers) if exchange.chunked else exchange.headers
            self.header_list = headers
        return headers

    @headers.setter
    def headers(self, value: Headers) -> None:
        self.header_list = value

    @property
    def vars(self) -> dict[str, Any]:
        found = self.var_dict
        if found is None:
            found = self.var_dict = {}
        return found

    @vars.setter
    def vars(self, value: dict[str, Any]) -> None:
        self.var_dict = value

    @property
    def method(self) -> str:
        if self.overrides is not None and "method" in self.overrides:
            return self.overrides["method"]  # type: ignore[no-any-return]
        return self.exchange.method_name

    @method.setter
    def method(self, value: str) -> None:
        self._assigned("method", value)

    @property
    def route(self) -> str:
        if self.overrides is not None and "route" in self.overrides:
            return self.overrides["route"]  # type: ignore[no-any-return]
        return self.exchange.route_name

    @route.setter
    def route(self, value: str) -> None:
        self._assigned("route", value)

    @property
    def client_ip(self) -> str:
        if self.overrides is not None and "client_ip" in self.overrides:
            return self.overrides["client_ip"]  # type: ignore[no-any-return]
        return self.conn.peer_ip

    @client_ip.setter
    def client_ip(self, value: str) -> None:
        self._assigned("client_ip", value)

    @property
    def host(self) -> str:
        if self.overrides is not None and "host" in self.overrides:
            return self.overrides["host"]  # type: ignore[no-any-return]
        raw = self.raw_host
        return raw.decode("latin-1") if raw is not None else ""

    @host.setter
    def host(self, value: str) -> None:
        self._assigned("host", value)

    @property
    def query(self) -> str:
        if self.overrides is not None and "query" in self.overrides:
            return self.overrides["query"]  # type: ignore[no-any-return]
        raw = self.raw_query
        return raw.decode("latin-1") if raw else ""

    @query.setter
    def query(self, value: str) -> None:
        self._assigned("query", value)

    @property
    def request_id(self) -> str:
        if self.overrides is not None and "request_id" in self.overrides:
            return self.overrides["request_id"]  # type: ignore[no-any-return]
        # Made (or the client's checked) now, as _forward would: the upstream gets this one.
        return self.conn.request_id_of(self.exchange).decode("ascii")

    @request_id.setter
    def request_id(self, value: str) -> None:
        self._assigned("request_id", value)

    @property
    def protocol(self) -> str:
        if self.overrides is not None and "protocol" in self.overrides:
            return self.overrides["protocol"]  # type: ignore[no-any-return]
        return "http/1.0" if self.exchange.version == "1.0" else "http/1.1"

    @protocol.setter
    def protocol(self, value: str) -> None:
        self._assigned("protocol", value)

    @property
    def tls(self) -> bool:
        if self.overrides is not None and "tls" in self.overrides:
            return self.overrides["tls"]  # type: ignore[no-any-return]
        return self.conn.listener.tls is not None

    @tls.setter
    def tls(self, value: bool) -> None:
        self._assigned("tls", value)


CHUNKED_END = b"0\r\n\r\n"


def filter_request_chunk(state: FilterState, exchange: Exchange, chunk: bytes) -> bytes:
    """One unframed request body chunk through ``on_request_body``. A Content-Length body
    keeps its length (the upstream was told it in the head): a chunk the filters resized is
    sent as received."""
    out = state.chain.on_request_body(state, chunk, False)
    if not exchange.chunked and len(out) != len(chunk):
        return chunk
    return out


def end_request_body(state: FilterState, exchange: Exchange) -> bytes:
    """The last call of ``on_request_body`` (``end=True``, empty chunk); returns what the
    filters add at the end (only a chunked body can take more bytes)."""
    tail = state.chain.on_request_body(state, b"", True)
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
    """A relayed header block (CRLF-terminated lines llhttp checked) as (lowercase name,
    value) pairs."""
    headers: Headers = []
    for line in fields.split(b"\r\n"):
        if line:
            name, _, value = line.partition(b":")
            headers.append((name.lower(), value.strip(b" \t")))
    return headers


# Never copied from a filter's list: the data plane frames these itself.
_FRAMED_FIELDS = _GATEWAY_FIELDS | {b"content-length"}
_COLON_JOIN = b": ".join


def header_block(headers: Headers) -> bytes:
    """Header lines from a filter's list, minus the fields the data plane frames itself."""
    block = b""
    for field in headers:
        if field[0].lower() not in _FRAMED_FIELDS:
            block += _COLON_JOIN(field) + b"\r\n"
    return block


class _Response(ResponseInfo):
    """The data plane's ResponseInfo: built slot by slot (no ``__init__`` frame)."""

    __slots__ = ()
    __init__ = object.__init__


def response_phase(state: FilterState, status: int, head: ResponseHead) -> tuple[int, ResponseHead]:
    """Run ``on_response_headers`` (if wanted) on a final response head; returns the status
    and head to relay. ``content-length`` is in the list the filter sees; if the filter
    removed it, the returned head has none and the caller re-frames the body.

    What the hooks left of the received fields is relayed as received: a list they did not
    change gives back ``head`` itself, and fields they only appended are added to its block
    (the usual ``headers`` filter); any other change rebuilds the block from the list."""
    chain = state.chain
    if not chain.wants_response_headers:
        return status, head  # (the caller tests this first: kept for other callers)
    fields = head.fields
    headers = header_list(fields)
    content_length = head.content_length
    if content_length is not None:
        headers.append((b"content-length", content_length))
    received = headers.copy()
    response = state.response = _Response()
    response.request = state
    response.status = status
    response.headers = headers
    state.body_hook = chain.wants_response_body
    chain.on_response_headers(response)
    new_status = response.status
    now = response.headers
    count = len(received)
    if now[:count] == received:
        added = now[count:]
        if not added:
            if new_status == status:
                return status, head
        else:
            fields += header_block(added)
            for name, value in added:
                if name.lower() == b"content-length":
                    content_length = value
    else:
        fields = header_block(now)
        content_length = None
        for name, value in now:
            if name.lower() == b"content-length":
                content_length = value
    return new_status, ResponseHead(
        head.reason if new_status == status else reason(new_status),
        fields,
        content_length,
        head.chunked,
        head.upgrade,
    )
