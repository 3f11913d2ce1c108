"""HTTP/1.1 exchanges carried to HTTP/2 upstreams (``protocol: h2c | h2``).

An HTTP/1.1 request (or an HTTP/2 stream the bridge carries: routes with filters, Redis rate
limits) whose instance has an ``H2InstancePool`` runs every phase of the HTTP/1.1 path:
route, filters, admit, select peer (breaker, balancer, retry policy), and then ``relay._connect``
asks the pool for a connection. ``H2InstancePool.connect`` answers with a ``TranslatedStream``:
an ``upstream.UpstreamLink``, the connection surface the HTTP/1.1 phases drive (``send``,
``pause_reading``, ``discard``, ``pool.release`` …), that carries the one exchange as one
``H2Stream``. So the response phases (filters, framing, metrics, access log), the failover
(retries, timeouts, ``record_outcome``) and the backpressure of the HTTP/1.1 path apply as
they are; this module only translates.

- **Request head**: the HTTP/1.1 head the lifecycle built (``headers.build_request_head``:
  forwarding headers, request id, Host rewrite) becomes a header list: Host → ``:authority``,
  connection-specific fields dropped (RFC 9113 §8.2.2), ``te: trailers`` kept when the client
  asked for it (the only TE value HTTP/2 allows).
- **Request body**: the framed bytes the lifecycle writes (raw for Content-Length, chunks it
  framed itself for chunked) become DATA; the end of the body (the declared length, or the last
  chunk) is END_STREAM. When the stream's window is full, ``on_send_paused`` pauses reading the
  client (``pause_client_reading``), as a full upstream socket does.
- **Response**: the HEADERS become a ``ResponseHead`` (Content-Length kept when the upstream
  sent one, else the HTTP/1.1 side chunks the body); DATA is acknowledged upstream once it was
  written toward the client and the client socket is not paused (``pause_reading``), so a slow
  client stops the upstream after one stream window. Trailers go to the client as a chunked
  trailer section when it sent ``TE: trailers`` (RFC 9110 §10.1.4) and the body is chunked,
  else they are dropped.
- **Failures**: ``on_connect_error`` is a connect failure (retried, 502/504); a reset is the
  HTTP/1.1 path's ``on_upstream_failed`` (a retry when the policy allows, else 502 or an abort
  mid-body); a never-processed stream (REFUSED_STREAM, GOAWAY) is retried as a connect failure
  (RFC 9113 §8.7: any method).
- **gRPC-Web** (the ``grpc_web`` filter marked the request): request ``-text`` bodies are
  base64-decoded as they stream; the response content type is mapped back, the trailers become a
  trailer frame at the end of the body (flag 0x80), and ``-text`` responses are base64-encoded
  in streamed chunks.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from gateway.filters.grpc_web import GRPC_WEB_VAR, TEXT_TYPE
from gateway.proxy.exchange import FRAME_CHUNKED, FRAME_NONE
from gateway.proxy.h2.client import CONNECTION_LOST, H2Stream, request_headers
from gateway.proxy.headers import HOP_BY_HOP, ResponseHead
from gateway.resilience.retry import CONNECT_FAILURE

if TYPE_CHECKING:
    from gateway.proxy.attempt import UpstreamAttempt
    from gateway.proxy.exchange import Exchange
    from gateway.proxy.h2.client import H2InstancePool, Headers
    from gateway.proxy.listener import ClientConnection
    from gateway.proxy.upstream import UpstreamTry

# RFC 9113 §8.2.2: fields that are connection-specific in HTTP/1.1 and malformed in HTTP/2.
_REQUEST_DROP = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
        b"host",
    }
)
# Response fields the HTTP/1.1 side frames or sets itself.
_RESPONSE_DROP = HOP_BY_HOP | {b"x-request-id", b"content-length"}
# RFC 9110 §6.5.1: fields a trailer section must not carry (framing, routing, auth, control).
_TRAILER_DROP = _RESPONSE_DROP | {
    b"authorization",
    b"cache-control",
    b"content-encoding",
    b"content-range",
    b"content-type",
    b"host",
    b"set-cookie",
}
_REASONS: dict[int, bytes] = {}


def _reason(status: int) -> bytes:
    reason = _REASONS.get(status)
    if reason is None:
        from http import HTTPStatus

        try:
            reason = HTTPStatus(status).phrase.encode("ascii")
        except ValueError:
            reason = b""
        _REASONS[status] = reason
    return reason


def _field_ok(name: bytes, value: bytes) -> bool:
    # h2 validates names; a value must not smuggle a line end into the HTTP/1.1 head.
    return b"\r" not in value and b"\n" not in value and b"\x00" not in value


def h2_request_headers(head: bytes, scheme: bytes, client_te_trailers: bool) -> Headers:
    """The HTTP/1.1 request head the lifecycle built (request line, CRLF-terminated fields,
    blank line) as an HTTP/2 header list (RFC 9113 §8.3.1 pseudo-headers first)."""
    lines = head.split(b"\r\n")
    method, _, rest = lines[0].partition(b" ")
    target = rest.rpartition(b" ")[0]
    authority = b""
    fields: Headers = []
    for line in lines[1:]:
        if not line:
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip()
        if name == b"host":
            authority = value
        elif name not in _REQUEST_DROP:
            fields.append((name, value))
    if client_te_trailers:
        fields.append((b"te", b"trailers"))
    return request_headers(method, scheme, authority, target, fields)


def wants_trailers(headers: Headers) -> bool:
    """The client sent ``TE: trailers`` (RFC 9110 §10.1.4)."""
    return any(name == b"te" and b"trailers" in value.lower() for name, value in headers)


def response_head(status: int, headers: Headers, grpc_web: str | None) -> ResponseHead:
    """An upstream HTTP/2 response head as the HTTP/1.1 response phases take it
    (``grpc_web``: the gRPC-Web content type the client sent, for a translated call)."""
    fields = []
    content_length: bytes | None = None
    for name, value in headers:
        if name in _RESPONSE_DROP:
            if name == b"content-length" and grpc_web is None:
                content_length = value
            continue
        if not _field_ok(name, value):
            continue
        if grpc_web is not None and name == b"content-type":
            value = grpc_web_content_type(value, grpc_web)
        fields.append(b"%s: %s\r\n" % (name, value))
    return ResponseHead(_reason(status), b"".join(fields), content_length, False, None)


def grpc_web_content_type(value: bytes, client_type: str) -> bytes:
    """A gRPC response's ``application/grpc[+codec]`` → the gRPC-Web type the client sent
    (``application/grpc-web[-text][+codec]``); other types are left alone."""
    if not value.startswith(b"application/grpc") or value.startswith(b"application/grpc-web"):
        return value
    return client_type.encode("latin-1")


def grpc_web_trailer_frame(trailers: Headers) -> bytes:
    """gRPC-Web's trailer frame: flag 0x80, 4-byte length, ``name: value\\r\\n`` lines."""
    block = b"".join(
        b"%s: %s\r\n" % (name, value) for name, value in trailers if _field_ok(name, value)
    )
    return b"\x80" + len(block).to_bytes(4, "big") + block


