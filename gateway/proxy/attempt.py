"""One try of an exchange on one instance: ``UpstreamAttempt``.

An exchange makes one attempt per try: the first, each retry (``failover._try_failed``), and a
hedge racing the first (``failover._hedge``). The attempt owns what belongs to that try: the
instance (and its ``active_requests`` slot), the upstream connection, the read deadline, the
hedge timer of a primary try and the try's timings. It is what an ``UpstreamConnection`` is lent
to (``upstream.UpstreamTry``); the connection reports each event to the try's downstream
(``client``: the phases of relay.py and failover.py) with the try as the first argument, so the
phases never ask which connection an event came from, and the phases tell a stale try (its
exchange over) by its ``ex``. Which of two racing attempts wins is decided in one place,
``Failover._race_won``.

Cost: one object with slots per try; a plain GET makes exactly one. The events do not pass
through it (a forwarding call per event cost ~1% of a small GET), and the exchange lets go of
it when it ends (``RequestPhases._observe``), so the pair is freed without the cyclic GC.

Tries that end before their exchange (a retried failure, a lost hedge race) are kept as plain
``Attempt`` tuples in ``Exchange.past_attempts`` (``record_try``: failure paths only), so that
``on_log`` filters can be given every try (``exchange_attempts``; the tracing filter makes a
span of each).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.filters.api import Attempt
    from gateway.proxy.downstream import Downstream
    from gateway.proxy.exchange import Exchange
    from gateway.proxy.upstream import InstancePool, UpstreamLink
    from gateway.snapshot import Instance


class UpstreamAttempt:
    """One try: an instance, then a connection to it, and the events of that connection."""

    __slots__ = (
        "address",
        "bytes_out",
        "client",
        "conn",
        "ex",
        "hedge_timer",
        "instance",
        "read_deadline",
        "t_done",
        "t_start",
    )

    def __init__(self, client: Downstream, ex: Exchange, instance: Instance) -> None:
        self.client = client
        self.ex = ex
        # Holds one of the instance's active_requests (taken by whoever made the attempt) until
        # ``release``; None once given back.
        self.instance: Instance | None = instance
        self.conn: UpstreamLink | None = None
        # The upstream owes us bytes by then (0: it does not, e.g. it waits for the client).
        self.read_deadline = 0.0
        self.t_start = 0.0  # perf_counter when the request went out on a connection
        self.t_done = 0.0  # perf_counter when the response was complete
        self.hedge_timer: asyncio.TimerHandle | None = None  # a primary try's hedge delay
        # The instance it was sent to, for the access log: set when the try is attached (a retry
        # starts with the address of the try before it, as the log reported it until then).
        self.address = ""
        # Response body bytes of this try relayed to the client (only the try that answers
        # relays any: a retried response is dropped, a race is decided at the head).
        self.bytes_out = 0

    def release(self) -> None:
        """Give the instance's active-request slot back (idempotent)."""
        instance = self.instance
        if instance is not None:
            instance.active_requests -= 1
            self.instance = None

    def abandon(self) -> None:
        """The exchange gives this try up mid-message: abort its connection, free its slot."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.discard()
        self.read_deadline = 0.0
        self.release()

    def bind_pool(self, pool: InstancePool) -> None:
        """Where the pool counts protocol errors (its first exchange tells it)."""
        pool.bind_metrics(self.client.server.metrics, self.ex.upstream_name)


def record_try(
    ex: Exchange, attempt: UpstreamAttempt, address: str, end: float, outcome: str, sent: bool
) -> None:
    """``attempt`` ended before the exchange (``outcome``: why); ``sent``: its request went out
    on a connection (else it starts when the try before it ended, or the exchange began)."""
    past = ex.past_attempts
    start = attempt.t_start if sent and attempt.t_start else (past[-1][2] if past else ex.t_start)
    labels = ex.attempt_labels
    label = labels.get(attempt, "") if labels is not None else ""
    ex.past_attempts = (*past, (address, start, end, label, outcome))
    ex.last_ended = attempt


def exchange_attempts(
    ex: Exchange, attempt: UpstreamAttempt | None, now: float
) -> tuple[Attempt, ...]:
    """Every try of the finished exchange ``ex``, in the order they were made: the ended ones,
    then the current one, ``attempt`` (its outcome "" or the gateway's error code, e.g.
    upstream_timeout; the exchange has already let go of it: ``RequestPhases._observe``)."""
    past = ex.past_attempts
    if attempt is None or attempt is ex.last_ended:
        return past
    start = attempt.t_start or (past[-1][2] if past else ex.t_start)
    labels = ex.attempt_labels
    current = (
        attempt.address,
        start,
        attempt.t_done or now,
        labels.get(attempt, "") if labels is not None else "",
        ex.error_code,
    )
    return (*past, current) if past else (current,)
