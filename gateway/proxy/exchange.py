"""One request/response pair as the data plane tracks it (``Exchange``), and the framing
constants its fields use.

Defaults live on the class and only the fields a request touches get an instance value, so
creating one per request costs a few stores. Fields read on every request should be set in
``__init__`` (a class attribute read through the instance is not specialised by CPython 3.11);
fields read only on some routes stay class defaults and are read behind a cheaper test (see
``ClientConnection.keyed`` and ``ClientConnection.filters``).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING

from gateway.proxy.body import REPLAY_LIMIT, RequestBody

if TYPE_CHECKING:
    from gateway.filters.api import Attempt
    from gateway.idempotency.policy import Recorder
    from gateway.proxy.attempt import UpstreamAttempt
    from gateway.proxy.responses import RequestRejected
    from gateway.ratelimit import RouteLimiter
    from gateway.resilience.retry import RetryPolicy
    from gateway.routing import Route
    from gateway.snapshot import Instance, Upstream

# Where the chunked-body walker is (see ``ClientConnection._walk_chunked``).
CW_START = -1  # the head ended in this read; where the body starts is still to be found
CW_LINE = 0  # in a chunk-size line
CW_DATA = 1  # in chunk data
CW_DATA_CRLF = 2  # in the CRLF after chunk data
CW_TRAILER = 3  # in the trailer section
CW_DONE = 4


# Response body framing toward the client.
FRAME_NONE = 0  # no body (HEAD, 1xx, 204, 304)
FRAME_RAW = 1  # bytes as they come: Content-Length known, or close-delimited toward the client
FRAME_CHUNKED = 2  # re-encoded as chunked


class Exchange:
    """One request/response pair and everything the proxy tracks about it.

    Defaults live on the class and only the fields a request touches get an instance value:
    creating one per request then costs a few stores instead of forty.
    """

    url = b""
    header_bytes = 0
    host: bytes | None = None
    host_count = 0
    content_length: bytes | None = None
    cl_count = 0
    chunked = False
    te_count = 0
    conn_tokens: frozenset[bytes] = frozenset()
    upgrade: bytes | None = None
    request_id: bytes | None = None
    method = b""
    method_name = ""
    version = "1.1"
    keep_alive = True
    is_head = False
    error: RequestRejected | None = None
    body_bytes = 0
    body: RequestBody | None = None  # pending and replay buffers, from the first body byte
    request_complete = False
    route: Route | None = None
    route_name = "<none>"
    upstream: Upstream | None = None
    upstream_name = "<none>"
    # The current try (its instance, connection, read deadline, timings); after a failed try
    # and until the next one it is that failed try, without connection or instance.
    attempt: UpstreamAttempt | None = None
    hedge: UpstreamAttempt | None = None  # a second try racing ``attempt`` (failover._hedge)
    # Tries that ended before the exchange (attempt.record_try; failure paths only), and the
    # last of them, so the current try is not given twice.
    past_attempts: tuple[Attempt, ...] = ()
    last_ended: UpstreamAttempt | None = None
    # What RequestInfo.retry_head returned for tries after the first (failover._retry_head).
    attempt_labels: dict[UpstreamAttempt, str] | None = None
    head = b""
    status = 0
    interim = False
    response_started = False
    response_complete = False
    response_frame = FRAME_NONE
    stale_retried = False
    deadline = 0.0  # the route's timeout
    # Retries (RFC 9110 §9.2.2 decides which methods may be repeated).
    retry: RetryPolicy | None = None
    tries = 1
    hash_key: bytes | None = None
    tried: tuple[Instance, ...] = ()  # instances whose try failed: retries avoid them
    replay_limit = REPLAY_LIMIT  # for a RequestBody made after the retry policy is known
    retry_timer: asyncio.TimerHandle | None = None
    counted = False  # upstream-level counters (active requests, breaker) were taken
    idempotent = False  # RFC 9110 §9.2.2 method, or an Idempotency-Key header
    # Idempotency-Key (gateway/idempotency): field values, body digest, the route's recorder.
    idem_keys: list[bytes] | None = None
    body_hash: hashlib._Hash | None = None
    idem_checked = False
    # The route's Recorder, set by RouteIdempotency.begin. Read only where the connection is
    # ``keyed`` (ClientConnection), so the class default costs requests without a key nothing.
    recorder: Recorder | None = None
    hedged = False  # a hedge was armed: an exchange gets at most one
    limiter: RouteLimiter | None = None  # holds a max_in_flight slot to give back
    ratelimit = ""  # the rate-limit decision, for the access log
    ratelimit_headers = b""  # RateLimit header lines for the admitted response
    error_code = ""  # why the gateway answered itself (no_route, upstream_timeout, ...)
    method_prefix = b""  # the bytes of this read when it ended inside the method (split token)
    # Chunked body walker (framing bytes are measured: llhttp reports no extensions).
    cw_state = CW_START
    cw_line = 0  # bytes of the current chunk-size or trailer line so far
    cw_prefix = b""  # the start of a chunk-size line that spans reads (its hex size)
    cw_left = 0  # data bytes left in the current chunk
    cw_crlf = 0  # bytes left of the CRLF after chunk data
    cw_extensions = 0  # chunk-extension bytes so far
    cw_trailer = 0  # trailer section bytes so far
    cw_body_mark = 0  # body_bytes when the last read was walked
    cw_tail = b""  # the last bytes of the read before the one that ended the head

    def __init__(self, now: float, max_body: int) -> None:
        self.t_start = now
        self.max_body = max_body
        self.headers: list[tuple[bytes, bytes]] = []

    @property
    def pending_bytes(self) -> int:
        body = self.body
        return body.pending_bytes if body is not None else 0
