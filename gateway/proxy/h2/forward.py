"""HTTP/2 streams exchanged natively with HTTP/2 upstreams (``protocol: h2c | h2``).

A downstream stream whose route's upstream speaks HTTP/2 skips the HTTP/1.1 bridge: its
frames become frames of an upstream stream (``H2InstancePool.open_stream``), so trailers (gRPC's
``grpc-status``) pass through unchanged. The phases are the HTTP/1.1 path's, reused where they
are functions: ``parse_target`` normalisation, ``snapshot.routes.match``, the route's limiter
(local decisions), the breaker's ``max_requests``, the upstream's balancer, the retry policy
and budget, ``metrics.observe_request`` and the access log.

gRPC on top (``gateway.proxy.grpc``): ``grpc-timeout`` is the deadline (capped by the route's
``timeout``); errors the gateway makes answer a gRPC request as Trailers-Only with the mapped
``grpc-status``; ``retry.on: [grpc-unavailable]`` retries a ``grpc-status: 14`` answered
before any response message was forwarded (the response head is then held until the first
message, so that a retry is still possible).

Flow control: request DATA is acknowledged to the client once the upstream stream took it
(while the upstream stream is paused by its window, acknowledgements wait); response DATA is
acknowledged upstream once it went into the client's stream window and the client socket is
not paused. Neither side buffers more than one window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from gateway.proxy import grpc, responses
from gateway.proxy.h2.client import PoolUnavailable
from gateway.proxy.h2.headers import CONNECTION_SPECIFIC, MalformedRequest, request_head
from gateway.proxy.h2.native_output import NativeOutput
from gateway.proxy.h2.native_report import peer_ip as _peer_ip
from gateway.proxy.h2.native_report import record_response, report
from gateway.proxy.h2.native_request import ClientFields, forwarded_fields
from gateway.proxy.h2.native_tries import NativeTries
from gateway.proxy.headers import valid_request_id
from gateway.proxy.normalize import InvalidTarget, normalize_rewritten, parse_target
from gateway.proxy.responses import REFUSAL_MESSAGES, REFUSAL_RESULTS
from gateway.resilience.retry import (
    GRPC_UNAVAILABLE,
    RESET,
)

if TYPE_CHECKING:
    from gateway.proxy.h2.bridge import StreamOwner
    from gateway.proxy.h2.client import H2InstancePool, H2Stream
    from gateway.ratelimit import RouteLimiter
    from gateway.resilience.retry import RetryPolicy
    from gateway.routing.table import Route
    from gateway.snapshot import Instance, Snapshot, Upstream

log = logging.getLogger(__name__)

Headers = list[tuple[bytes, bytes]]

# Response fields that mean nothing on an HTTP/2 stream (RFC 9113 §8.2.2).
_RESPONSE_DROP = CONNECTION_SPECIFIC | {b"te"}

_NO_ERROR = int(ErrorCodes.NO_ERROR)
_CANCEL = int(ErrorCodes.CANCEL)


class NativeStream(NativeOutput, NativeTries):
    """One downstream HTTP/2 stream proxied to an HTTP/2 upstream; the ``StreamListener`` of
    its upstream stream (one at a time: each retry opens a new one)."""

    __slots__ = (
        "attempt",
        "bytes_in",
        "bytes_out",
        "content_type",
        "deadline_timer",
        "end_sent",
        "error_code",
        "finished",
        "grpc_status",
        "headers_out",
        "held_acks",
        "held_head",
        "instance",
        "is_grpc",
        "limiter",
        "messages_out",
        "method",
        "out",
        "owner",
        "path",
        "policy",
        "pool",
        "read_deadline",
        "read_timeout",
        "request_body",
        "request_ended",
        "request_headers",
        "request_id",
        "response_ended",
        "retry_grpc",
        "route",
        "send_paused",
        "status",
        "stream",
        "stream_id",
        "t_start",
        "t_try",
        "t_upstream",
        "t_upstream_done",
        "trailers",
        "trailers_in",
        "tried",
        "unacked_up",
        "upstream",
    )

    def __init__(self, owner: StreamOwner, stream_id: int) -> None:
        self.owner = owner
        self.stream_id = stream_id
        self.t_start = time.perf_counter()
        self.t_upstream = 0.0
        self.t_upstream_done = 0.0
        self.t_try = 0.0  # when the current try was sent (its latency sample)
        self.route: Route | None = None
        self.limiter: RouteLimiter | None = None  # holds a max_in_flight slot
        self.upstream: Upstream | None = None
        self.instance: Instance | None = None
        self.pool: H2InstancePool | None = None
        self.stream: H2Stream | None = None
        self.policy: RetryPolicy | None = None
        self.tried: list[Instance] = []
        self.attempt = 0
        self.method = b""
        self.path = b""
        self.request_id = b""
        self.request_headers: Headers = []
        # Request body kept for a retry while nothing of the response went out; None once it
        # outgrew the policy's max_body_bytes (no retry after that, but for never-processed).
        self.request_body: list[bytes] | None = []
        self.trailers_in: Headers | None = None
        self.request_ended = False
        self.held_acks = 0  # request DATA bytes not acknowledged to the client yet
        self.send_paused = False
        self.out: deque[bytes] = deque()  # response DATA waiting for the client's window
        self.unacked_up = 0  # response bytes pushed to the client, not acknowledged upstream
        self.held_head: Headers | None = None  # response head not sent yet
        self.trailers: Headers | None = None  # response trailers waiting behind ``out``
        self.headers_out = False
        self.response_ended = False
        self.end_sent = False
        self.finished = False
        self.is_grpc = False
        self.content_type = b""  # the client's (a gRPC-Web client's errors: _error)
        self.retry_grpc = False
        self.messages_out = False  # a response DATA byte went to the client
        self.status = 0
        self.grpc_status: bytes | None = None
        self.error_code = ""
        self.bytes_in = 0
        self.bytes_out = 0
        self.deadline_timer: asyncio.TimerHandle | None = None
        # Upstream read timeout of the current try (monotonic; 0: not running), checked by the
        # connection's sweep (check_idle) as the HTTP/1.1 path checks its read deadline.
        self.read_deadline = 0.0
        self.read_timeout = 0.0  # the upstream's timeouts.read

    # -- start ----------------------------------------------------------------------------------
    def start(self, headers: Headers, end_stream: bool) -> bool:
        """Route the stream. False: it is for the bridge (an HTTP/1.1 upstream, filters, or a
        request the bridge answers; nothing was sent). True: this object owns the stream (it
        may already be answered)."""
        owner = self.owner
        snapshot: Snapshot = owner.server.snapshot
        try:
            head = request_head(headers, end_stream)  # RFC 9113 §8.2, §8.3 checks
        except MalformedRequest:
            return False  # (the bridge resets it with PROTOCOL_ERROR and counts it)
        if sum(len(n) + len(v) + 32 for n, v in headers) > owner.settings.max_header_list_size:
            return False  # (the bridge answers 431)
        fields = ClientFields(headers)
        self.method = method = head.method
        self.content_type = fields.content_type
        self.is_grpc = grpc.is_grpc(fields.content_type)
        self.request_ended = end_stream
        try:
            url, _path, path_text, query, target_authority = parse_target(
                head.path, method, snapshot.config.paths
            )
        except InvalidTarget:
            return False  # (the bridge answers 400)
        if target_authority is not None:
            fields.authority = target_authority
        route = snapshot.routes.match(
            method.decode("latin-1"),
            fields.authority.decode("latin-1") if fields.authority is not None else "",
            path_text,
            query.decode("latin-1") if query else "",
            fields.regular,
            _sni(owner),
        )
        self.path = head.path
        if route is None:
            if not self.is_grpc:
                return False  # (the bridge answers 404)
            self._error(404, "no_route", "no route matches the request")
            return True
        if route.upstream not in snapshot.h2_upstreams or snapshot.filters.get(route.name):
            return False  # HTTP/1.1 upstream, or filters (the bridge's path runs them)
        self.route = route
        if route.rewrites_path:
            try:
                new_path = normalize_rewritten(
                    route.rewrite_path(path_text).encode("latin-1"), snapshot.config.paths
                )
            except InvalidTarget as exc:
                self._error(400, "invalid_target", str(exc))
                return True
            url = new_path + (b"?" + query if query else b"")
        peer_ip = _peer_ip(owner)
        peer_trusted = peer_ip in snapshot.trusted_proxies
        admitted = self._admit(snapshot, route, peer_ip, peer_trusted, fields.regular, query)
        if admitted is not None:
            return admitted
        upstream = self.upstream
        assert upstream is not None
        out, request_id = forwarded_fields(fields.regular, peer_ip, peer_trusted, fields.scheme)
        if not request_id or not valid_request_id(request_id):
            request_id = owner.server.request_ids.next()
        self.request_id = request_id
        out.append((b"x-request-id", request_id))
        authority = fields.authority
        if route.host_rewrite:
            authority = route.host_rewrite.encode("latin-1")
        self.request_headers = [
            (b":method", method),
            (b":scheme", b"https" if upstream.config.protocol == "h2" else b"http"),
            (b":authority", authority or b""),
            (b":path", url),
            *out,
        ]
        if not self._arm_deadline(fields.grpc_timeout, route.timeout or None):
            return True
        self._try()
        return True

    def _admit(
        self,
        snapshot: Snapshot,
        route: Route,
        peer_ip: str,
        peer_trusted: bool,
        regular: Headers,
        query: bytes,
    ) -> bool | None:
        """The route's local rate limit, then the upstream's breaker (``max_requests``) and
        retry policy. None: admitted (``upstream`` and ``policy`` set, the breaker's and the
        budget's counts taken); True: answered (429, 503); False: for the bridge (a
        Redis-backed limit is decided on its path)."""
        metrics = self.owner.server.metrics
        limiter = snapshot.limiters.get(route.name) if snapshot.limiters else None
        if limiter is not None:
            if limiter.uses_redis:
                self.route = None
                return False
            decision = limiter.check_local(time.monotonic(), peer_ip, peer_trusted, regular, query)
            if decision.holds_slot:
                self.limiter = limiter  # given back in _complete
            if not decision.allowed:
                metrics.ratelimit(route.name, REFUSAL_RESULTS.get(decision.reason, decision.reason))
                self._error(decision.status, decision.reason, REFUSAL_MESSAGES[decision.status])
                return True
            metrics.ratelimit(route.name, "dry_run" if decision.dry_run else "allowed")
        upstream = snapshot.upstreams[route.upstream]
        self.upstream = upstream
        self.read_timeout = upstream.read_timeout
        breaker = upstream.breaker
        if breaker.max_requests and breaker.requests >= breaker.max_requests:
            breaker.requests_overflow += 1
            metrics.breaker_overflow(upstream.name, "requests")
            self._error(503, "circuit_open", f"upstream '{upstream.name}' is at max_requests")
            return True
        breaker.requests += 1
        upstream.budget.requests_now += 1
        policy = (
            snapshot.route_retry.get(route.name, upstream.retry)
            if snapshot.route_retry
            else upstream.retry
        )
        self.policy = policy
        self.retry_grpc = (
            policy is not None and self.is_grpc and GRPC_UNAVAILABLE in policy.retry_kinds
        )
        return None

    def _arm_deadline(self, grpc_timeout: bytes | None, route_timeout: float | None) -> bool:
        """``grpc-timeout`` capped by the route's timeout becomes the stream's deadline timer.
        False: answered instead (a malformed ``grpc-timeout``, or one already past)."""
        try:
            deadline = grpc.request_deadline(grpc_timeout, route_timeout)
        except grpc.GrpcTimeoutError as exc:
            self._error(400, "invalid_grpc_timeout", str(exc))
            return False
        if deadline is not None:
            if deadline <= 0:
                self._error(504, "deadline_exceeded", "the request's deadline passed")
                return False
            self.deadline_timer = asyncio.get_running_loop().call_later(
                deadline, self._deadline_passed
            )
        return True

    def _try(self) -> None:
        """Send the request to an instance (another than the tried ones, when there is one)."""
        upstream = self.upstream
        assert upstream is not None
        instance = upstream.pick(None, self.tried)
        if instance is None:
            self._error(
                503, "no_healthy_instance", f"upstream '{upstream.name}' has no available instance"
            )
            return
        if self.instance is not None:
            self.instance.active_requests -= 1
        self.instance = instance
        instance.active_requests += 1
        self.tried.append(instance)
        self.attempt += 1
        pool: H2InstancePool = instance.pool  # type: ignore[assignment]  # h2 upstreams' pools
        self.pool = pool
        if pool.error_counter.metrics is None:
            pool.bind_metrics(self.owner.server.metrics)
        self.t_try = time.perf_counter()
        if not self.t_upstream:
            self.t_upstream = self.t_try
        body = self.request_body
        self.send_paused = False
        stream = self.stream = pool.open_stream(
            self.request_headers,
            end_stream=self.request_ended and not body and self.trailers_in is None,
            listener=self,
        )
        if body:
            for chunk in body:
                stream.send_data(chunk)
        if self.request_ended:
            if self.trailers_in is not None:
                stream.send_trailers(self.trailers_in)
            elif body:
                stream.send_data(b"", end=True)
            self._start_read_timer()

    # -- downstream events (from H2ServerConnection) -----------------------------------------
    def request_data(self, data: bytes, flow_length: int) -> None:
        if self.finished:
            self._ack_client(flow_length)
            return
        self.bytes_in += len(data)
        body = self.request_body
        if body is not None:
            policy = self.policy
            limit = policy.max_body_bytes if policy is not None else 0
            if self.bytes_in <= limit:
                body.append(data)
            else:
                self.request_body = None  # too big to replay
        stream = self.stream
        if stream is not None and data:
            stream.send_data(data)
        if self.send_paused or stream is None or stream.conn is None:
            self.held_acks += flow_length  # acknowledged once the upstream took the bytes
        else:
            self._ack_client(flow_length)

    def request_trailers(self, headers: Headers) -> None:
        self.trailers_in = [(n, v) for n, v in headers if n[:1] != b":"]

    def request_end(self) -> None:
        self.request_ended = True
        if self.finished:
            return
        stream = self.stream
        if stream is None:
            return
        if self.trailers_in is not None:
            stream.send_trailers(self.trailers_in)
        else:
            stream.send_data(b"", end=True)
        self._start_read_timer()

    def update_producer(self) -> None:
        self._ack_upstream()  # (resume_writing: the socket takes bytes again)

    def client_gone(self) -> None:
        """The client reset the stream, or its connection is gone: cancel upstream too."""
        if self.finished:
            return
        self.finished = True
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.reset(_CANCEL)
        self.error_code = self.error_code or "client_gone"
        if self.grpc_status is None:
            self.grpc_status = b"1"  # CANCELLED: what the client's side reports
        self._complete(499 if not self.status else self.status)

    # -- upstream events (StreamListener) -------------------------------------------------------
    def on_response_headers(self, status: int, headers: Headers) -> None:
        if self.finished:
            return
        if self.read_deadline:
            # The per-try timeout ends with the head; the read timeout runs between events.
            self.read_deadline = self.owner.server.clock + self.read_timeout
        self.status = status
        self.t_upstream_done = time.perf_counter()
        fields: Headers = [(b":status", b"%d" % status)]
        trailers_only = False
        for name, value in headers:
            if name in _RESPONSE_DROP:
                continue
            if name == b"grpc-status":
                trailers_only = True
                self.grpc_status = value
            fields.append((name, value))
        if trailers_only or self.retry_grpc:
            self.held_head = fields  # sent with the first message, or with END_STREAM
            return
        self._send_head(fields)

    def on_data(self, chunk: bytes) -> None:
        if self.finished:
            return
        if self.read_deadline:
            self.read_deadline = self.owner.server.clock + self.read_timeout
        self.retry_grpc = False  # a response message: never retried after this
        if self.held_head is not None:
            self._send_head(self.held_head)
        self.messages_out = True
        self.bytes_out += len(chunk)
        if self.out:
            self.out.append(chunk)
            return
        sent = self._push(chunk)
        if sent < len(chunk):
            self.out.append(chunk[sent:])
        self._ack_upstream()
        self.owner.schedule_flush()

    def on_trailers(self, headers: Headers) -> None:
        if self.finished:
            return
        for name, value in headers:
            if name == b"grpc-status":
                self.grpc_status = value
        if self._retry_unavailable():
            return
        if self.held_head is not None:
            self._send_head(self.held_head)
        self.trailers = headers

    def on_end(self) -> None:
        if self.finished:
            return
        self.stream = None
        self.read_deadline = 0.0
        if self.trailers is None and self._retry_unavailable():
            return
        self._response_done()
        if self.held_head is not None and self.trailers is None:
            # Trailers-Only (gRPC): the head is the whole response, one HEADERS frame.
            head, self.held_head = self.held_head, None
            self.headers_out = True
            self.end_sent = True
            self.response_ended = True
            self._send(lambda conn: conn.send_headers(self.stream_id, head, end_stream=True))
            self._finish_stream()
            return
        if not self.headers_out:
            self._send_head([(b":status", b"%d" % (self.status or 200))])
        self.response_ended = True
        self._end_if_sent()

    def on_reset(self, error_code: int, never_processed: bool) -> None:
        if self.finished:
            return
        self.stream = None
        self.read_deadline = 0.0
        if not never_processed and not self.headers_out:
            # As the HTTP/1.1 path counts a reset before the response started. A never-processed
            # stream (REFUSED_STREAM, a GOAWAY's) is the server declining cleanly: not counted.
            self._outcome(False, True)
        policy = self.policy
        if not self.headers_out and policy is not None and self._may_retry():
            if never_processed:
                # Never processed (REFUSED_STREAM, above a GOAWAY's last id): safe for any
                # method (RFC 9113 §8.7).
                if self._retry("never_processed"):
                    return
            elif (
                RESET in policy.retry_kinds
                and self._replayable()
                and self._idempotent()
                and self._retry(RESET)
            ):
                return
        if self.headers_out:
            self.error_code = "upstream_reset"
            self._reset_client(ErrorCodes.INTERNAL_ERROR if error_code == _NO_ERROR else error_code)
            return
        self._error(502, "upstream_reset", "the upstream reset the stream")

    def on_connect_error(self, error: BaseException) -> None:
        if self.finished:
            return
        self.stream = None
        self.read_deadline = 0.0
        if not isinstance(error, PoolUnavailable):  # (full or closed pool: not the instance)
            self._outcome(False, True)
        # Nothing was sent: a retry cannot duplicate the request, whatever its method.
        if self.policy is not None and self._may_retry() and self._retry("connect_failure"):
            return
        # 502 as on the HTTP/1.1 path (UNAVAILABLE for gRPC clients).
        self._error(502, "upstream_connect_failure", f"cannot connect to upstream: {error}")

    def on_send_paused(self) -> None:
        self.send_paused = True

    def on_send_resumed(self) -> None:
        self.send_paused = False
        self._ack_client(self.held_acks)
        self.held_acks = 0
        self.owner.schedule_flush()

    def _error(self, status: int, code: str, message: str) -> None:
        """A response the gateway makes: Trailers-Only for gRPC (and gRPC-Web, in its content
        type), a JSON error otherwise."""
        if self.finished:
            return
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.reset(_CANCEL)
        if self.headers_out:
            self.error_code = code
            if self.is_grpc and not self.out and not self.end_sent:
                # The head went out, no message is half sent: end with the status as trailers.
                grpc_code = grpc.gateway_error_status(status)
                self.grpc_status = b"%d" % grpc_code
                trailers = grpc.trailers_only(grpc_code, message)[2:]  # (no :status, type)
                self.end_sent = True
                self._send(
                    lambda conn: conn.send_headers(self.stream_id, trailers, end_stream=True)
                )
                self._finish_stream()
                return
            self._reset_client(ErrorCodes.CANCEL)
            return
        self.status = status
        self.error_code = code
        if not self.request_id:
            self.request_id = self.owner.server.request_ids.next()
        request_id = self.request_id
        web_type = (
            None
            if self.is_grpc or not self.content_type
            else grpc.grpc_web_client_type([(b"content-type", self.content_type)])
        )
        if self.is_grpc or web_type is not None:
            grpc_code = grpc.gateway_error_status(status)
            self.grpc_status = b"%d" % grpc_code
            fields = grpc.trailers_only(grpc_code, message, [(b"x-request-id", request_id)])
            if web_type is not None:  # gRPC-Web: the same, in the client's content type
                fields[1] = (b"content-type", web_type)
            self._send(lambda conn: conn.send_headers(self.stream_id, fields, end_stream=True))
        else:
            body = responses.error_body(status, code, message, request_id)
            fields = [
                (b":status", b"%d" % status),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"x-request-id", request_id),
            ]

            def send(conn: object) -> None:
                conn.send_headers(self.stream_id, fields)  # type: ignore[attr-defined]
                conn.send_data(self.stream_id, body, end_stream=True)  # type: ignore[attr-defined]

            self._send(send)
        self.headers_out = True
        self.end_sent = True
        self._finish_stream()

    def _deadline_passed(self) -> None:
        self.deadline_timer = None
        if not self.finished:
            if self.stream is not None and not self.status:
                self._outcome(False, True)  # no answer within the deadline: a timeout
            self._error(504, "deadline_exceeded", "the request's deadline passed")

    # -- passive health: what the HTTP/1.1 path feeds (relay.py, failover.py) ----------------
    def _response_done(self) -> None:
        record_response(self)  # (latency, passive health: native_report.py)

    # -- the end: count, log, give back -----------------------------------------------------
    def _complete(self, status: int) -> None:
        """The stream is over (answered, reset or abandoned): once."""
        self.finished = True
        owner = self.owner
        owner.stream_done(self.stream_id)
        if self.deadline_timer is not None:
            self.deadline_timer.cancel()
            self.deadline_timer = None
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.reset(_CANCEL)
        if self.instance is not None:
            self.instance.active_requests -= 1
            self.instance = None
        if self.limiter is not None:
            self.limiter.release()
            self.limiter = None
        upstream = self.upstream
        if upstream is not None:
            upstream.breaker.requests -= 1
        report(self, status)


def _sni(owner: StreamOwner) -> str:
    """The server name a TLS client asked for (routes may match on it); "" on h2c."""
    transport = owner.transport
    if transport is None:
        return ""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return ""
    return getattr(ssl_object, "gateway_sni", None) or ""