class Base64Stream:
    """Streamed base64, either way: whole 3-byte (encode) or 4-char (decode) groups go out at
    once, the rest waits for the next chunk or ``end``."""

    __slots__ = ("carry", "decoding")

    def __init__(self, decoding: bool) -> None:
        self.decoding = decoding
        self.carry = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self.carry + chunk if self.carry else chunk
        if self.decoding:
            data = data.translate(None, b" \t\r\n")
            cut = len(data) - len(data) % 4
            self.carry = data[cut:]
            # Padded segments may follow each other (one per message): decode 4-char groups.
            return _decode(data[:cut])
        cut = len(data) - len(data) % 3
        self.carry = data[cut:]
        return binascii.b2a_base64(data[:cut], newline=False) if cut else b""

    def end(self) -> bytes:
        carry, self.carry = self.carry, b""
        if self.decoding:
            if carry:
                raise binascii.Error("base64 body ends inside a 4-character group")
            return b""
        return binascii.b2a_base64(carry, newline=False) if carry else b""


def _decode(data: bytes) -> bytes:
    if not data:
        return b""
    if b"=" not in data[:-2]:
        return binascii.a2b_base64(data, strict_mode=True)
    out = []
    for start in range(0, len(data), 4):
        out.append(binascii.a2b_base64(data[start : start + 4], strict_mode=True))
    return b"".join(out)


