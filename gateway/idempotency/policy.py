"""A route's idempotency policy and the per-request recorder the listener drives.

The listener calls, at fixed points (see docs/idempotency.md):

- ``RouteIdempotency.begin`` once the route is matched and admitted (top of ``_forward``):
  True means "forward now" (no key, another method, or store down with ``allow``);
  False means the recorder took over: it forwards later through ``conn._forward`` or has
  answered (400, 409, 422, 503, or a replay).
- ``Recorder.request_body`` per request body chunk while the request is held (keyed requests
  are claimed once their body is complete: the fingerprint covers it).
- ``Recorder.body_complete`` from ``on_message_complete`` of a held request.
- ``Recorder.on_head`` / ``on_body`` for the response of a request that owns its key.
- ``Recorder.finish`` from ``_observe``: stores the response (completed whole, storable, not too
  large) or releases the key (5xx, upstream or gateway error, abort, client gone).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Container
from typing import TYPE_CHECKING, Any, Protocol

from gateway.idempotency.core import (
    CLAIMED,
    CONFLICT,
    EMPTY_BODY_DIGEST,
    MISMATCH,
    PROCEED,
    REPLAY,
    WAIT,
    InvalidKey,
    decide,
    encode_record,
    fingerprint,
    parse_key,
    problem_response,
    replay_response,
    scope_key,
    storable,
)
from gateway.idempotency.stores import ClaimResult, IdempotencyStore
from gateway.ratelimit.keys import compile_key

if TYPE_CHECKING:
    import hashlib

    from gateway.config.model import IdempotencyConfig
    from gateway.metrics import GatewayMetrics


# What the recorder needs of the listener's exchange and connection. Protocols rather than the
# listener's classes: the data plane calls into this package, never the other way round.
class Exchange(Protocol):
    idem_checked: bool
    recorder: Recorder | None
    max_body: int

    @property
    def idem_keys(self) -> list[bytes] | None: ...
    @property
    def body_hash(self) -> hashlib._Hash | None: ...
    @property
    def method(self) -> bytes: ...
    @property
    def method_name(self) -> str: ...
    @property
    def upgrade(self) -> bytes | None: ...
    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...
    @property
    def content_length(self) -> bytes | None: ...
    @property
    def body_bytes(self) -> int: ...
    @property
    def pending_bytes(self) -> int: ...
    @property
    def request_complete(self) -> bool: ...
    @property
    def response_complete(self) -> bool: ...
    @property
    def keep_alive(self) -> bool: ...
    @property
    def is_head(self) -> bool: ...
    @property
    def version(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def error_code(self) -> str: ...


class _Server(Protocol):
    @property
    def metrics(self) -> GatewayMetrics: ...
    @property
    def draining(self) -> bool: ...


class ClientConnection(Protocol):
    @property
    def server(self) -> _Server: ...
    @property
    def peer_ip(self) -> str: ...
    @property
    def peer_trusted(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def active(self) -> object: ...
    def resume_forward(self, resume: tuple[Any, ...]) -> None: ...
    def request_id_of(self, ex: Any) -> bytes: ...
    def respond_bytes(
        self, ex: Any, status: int, data: bytes, keep_alive: bool, code: str
    ) -> None: ...


# Recorder states.
_HELD = 0  # waiting for the request body (the fingerprint needs it)
_CLAIMING = 1  # the claim is at the store
_RECORDING = 2  # owns the key: the response is being recorded
_DONE = 3  # finished (stored, released, or answered without owning the key)

WAIT_FIRST = 0.01  # in_flight: wait polls the store after 10 ms, doubling up to WAIT_MAX
WAIT_MAX = 0.2


class RouteIdempotency:
    """Built per snapshot for each route with an ``idempotency`` section."""

    __slots__ = (
        "config",
        "lock_ms",
        "methods",
        "metrics_route",
        "parts",
        "prefix",
        "principal",
        "required",
        "route",
        "store",
        "ttl_ms",
    )

    def __init__(
        self,
        route: str,
        config: IdempotencyConfig,
        store: IdempotencyStore,
        *,
        trusted: Container[str] = (),
        prefix: str = "gateway",
    ) -> None:
        self.route = route
        self.config = config
        self.store = store
        self.methods = frozenset(config.methods)
        self.required = config.required
        self.parts = tuple(config.fingerprint)
        self.principal = compile_key(config.principal, trusted)
        self.lock_ms = int(config.lock_timeout * 1000)
        self.ttl_ms = int(config.ttl * 1000)
        self.prefix = prefix
        self.metrics_route = route

    def begin(self, conn: ClientConnection, ex: Exchange, resume: tuple[Any, ...]) -> bool:
        values = ex.idem_keys
        if values is None and not self.required:
            return True  # no key: nothing to do (the common case, kept to two loads)
        ex.idem_checked = True
        if ex.method_name not in self.methods or ex.upgrade is not None:
            return True
        metrics = conn.server.metrics
        if values is None:
            metrics.idempotency(self.route, "rejected")
            _answer(conn, ex, problem_status(400, "an Idempotency-Key header is required"))
            return False
        try:
            key = parse_key(values)
        except InvalidKey as exc:
            metrics.idempotency(self.route, "rejected")
            _answer(conn, ex, problem_status(400, str(exc)))
            return False
        principal = self.principal(conn.peer_ip, conn.peer_trusted, ex.headers, resume[6])
        if principal is None:  # header:NAME absent: scoped by the client address instead
            principal = "ip:" + conn.peer_ip
        elif isinstance(principal, bytes):
            principal = principal.decode("latin-1")
        limit = self.config.max_request_bytes
        declared = int(ex.content_length) if ex.content_length is not None else 0
        if ex.body_bytes > limit or declared > limit:
            # Keyed bodies are buffered whole before the claim: bounded.
            metrics.idempotency(self.route, "rejected")
            _answer(conn, ex, (413, "a keyed request body may not exceed max_request_bytes"))
            return False
        recorder = Recorder(self, conn, ex, scope_key(self.prefix, self.route, principal, key))
        recorder.resume = resume
        ex.recorder = recorder
        if ex.request_complete:
            recorder.claim()
        else:
            recorder.state = _HELD  # claimed from on_message_complete
            if ex.max_body > limit:
                ex.max_body = limit
        return False


def problem_status(status: int, detail: str) -> tuple[int, str]:
    return status, detail


def _answer(conn: ClientConnection, ex: Exchange, problem: tuple[int, str]) -> None:
    status, detail = problem
    keep_alive = _keep_alive(conn, ex)
    request_id = conn.request_id_of(ex)
    data = problem_response(status, detail, request_id, keep_alive, ex.is_head)
    conn.respond_bytes(ex, status, data, keep_alive, "idempotency")


def _keep_alive(conn: ClientConnection, ex: Exchange) -> bool:
    return ex.keep_alive and ex.request_complete and not conn.server.draining


class Recorder:
    """One keyed request: its claim, and the response it records while owning the key."""

    __slots__ = (
        "body",
        "conn",
        "ex",
        "fields",
        "fingerprint",
        "key",
        "policy",
        "reason",
        "resume",
        "size",
        "state",
        "status",
        "token",
        "too_large",
        "wait_delay",
        "wait_until",
    )

    def __init__(
        self, policy: RouteIdempotency, conn: ClientConnection, ex: Exchange, key: bytes
    ) -> None:
        self.policy = policy
        self.conn = conn
        self.ex = ex
        self.key = key
        self.token = os.urandom(16)
        self.fingerprint = b""
        self.resume: tuple[Any, ...] = ()
        self.state = _CLAIMING
        self.status = 0
        self.reason = b""
        self.fields = b""
        self.body: list[bytes] | None = None
        self.size = 0
        self.too_large = False
        self.wait_delay = WAIT_FIRST
        self.wait_until = 0.0

    @property
    def metrics(self) -> GatewayMetrics:
        return self.conn.server.metrics

    # -- request side --------------------------------------------------------------------------
    def request_body(self, ex: Exchange) -> None:
        """A held request's body grows: it is buffered until complete, within the limit (the
        listener's pending buffer pauses reading beyond its own bound, which would stall)."""
        if self.state == _HELD and ex.pending_bytes > self.policy.config.max_request_bytes * 2:
            from gateway.proxy.responses import RequestRejected

            raise RequestRejected(413, "body_too_large", "keyed request body exceeds the limit")

    def body_complete(self) -> None:
        if self.state == _HELD:
            self.claim()

    def claim(self) -> None:
        ex = self.ex
        policy = self.policy
        digest = ex.body_hash.digest() if ex.body_hash is not None else EMPTY_BODY_DIGEST
        self.fingerprint = fingerprint(policy.parts, ex.method, self.resume[3], digest)
        self.state = _CLAIMING
        policy.store.claim(
            self.key, self.token, self.fingerprint, policy.lock_ms, time.time(), self._claimed
        )

    def _claim_again(self) -> None:
        if self.state == _CLAIMING:  # not finished meanwhile (client gone, timeout)
            self.claim()

    def _claimed(self, result: ClaimResult | None) -> None:
        conn = self.conn
        ex = self.ex
        policy = self.policy
        if self.state != _CLAIMING or conn.active is not ex or conn.closed:
            if result is not None and result[0] == CLAIMED:
                policy.store.release(self.key, self.token)
            self.state = _DONE
            return
        metrics = self.metrics
        if result is None:
            metrics.idempotency(policy.route, "store_error")
            self.state = _DONE
            ex.recorder = None
            if policy.config.on_store_error == "deny":
                _answer(conn, ex, (503, "the idempotency store did not answer"))
            else:
                conn.resume_forward(self.resume)  # allow: forwarded without the replay guarantee
            return
        outcome, stored_fp, record = result
        action = decide(outcome, stored_fp, self.fingerprint, policy.config.in_flight)
        if action == PROCEED:
            self.state = _RECORDING
            conn.resume_forward(self.resume)
            return
        if action == WAIT:
            loop = asyncio.get_running_loop()
            now = loop.time()
            if not self.wait_until:
                bound = policy.config.lock_timeout
                route_timeout = self.resume[2].timeout  # the Route being forwarded to
                if route_timeout:
                    bound = min(bound, route_timeout)
                self.wait_until = now + bound
            if now + self.wait_delay < self.wait_until:
                delay = self.wait_delay
                self.wait_delay = min(WAIT_MAX, delay * 2)
                loop.call_later(delay, self._claim_again)
                return
            action = CONFLICT
        self.state = _DONE
        ex.recorder = None
        if action == REPLAY:
            try:
                keep_alive = _keep_alive(conn, ex)
                status, data = replay_response(
                    record, conn.request_id_of(ex), keep_alive, ex.is_head, ex.version == "1.0"
                )
            except ValueError:
                metrics.idempotency(policy.route, "store_error")
                _answer(conn, ex, (503, "the stored response is damaged"))
                return
            metrics.idempotency(policy.route, "replayed")
            conn.respond_bytes(ex, status, data, keep_alive, "")
        elif action == MISMATCH:
            metrics.idempotency(policy.route, "mismatch")
            _answer(conn, ex, (422, "this Idempotency-Key was used with a different request"))
        else:
            metrics.idempotency(policy.route, "conflict")
            _answer(conn, ex, (409, "a request with this Idempotency-Key is still in progress"))

    # -- response side -------------------------------------------------------------------------
    def on_head(self, status: int, reason: bytes, fields: bytes) -> None:
        if self.state != _RECORDING:
            return
        self.status = status
        if storable(status, self.policy.config.store_4xx):
            self.reason = reason
            self.fields = fields
            self.body = []

    def on_body(self, chunk: bytes) -> None:
        body = self.body
        if body is None:
            return
        self.size += len(chunk)
        if self.size > self.policy.config.max_response_bytes:
            self.body = None  # not stored: the client still gets all of it
            self.too_large = True
        else:
            body.append(chunk)

    def finish(self, ex: Exchange) -> None:
        """The exchange is over. A response relayed whole (no gateway error) is stored;
        anything else frees the key for a retry."""
        state = self.state
        self.state = _DONE
        ex.recorder = None
        if state != _RECORDING:
            return  # held or claiming: the claim callback releases what it got
        policy = self.policy
        metrics = self.metrics
        body = self.body
        complete = ex.response_complete and not ex.error_code and self.status == ex.status
        if complete and body is not None:
            record = encode_record(self.status, self.reason, self.fields, b"".join(body))
            route = policy.route

            def stored(ok: bool | None) -> None:
                if ok is None:
                    metrics.idempotency(route, "store_error")
                else:
                    # False: the claim expired (lock_timeout) before the response ended.
                    metrics.idempotency(route, "stored" if ok else "bypassed")

            policy.store.complete(
                self.key, self.token, self.fingerprint, record, policy.ttl_ms, time.time(), stored
            )
            return
        policy.store.release(self.key, self.token)
        if complete and (self.too_large or 400 <= self.status < 500):
            metrics.idempotency(policy.route, "bypassed")
        else:
            metrics.idempotency(policy.route, "released")
