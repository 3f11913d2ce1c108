"""The tries of a native HTTP/2 stream (gateway/proxy/h2/forward.py, ``NativeStream``):
the upstream read and per-try timeouts, whether a failed try may be retried, and what each
try tells passive health. A mixin of ``NativeStream``, whose state it reads (declared here
for the type checker only)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from gateway.resilience.retry import GRPC_UNAVAILABLE, IDEMPOTENT_METHODS, TIMEOUT

if TYPE_CHECKING:
    from collections import deque

    from gateway.proxy.h2.bridge import StreamOwner
    from gateway.proxy.h2.client import H2Stream
    from gateway.resilience.retry import RetryPolicy
    from gateway.snapshot import Instance, Upstream

_CANCEL = int(ErrorCodes.CANCEL)


if TYPE_CHECKING:

    class _State:
        """The ``NativeStream`` fields and methods the mixin uses."""

        owner: StreamOwner
        stream: H2Stream | None
        upstream: Upstream | None
        instance: Instance | None
        policy: RetryPolicy | None
        attempt: int
        method: bytes
        is_grpc: bool
        retry_grpc: bool
        finished: bool
        headers_out: bool
        messages_out: bool
        held_head: list[tuple[bytes, bytes]] | None
        grpc_status: bytes | None
        status: int
        request_body: list[bytes] | None
        out: deque[bytes]
        read_deadline: float
        read_timeout: float

        def _try(self) -> None: ...

        def _error(self, status: int, code: str, message: str) -> None: ...

    _Base = _State
else:
    _Base = object


class NativeTries(_Base):
    __slots__ = ()

    def check_idle(self) -> None:
        """(Each sweep of the connection, ``TICK``.) The upstream read timeout of this try."""
        deadline = self.read_deadline
        if not deadline:
            return
        owner = self.owner
        now = owner.server.clock
        if now <= deadline or self.finished or self.stream is None:
            return
        if self.out or owner.write_paused:
            # The client is the slow party (the upstream waits for our acknowledgements).
            self.read_deadline = now + self.read_timeout
            return
        self._read_timed_out()

    # -- read and per-try timeouts -------------------------------------------------------------
    def _start_read_timer(self) -> None:
        """The try's request is all sent: the upstream has ``retry.per_try_timeout`` (when
        shorter than ``timeouts.read``) for its response head, as on the HTTP/1.1 path
        (relay._start_read_timer); after it, ``timeouts.read`` between events."""
        if self.stream is None or self.finished:
            return
        first_read = self.read_timeout
        policy = self.policy
        if policy is not None and policy.per_try_timeout and policy.per_try_timeout < first_read:
            first_read = policy.per_try_timeout
        self.read_deadline = time.monotonic() + first_read

    def _read_timed_out(self) -> None:
        """No upstream event within the read (or per-try) timeout: a gateway failure; another
        try when the policy has ``timeout`` and no response head or message went out yet,
        else 504 (DEADLINE_EXCEEDED for gRPC, or a reset once the body started)."""
        self.read_deadline = 0.0
        self._outcome(False, True)
        policy = self.policy
        if (
            not self.headers_out
            and policy is not None
            and TIMEOUT in policy.retry_kinds
            and self._may_retry()
            and self._idempotent()
        ):
            stream, self.stream = self.stream, None
            if stream is not None:
                stream.reset(_CANCEL)
            self.held_head = None
            self.grpc_status = None
            self.status = 0
            if self._retry(TIMEOUT):
                return
        self._error(504, "upstream_timeout", "upstream read timeout")

    # -- retries ------------------------------------------------------------------------------
    def _may_retry(self) -> bool:
        policy = self.policy
        return (
            policy is not None
            and self.attempt < policy.attempts
            and not self.messages_out
            and self.request_body is not None  # (the body so far can be sent again)
        )

    def _replayable(self) -> bool:
        return self.request_body is not None

    def _idempotent(self) -> bool:
        policy = self.policy
        assert policy is not None
        return self.method in IDEMPOTENT_METHODS or policy.allow_non_idempotent or self.is_grpc

    def _retry_unavailable(self) -> bool:
        """grpc-status 14 before any message went out, and the policy says so: try again."""
        if not self.retry_grpc or self.grpc_status != b"14" or not self._may_retry():
            return False
        if not self._replayable():
            return False
        self._outcome(False, True)  # UNAVAILABLE: a 503 to outlier detection
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.reset(_CANCEL)
        self.held_head = None
        self.grpc_status = None
        self.status = 0
        return self._retry(GRPC_UNAVAILABLE)

    def _retry(self, reason: str) -> bool:
        upstream = self.upstream
        assert upstream is not None
        metrics = self.owner.server.metrics
        if not upstream.budget.try_acquire(time.monotonic()):
            metrics.retry(upstream.name, "budget_exhausted")
            return False
        metrics.retry(upstream.name, reason)
        self._try()
        return True

    # -- passive health: what the HTTP/1.1 path feeds (relay.py, failover.py) ----------------
    def _outcome(self, success: bool, gateway_failure: bool) -> None:
        """One try's outcome to outlier detection (``Upstream.record_outcome``)."""
        instance = self.instance
        upstream = self.upstream
        if instance is not None and upstream is not None:
            upstream.record_outcome(instance, success, gateway_failure)
