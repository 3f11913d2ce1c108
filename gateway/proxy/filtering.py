"""The data plane's side of the filter seam (the contract is gateway/filters/api.py).

Only routes whose name has a chain in ``Snapshot.filters`` get here: the lifecycle then keeps a
``FilterState`` on the exchange (``Exchange.filters``; None on every other route, so they pay
one attribute test per phase). This module turns the data plane's raw bytes into what filters
see (``RequestInfo``, a header list for ``ResponseInfo``) and back.
"""

from __future__ import annotations

from gateway.filters.api import FilterChain, Headers, RequestInfo, ResponseInfo
from gateway.proxy.headers import ResponseHead
from gateway.proxy.responses import reason

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
    """What one exchange on a filtered route carries between phases."""

    __slots__ = ("body_hook", "chain", "decided", "request", "response")

    def __init__(self, chain: FilterChain, request: RequestInfo) -> None:
        self.chain = chain
        self.request = request
        self.response: ResponseInfo | None = None
        self.body_hook = False  # on_response_body is called for this response
        self.decided = False  # the request phase is over (a late or second resume is dropped)


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
    headers = header_list(head.fields)
    if head.content_length is not None:
        headers.append((b"content-length", head.content_length))
    response = state.response = ResponseInfo(state.request, status, headers)
    state.body_hook = chain.wants_response_body
    if not chain.wants_response_headers:
        return status, head
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