class TranslatedStream:
    """One HTTP/1.1 exchange carried as one HTTP/2 stream: an ``upstream.UpstreamLink``, the
    surface of a connection that the HTTP/1.1 phases use (``pool.release`` is ``release``)."""

    __slots__ = (
        "attempt",
        "body_left",
        "chunked",
        "client_trailers",
        "decoder",
        "encoder",
        "ex",
        "grpc_web",
        "h2pool",
        "held",
        "owner",
        "paused",
        "stream",
        "trailers",
    )

    used = False  # never a stale pooled connection: the pool retries nothing by itself

    def __init__(self, h2pool: H2InstancePool) -> None:
        self.h2pool = h2pool
        self.owner: ClientConnection | None = None
        self.attempt: UpstreamAttempt | None = None
        self.ex: Exchange | None = None
        self.stream: H2Stream | None = None
        self.chunked = False
        self.body_left = 0  # Content-Length bytes still to come
        self.paused = False  # the client cannot take more: stop acknowledging
        self.held = 0  # response bytes not acknowledged while paused
        self.client_trailers = False
        self.trailers: Headers | None = None
        self.grpc_web: str | None = None
        self.decoder: Base64Stream | None = None
        self.encoder: Base64Stream | None = None

    # -- upstream.UpstreamLink: the connection surface the HTTP/1.1 phases use --------------
    @property
    def pool(self) -> TranslatedStream:
        return self  # relay._response_done: ``conn.pool.release(conn)``

    @property
    def transport(self) -> TranslatedStream:
        return self  # relay._attach/_send_pending: ``conn.transport.writelines(...)``

    def begin_exchange(self, owner: UpstreamTry, head_only: bool) -> None:
        attempt = self.attempt = cast("UpstreamAttempt", owner)  # (the phases' only kind)
        client = self.owner = cast("ClientConnection", attempt.client)
        ex = self.ex = attempt.ex
        if self.h2pool.error_counter.metrics is None:  # (gateway_http2_errors_total)
            self.h2pool.bind_metrics(client.server.metrics)
        filters = client.filters
        if filters is not None and ex is not None:
            mode = filters.request.vars.get(GRPC_WEB_VAR)
            if isinstance(mode, str):
                self.grpc_web = mode
                if mode.startswith(TEXT_TYPE):
                    self.decoder = Base64Stream(decoding=True)
                    self.encoder = Base64Stream(decoding=False)

    def send(self, data: bytes) -> None:
        self.writelines((data,))

    def write(self, data: bytes) -> None:
        self.writelines((data,))

    def writelines(self, pieces: tuple[bytes, ...] | list[bytes]) -> None:
        for piece in pieces:
            if self.owner is None:
                return
            if self.stream is None:
                self._open(piece)
            elif self.chunked:
                # One whole chunk per piece, framed by the lifecycle: "%x\r\n" data "\r\n".
                if piece == b"0\r\n\r\n":
                    self._body(b"", True)
                else:
                    self._body(piece[piece.index(b"\r\n") + 2 : -2], False)
            else:
                self.body_left -= len(piece)
                self._body(piece, self.body_left <= 0)

    def is_closing(self) -> bool:
        return self.owner is None

    def _open(self, head: bytes) -> None:
        ex = self.ex
        assert ex is not None
        self.chunked = ex.chunked
        self.client_trailers = wants_trailers(ex.headers)
        te_trailers = self.client_trailers or self.grpc_web is not None
        scheme = b"https" if self.h2pool.ssl_context is not None else b"http"
        headers = h2_request_headers(head, scheme, te_trailers)
        if self.grpc_web is not None:
            # The body is re-encoded (base64, trailer frame): no length to promise.
            headers = [(n, v) for n, v in headers if n != b"content-length"]
        length = 0
        if not ex.chunked and ex.content_length is not None and ex.upgrade is None:
            length = int(ex.content_length)
        self.body_left = length
        end_stream = not ex.chunked and length == 0
        self.stream = self.h2pool.open_stream(headers, end_stream, self)

    def _body(self, data: bytes, end: bool) -> None:
        stream = self.stream
        assert stream is not None
        decoder = self.decoder
        if decoder is not None:
            try:
                data = decoder.feed(data)
                if end:
                    data += decoder.end()
            except (binascii.Error, ValueError):
                self._bad_request_body()
                return
        if data or end:
            stream.send_data(data, end)

    def _bad_request_body(self) -> None:
        owner, ex = self.owner, self.ex
        self.discard()
        if owner is not None and ex is not None and owner.active is ex:
            owner._upstream_error(ex, 400, "grpc_web_bad_body", "gRPC-Web text body is not base64")

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        held, self.held = self.held, 0
        if held and self.stream is not None:
            self.stream.acknowledge(held)

    def release(self, conn: object) -> None:
        """The response is complete and so is the request: nothing is left to do."""
        self.owner = None
        self.stream = None

    def discard(self) -> None:
        """Given up mid-exchange (client gone, timeout, retry): RST_STREAM(CANCEL)."""
        self.owner = None
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.reset()

    close = discard  # the response ended before the request body: stop sending it
    abort = discard

    def protocol_error(self, reason: str) -> None:
        owner, ex = self.owner, self.ex
        if owner is not None and ex is not None:
            owner.server.metrics.upstream_protocol_error(ex.upstream_name, reason)

    # -- StreamListener ----------------------------------------------------------------------
    def _current(self) -> ClientConnection | None:
        owner = self.owner
        if owner is None or owner.closed:
            return None
        ex = owner.active
        if ex is None or ex is not self.ex:
            return None
        attempt = self.attempt
        if attempt is None or attempt.conn is not self:
            return None
        return owner

    def _primary(self, ex: Exchange) -> bool:
        return self.attempt is not None and ex.attempt is self.attempt

    def _attempt(self) -> UpstreamAttempt:
        attempt = self.attempt
        assert attempt is not None  # _current() found it
        return attempt

    def on_response_headers(self, status: int, headers: Headers) -> None:
        owner = self._current()
        if owner is None:
            return
        grpc_web = self.grpc_web
        if grpc_web is not None and not any(
            name == b"content-type" and value.startswith(b"application/grpc")
            for name, value in headers
        ):
            grpc_web = self.grpc_web = None  # not a gRPC answer: relayed as it is
            self.encoder = None
        owner.on_response_head(
            self._attempt(), status, response_head(status, headers, grpc_web), True
        )
        owner.flush_to_client()

    def on_data(self, chunk: bytes) -> None:
        owner = self._current()
        if owner is None:
            return
        encoder = self.encoder
        out = encoder.feed(chunk) if encoder is not None else chunk
        if out:
            owner.on_response_body(self._attempt(), out)
            owner.flush_to_client()  # may pause_writing → pause_reading here
        stream = self.stream
        if stream is None:
            return
        if self.paused:
            self.held += len(chunk)
        else:
            stream.acknowledge(len(chunk))

    def on_trailers(self, headers: Headers) -> None:
        self.trailers = headers

    def on_end(self) -> None:
        owner = self._current()
        if owner is None:
            return
        ex = self.ex
        assert ex is not None
        trailers = self.trailers
        if self.grpc_web is not None:
            tail = grpc_web_trailer_frame(trailers) if trailers else b""
            encoder = self.encoder
            if encoder is not None:
                tail = encoder.feed(tail) + encoder.end()
            if tail:
                owner.on_response_body(self._attempt(), tail)
        elif (
            trailers
            and self.client_trailers
            and ex.response_frame == FRAME_CHUNKED
            and (owner.filters is None or not owner.filters.body_hook)
        ):
            lines = [
                b"%s: %s\r\n" % (name, value)
                for name, value in trailers
                if name not in _TRAILER_DROP and _field_ok(name, value)
            ]
            # The last chunk with a trailer section (RFC 9112 §7.1.2), written here: relay
            # writes a bare "0\r\n\r\n" only for a response still FRAME_CHUNKED.
            owner.out.append(b"0\r\n" + b"".join(lines) + b"\r\n")
            ex.response_frame = FRAME_NONE  # nothing more to frame
        stream, self.stream = self.stream, None
        held, self.held = self.held, 0
        if held and stream is not None:
            # The stream is over: what a paused client still holds goes back to the
            # connection's window (h2 ignores the closed stream's part).
            stream.acknowledge(held)
        owner.on_response_message_complete(self._attempt())

    def on_reset(self, error_code: int, never_processed: bool) -> None:
        owner = self._current()
        self.stream = None
        if owner is None:
            return
        ex = self.ex
        assert ex is not None
        # RFC 9113 §8.7: a never-processed stream is retried like a connect failure.
        if (
            never_processed
            and not ex.response_started
            and self._primary(ex)
            and owner._try_failed(ex, CONNECT_FAILURE)
        ):
            return
        if error_code == CONNECTION_LOST:
            reason = "upstream HTTP/2 connection lost"
        else:
            reason = f"upstream reset the HTTP/2 stream (error code {error_code})"
        owner.on_upstream_failed(self._attempt(), self, reason)
        owner.flush_to_client()

    def on_connect_error(self, error: BaseException) -> None:
        owner = self._current()
        self.stream = None
        if owner is None:
            return
        ex = self.ex
        assert ex is not None
        if not self._primary(ex):  # a hedge: the first try goes on alone
            owner.on_upstream_failed(self._attempt(), self, f"cannot connect to upstream: {error}")
            return
        self.owner = None
        owner._connect_failed(ex, error)

    def on_send_paused(self) -> None:
        owner = self._current()
        if owner is not None:
            owner.pause_client_reading()

    def on_send_resumed(self) -> None:
        owner = self._current()
        if owner is not None:
            owner.resume_client_reading()


def connect_translated(
    pool: H2InstancePool, callback: Callable[[Any, BaseException | None], object]
) -> None:
    """``H2InstancePool.connect`` for the HTTP/1.1 data plane: a ``TranslatedStream`` at once
    (the HTTP/2 connection is opened, or shared, when the request head is sent)."""
    pool.loop.call_soon(callback, TranslatedStream(pool), None)


__all__ = [
    "Base64Stream",
    "TranslatedStream",
    "connect_translated",
    "grpc_web_content_type",
    "grpc_web_trailer_frame",
    "h2_request_headers",
    "response_head",
]
