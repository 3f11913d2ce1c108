"""The HTTP/1.1 request codec's stateful half, as a mixin of ``ClientConnection``: the
httptools callbacks that fill an ``Exchange`` (``on_message_begin`` … ``on_message_complete``),
the framing checks llhttp leaves to us, the byte count of a head that spans reads, the chunked
walker run after each read (``_walk_chunked``), the refeed of an extension method llhttp
refuses (``_refeed_extension_method``), and the mapping of parse errors to answers
(``_reject_parsing``). The pure half (tables, Host check, walker steps, parser stand-ins) is
``h1.py``; ``ClientConnection.data_received`` (listener.py) drives both
(docs/request-validation.md).
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from gateway.proxy import filtering
from gateway.proxy import headers as hdr
from gateway.proxy.body import RequestBody
from gateway.proxy.exchange import CW_DONE, CW_START, Exchange
from gateway.proxy.h1 import (
    CW_DESYNC,
    CW_EXTENSIONS_TOO_LONG,
    CW_LINE_TOO_LONG,
    CW_MAX_CANDIDATES,
    CW_TRAILER_TOO_LARGE,
    H_CONNECTION,
    H_CONTENT_LENGTH,
    H_HOST,
    H_IDEMPOTENCY_KEY,
    H_REQUEST_ID,
    H_TRANSFER_ENCODING,
    H_UPGRADE,
    HELD_METHOD_PARSER,
    KNOWN_METHODS,
    LLHTTP_METHODS,
    MAX_METHOD_BYTES,
    MAX_PREFIX_BYTES,
    METHOD_HELD,
    SPECIAL_HEADERS,
    STAND_IN_METHOD,
    UNDERSCORE,
    UNDERSCORE_ALLOW,
    UNDERSCORE_REJECT,
    UNKNOWN_METHOD_ERRORS,
    VALID_HOSTS,
    HeadFields,
    checked_host,
    reset_walk,
    walk_framing,
)
from gateway.proxy.relay import ResponsePhases
from gateway.proxy.responses import RequestRejected

if TYPE_CHECKING:
    from gateway.config.model import LimitsConfig


# At module level (not for the type checker only) because mypyc compiles it: the native base of
# ClientConnection, which holds the state the mixins (mypyc traits) share.
class H1Downstream(ResponsePhases):
    """What the HTTP/1.1 mixins (``RequestCodec``, ``flowcontrol.FlowControl``) use of
    ``ClientConnection`` beyond the downstream seam (its ``__init__`` sets them)."""

    __slots__ = (
        "allowed_methods",
        "body_deadline",
        "chunked_walk",
        "head_deadline",
        "head_limit",
        "head_received",
        "head_tail",
        "idle_deadline",
        "limits",
        "method_carry",
        "method_hook",
        "parser",
        "pending_error",
        "real_method",
        "send_deadline",
        "to_dispatch",
        "underscores",
    )

    parser: httptools.HttpRequestParser
    limits: LimitsConfig  # the snapshot's at accept: a reload applies to new connections
    to_dispatch: bool  # the active exchange waits for the end of this read to go upstream
    pending_error: RequestRejected | None  # answered after the active exchange
    head_deadline: float
    idle_deadline: float
    body_deadline: float
    send_deadline: float
    head_received: int
    head_limit: int
    head_tail: bytes
    chunked_walk: list[Exchange] | None
    underscores: int
    allowed_methods: frozenset[str] | None
    method_carry: bytes | None
    real_method: bytes | None
    method_hook: bool

    def is_idle(self) -> bool:
        raise NotImplementedError

    def close_idle(self) -> None: ...
    def _reject_parsing(self, rejected: RequestRejected) -> None: ...


class RequestCodec(H1Downstream):
    """httptools callbacks, chunked walk, extension-method refeed and parse errors (mixed
    into ``ClientConnection``, which has the slots)."""

    __slots__ = ()

    # -- per read (called by data_received) ---------------------------------------------------
    def _read_inside_head(self, parsing: Exchange, data: bytes) -> bool:
        """The read ended inside a request head: keep what the refeed and the chunked walk need
        of it, and count its bytes. False: the head grew too large (rejected)."""
        if not parsing.headers:
            # The read ended inside the request line of a message that began with it: keep
            # the bytes, in case llhttp refuses its method once it has it all (extension
            # method; llhttp refuses its RTSP names only at the version).
            if self.head_received < 0:  # (a message pipelined mid-read: see below)
                parsing.method_prefix = data
            elif parsing.method_prefix:
                prefix = parsing.method_prefix + data
                parsing.method_prefix = prefix if len(prefix) <= MAX_PREFIX_BYTES else b""
        # The last 3 bytes of the head so far: its blank line may straddle the next read.
        if len(data) >= 3:
            self.head_tail = data[-3:]
        else:
            tail = self.head_tail + data if self.head_received >= 0 else data
            self.head_tail = tail[-3:]
        # Still inside a request head. httptools hands over a header only once it is
        # complete, so an endless header line would grow unchecked: count raw bytes.
        if self.head_received < 0:
            # The head began in this chunk, after any earlier messages in it: estimate its
            # size from the last end of a head (an underestimate only delays by a chunk).
            end = data.rfind(b"\r\n\r\n")
            self.head_received = len(data) - (end + 4 if end >= 0 else 0)
        else:
            self.head_received += len(data)
        if self.head_received > self.head_limit:
            self._reject_parsing(
                RequestRejected(431, "headers_too_large", "request header fields too large")
            )
            return False
        return True

    # -- upgrade, extension-method refeed, chunked walk -----------------------------------------
    def _begin_upgrade(self, data: bytes, offset: int) -> None:
        self.head_received = 0
        self.upgrade_pending = True
        self.tunnel_pending = [data[offset:]]
        self._update_reading()

    def _refeed_extension_method(
        self, error: httptools.HttpParserError, data: bytes
    ) -> bytes | None:
        """llhttp refused a method: if it is a token llhttp does not know (an extension method,
        RFC 9110 §9.1) beginning the first message of this read, parse the read again with a
        stand-in method and restore the real one in ``on_headers_complete``.

        Returns the bytes fed (for the rest of ``data_received``), or None when the request was
        rejected or the token is not complete yet. An unknown method later in a read (behind a
        pipelined request) cannot be re-fed (llhttp does not say where it stopped): 400. (A
        message begun mid-read has the earlier message's method as first token: known, so 400.)
        """
        candidate: bytes | None = None
        parsing = self.parsing
        if error is METHOD_HELD:
            candidate = self.method_carry + data  # type: ignore[operator]
            self.method_carry = None
        elif error.args and error.args[0] in UNKNOWN_METHOD_ERRORS and parsing is not None:
            if self.head_received < 0:
                candidate = data  # the refused message began in this read
            elif parsing.method_prefix:
                candidate = parsing.method_prefix + data  # the token began in an earlier read
        if candidate is not None:
            space = candidate.find(b" ", 0, MAX_METHOD_BYTES + 1)
            token = candidate[:space] if space > 0 else candidate
            if (
                token not in LLHTTP_METHODS
                and len(token) <= MAX_METHOD_BYTES
                and hdr.valid_token(token)
            ):
                self.parsing = None
                self.head_received = 0
                if space < 0:
                    # Wait for the rest of the token: the next read goes to a stand-in parser
                    # that refuses it, which brings it back here (no check per read).
                    self.method_carry = candidate
                    self.parser = HELD_METHOD_PARSER  # type: ignore[assignment]
                    return None
                self.parser = httptools.HttpRequestParser(self)
                self.real_method = token
                self.method_hook = True
                fed = STAND_IN_METHOD + candidate[space:]
                try:
                    self.parser.feed_data(fed)
                except httptools.HttpParserUpgrade as upgrade:
                    self._begin_upgrade(fed, upgrade.args[0])
                except httptools.HttpParserError as second:
                    self._on_parse_error(second)
                    return None
                return fed
        self._on_parse_error(error)
        return None

    def _walk_chunked(self, data: bytes) -> bool:
        """Measure the chunked framing this read carried for each chunked request body.

        llhttp validated the bytes, but it reports neither chunk extensions nor the raw size of
        trailer lines, so the framing is walked here: chunk-size lines against
        ``max_chunk_line_bytes``, their extensions against ``max_chunk_extensions_bytes``, the
        trailer section against ``max_header_bytes``. Data bytes are skipped by count, never
        scanned. The walk must agree with llhttp (same body bytes, same end) or the request is
        refused. False: a request was rejected.
        """
        walk = self.chunked_walk
        assert walk is not None
        limits = self.limits
        max_line = limits.max_chunk_line_bytes
        max_extensions = limits.max_chunk_extensions_bytes
        max_trailer = limits.max_header_bytes
        position = 0
        for ex in list(walk):
            if ex.cw_state == CW_START:
                # The head ended in this read: the body starts after its blank line. If the
                # head began here behind other requests, the first blank line may be theirs;
                # candidates are tried until one walks in agreement with llhttp.
                tail = ex.cw_tail
                buffer = tail + data if tail else data
                search = position  # (with a tail, position is 0: the head began earlier)
                outcome = CW_DESYNC
                for _ in range(CW_MAX_CANDIDATES):
                    found = buffer.find(b"\r\n\r\n", search)
                    if found < 0:
                        break
                    outcome = walk_framing(
                        ex, data, found + 4 - len(tail), max_line, max_extensions, max_trailer
                    )
                    if outcome != CW_DESYNC:
                        break
                    reset_walk(ex)
                    search = found + 1
            else:
                outcome = walk_framing(ex, data, position, max_line, max_extensions, max_trailer)
            if outcome < 0:
                self._reject_walked(ex, outcome)
                return False
            position = outcome
            if ex.cw_state == CW_DONE:
                walk.remove(ex)
        if not walk:
            self.chunked_walk = None
        return True

    def _reject_walked(self, ex: Exchange, outcome: int) -> None:
        if outcome == CW_LINE_TOO_LONG:
            rejected = RequestRejected(400, "bad_request", "chunk-size line too long")
        elif outcome == CW_EXTENSIONS_TOO_LONG:
            rejected = RequestRejected(400, "bad_request", "chunk extensions too long")
        elif outcome == CW_TRAILER_TOO_LARGE:
            rejected = RequestRejected(431, "headers_too_large", "trailer section too large")
        else:
            rejected = RequestRejected(400, "bad_request", "chunked framing not understood")
        self.chunked_walk = None
        if ex is self.active:
            self.parsing = ex  # an exchange streaming upstream is aborted with it
        self._reject_parsing(rejected)

    # -- httptools callbacks (request) -------------------------------------------------------
    def on_message_begin(self) -> None:
        server = self.server
        limits = self.limits
        self.head_received = -1  # "began in the current chunk"
        self.parsing = Exchange(time.perf_counter(), limits.max_body_bytes)
        self.head_deadline = server.clock + limits.header_timeout

    def on_url(self, url: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        ex.url += url
        if len(ex.url) > self.limits.max_uri_bytes:
            raise RequestRejected(414, "uri_too_long", "request target is too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        name = name.lower()
        ex.header_bytes += len(name) + len(value) + 4
        if ex.header_bytes > self.limits.max_header_bytes:
            raise RequestRejected(431, "headers_too_large", "request header fields too large")
        if UNDERSCORE in name:
            # Backends that read "_" as "-" would see another field (a smuggling vector).
            action = self.underscores
            if action == UNDERSCORE_REJECT:
                raise RequestRejected(400, "bad_request", "header field name with '_'")
            if action == UNDERSCORE_ALLOW and not hdr.underscore_lookalike(name):
                headers = ex.headers
                if type(headers) is HeadFields:
                    headers.trailer((name, value))
                else:
                    headers.append((name, value))
            return
        special = SPECIAL_HEADERS.get(name)
        if special is not None:
            if special == H_HOST:
                if value not in VALID_HOSTS:
                    value = checked_host(value)  # RFC 9112 §3.2: an invalid Host gets 400
                ex.host = value
                ex.host_count += 1
            elif special == H_CONTENT_LENGTH:
                ex.content_length = value
                ex.cl_count += 1
            elif special == H_TRANSFER_ENCODING:
                ex.chunked = True
                ex.te_count += 1
            elif special == H_CONNECTION:
                ex.conn_tokens = ex.conn_tokens | hdr.connection_tokens(value)
            elif special == H_UPGRADE:
                ex.upgrade = value
            elif special == H_REQUEST_ID:
                ex.request_id = value
            elif special == H_IDEMPOTENCY_KEY:
                self.keyed = True
                if ex.idem_keys is None:
                    ex.idem_keys = [value]
                    ex.body_hash = hashlib.sha256()  # the fingerprint may cover the body
                else:
                    ex.idem_keys.append(value)
        headers = ex.headers
        if type(headers) is HeadFields:
            # A trailer field. Called by name: compiled, ``append`` on a list is ``list.append``.
            headers.trailer((name, value))
        else:
            headers.append((name, value))

    def on_headers_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        parser = self.parser
        method = parser.get_method()
        if self.method_hook:
            method = self._method_hook(ex, method)
        ex.method = method
        ex.method_name = method.decode("ascii")
        version = parser.get_http_version()
        if version != "1.1":  # (defaults are not stored: exchange.py, lifecycle._forward)
            ex.version = version
        ex.keep_alive = parser.should_keep_alive()
        if method == b"HEAD":
            ex.is_head = True
        upgrading = parser.should_upgrade()
        # Framing checks llhttp leaves to us. RFC 9112 §3.2: exactly one Host in HTTP/1.1.
        if ex.host_count > 1 or (ex.host_count == 0 and version == "1.1"):
            ex.error = RequestRejected(400, "bad_request", "exactly one Host header is required")
        elif ex.cl_count > 1:
            # RFC 9112 §6.3: differing or repeated lengths make the framing ambiguous.
            ex.error = RequestRejected(400, "bad_request", "more than one Content-Length header")
        elif ex.chunked and ex.content_length is not None:
            ex.error = RequestRejected(
                400, "bad_request", "both Content-Length and Transfer-Encoding"
            )
        elif ex.chunked and version == "1.0":
            # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message signals faulty framing.
            ex.error = RequestRejected(
                400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request"
            )
        elif ex.chunked and ex.te_count > 1:
            ex.error = RequestRejected(400, "bad_request", "more than one Transfer-Encoding header")
        elif version != "1.1" and version != "1.0":
            # RFC 9110 §15.6.6: llhttp parses "HTTP/2.0" in a request line; this is HTTP/1.x only.
            ex.error = RequestRejected(
                505, "version_not_supported", f"HTTP/{version} is not supported"
            )
        elif method == b"CONNECT":
            ex.error = RequestRejected(405, "method_not_allowed", "CONNECT is not supported")
        if ex.chunked:
            # llhttp reports trailer fields through on_header too (appending to ex.headers):
            # this list keeps the head's fields and checks, then drops, what is appended later.
            ex.headers = HeadFields(ex.headers)
            if ex.error is None and not upgrading:
                if self.head_received >= 0:
                    ex.cw_tail = self.head_tail  # the head began in an earlier read
                if self.chunked_walk is None:
                    self.chunked_walk = [ex]
                else:
                    self.chunked_walk.append(ex)
        if not upgrading or ex.error is not None or b"upgrade" not in ex.conn_tokens:
            ex.upgrade = None
        self.head_deadline = 0.0
        if self.active is None and self.pending_error is None:
            self.active = ex
            self.to_dispatch = True
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
            self._update_reading()

    def _method_hook(self, ex: Exchange, method: bytes) -> bytes:
        """The real method of a request parsed with a stand-in, and limits.allowed_methods
        (errors found later in on_headers_complete take precedence)."""
        real = self.real_method
        if real is not None:
            method = real  # an extension method llhttp parsed as STAND_IN_METHOD
            self.real_method = None
            self.method_hook = self.allowed_methods is not None
        allowed = self.allowed_methods
        if allowed is not None:
            name = method.decode("ascii")
            if name not in allowed:
                ex.error = self._method_refused(name)
        return method

    def _method_refused(self, method: str) -> RequestRejected:
        allowed = self.allowed_methods
        assert allowed is not None
        if method in KNOWN_METHODS:
            # RFC 9110 §15.5.6: a known method not allowed here; Allow lists what is.
            rejected = RequestRejected(405, "method_not_allowed", f"method {method} is not allowed")
            rejected.headers = b"allow: %s\r\n" % ", ".join(sorted(allowed)).encode("ascii")
            return rejected
        # RFC 9110 §15.6.2: a method the server does not recognise or implement.
        return RequestRejected(501, "not_implemented", f"method {method} is not implemented")

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        assert ex is not None
        size = len(body)
        ex.body_bytes += size
        if ex.body_bytes > ex.max_body:
            raise RequestRejected(413, "body_too_large", "request body exceeds the limit")
        if self.keyed and ex.body_hash is not None:
            ex.body_hash.update(body)
            if ex.recorder is not None:
                ex.recorder.request_body(ex)
        filters = self.filters
        if filters is not None and filters.request_body and filters.exchange is ex:
            # Filtered before it is framed; chunks before the request phase passed are held
            # and filtered then (filtering.filter_held_body).
            body = filtering.filter_request_chunk(filters, ex, body)
            if not body:
                return
            size = len(body)
        framed = b"%x\r\n%b\r\n" % (size, body) if ex.chunked else body
        attempt = ex.attempt
        conn = attempt.conn if attempt is not None else None
        request_body = ex.body
        if request_body is None:
            request_body = ex.body = RequestBody(ex.replay_limit)
        # Chunked bytes wait for the end of the read: its framing is checked first (see
        # _walk_chunked), and ``data_received`` sends them on.
        if conn is not None and not request_body.pending and not ex.chunked:
            conn.send(framed)
            request_body.sent_now(framed, ex.body_bytes)
        elif request_body.hold(framed):
            self._update_reading()

    def on_message_complete(self) -> None:
        ex = self.parsing
        assert ex is not None
        ex.request_complete = True
        self.parsing = None
        attempt = ex.attempt
        if (
            attempt is not None
            and attempt.conn is not None
            and not attempt.read_deadline
            and not ex.response_started
        ):
            self._start_read_timer(attempt)  # the upstream has all it needs: now it may be slow
        filters = self.filters
        tail = b""
        if filters is not None and filters.request_body and filters.exchange is ex:
            tail = filtering.end_request_body(filters, ex)  # (else: filter_held_body calls it)
        if ex.chunked:
            # Sent with the rest of the read once its framing is checked (data_received).
            if ex.body is None:
                ex.body = RequestBody(ex.replay_limit)
            if tail:
                ex.body.hold(b"%x\r\n%b\r\n" % (len(tail), tail))
            ex.body.hold(b"0\r\n\r\n")
        if self.keyed and ex.recorder is not None:
            ex.recorder.body_complete()  # a held keyed request is claimed now
        if ex.response_complete:
            # The response finished before the request body did (early reply).
            self._finish(ex)

    def _on_parse_error(self, error: httptools.HttpParserError) -> None:
        cause = error.__context__
        if isinstance(cause, RequestRejected):
            rejected = cause
        else:
            rejected = RequestRejected(400, "bad_request", f"malformed request: {error}")
        self._reject_parsing(rejected)

    def _reject_parsing(self, rejected: RequestRejected) -> None:
        """The request being parsed is bad: answer it (in order) and close the connection.

        Requests parsed from the same bytes are never dispatched: their framing is suspect.
        """
        undispatched = self.to_dispatch
        self.to_dispatch = False
        ex = self.parsing
        self.parsing = None
        self.queue = None
        if undispatched and self.active is not None:
            # The active request arrived in the same bytes as the bad one and was not sent
            # yet: it is dropped too, answered with the error.
            ex = self.active
        if ex is not None and ex is self.active:
            attempt = ex.attempt
            if attempt is not None:
                # The error may be inside a body already streaming upstream: abort that try.
                attempt.abandon()
            if ex.response_started:
                self._observe(ex, ex.status)
                self.active = None
                self.abort()
                return
            ex.keep_alive = False
            self._respond_error(ex, rejected)
            return
        if self.active is None:
            failed = ex if ex is not None else Exchange(time.perf_counter(), 0)
            failed.keep_alive = False
            self.active = failed
            self._respond_error(failed, rejected)
        else:
            # An earlier request is still being answered; the error follows it, in order.
            self.pending_error = rejected
            self._update_reading()
