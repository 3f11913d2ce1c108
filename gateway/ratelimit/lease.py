"""Token leasing for ``store: redis`` limits: decide locally from a share of the Redis bucket.

Without leasing every request of a Redis-limited route is its own decision in Redis (batched
per loop iteration, but still encoded, written, answered and parsed: ~70% more instructions per
request than a route without limits). With leasing a worker takes ``n`` tokens of a key's
bucket in one atomic script call (the Redis TAT advances by ``n * interval``, so the tokens are
counted in Redis as if ``n`` requests had been admitted there) and admits the next ``n``
requests of that key without asking, synchronously.

**Sizing.** The lease of a key follows the rate at which this worker sees that key's requests
(``rate``, a moving average sampled at each refill): ``size = ceil(rate * horizon)`` (about
``horizon`` = 100 ms of this worker's traffic), at least 1 and at most ``max_tokens``. A key
seen at less than ``2 / ttl`` requests per second gets no lease at all (a prefetched token
would mostly expire unused): its requests go to Redis one by one, as without leasing. A refill
is sent when the lease falls to ``size // 2`` tokens (the low-water mark), so with a round trip
shorter than half the horizon requests never wait. A worker never holds more than
``max_tokens`` tokens of one key.

**Why it stays accurate.** Every token a worker uses was granted by the GCRA in Redis, so over
any long window the total admitted never exceeds what Redis alone would have admitted. In a
short window it can exceed it by the tokens that were held in leases when the window began
(granted earlier, used inside it), and it falls short by the tokens held when it ends: the
error of any window is at most ``H * max_tokens`` requests for ``H`` lease holders (gateways x
workers). ``max_tokens = max(1, floor(burst * share))`` with ``share = LEASE_BURST_SHARE *
fallback_share / workers``: with ``fallback_share = 1/N`` for N gateways, as the fallback
already asks for, all holders together hold at most 5% of the burst, which is at most 5% of any
window's allowance ``burst + rate * t`` (plus one token per holder when the burst is so small
that 5% of it rounds down to zero).

**Expiry and return.** Tokens are valid for ``ttl`` after their grant. Expired tokens, and the
tokens of a lease nobody uses any more, are given back to Redis (the TAT moves back by
``n * interval``, never below now) with the next call for that key, or by the periodic sweep:
stranded tokens cost the other gateways at most ``max_tokens`` each, for at most ``ttl`` plus
one sweep interval.

**Refused keys.** When Redis answers that a key's bucket is empty it also says when the next
token is due; until then this worker refuses that key locally (429 with the same Retry-After)
instead of asking again: no request could have passed in between, except one using tokens
another gateway returned meanwhile (the error is on the strict side).

Pure bookkeeping, no IO and no clock of its own: ``now`` is passed in (the limiter sends the
script calls, ``gateway.ratelimit.limiter``).
"""

from __future__ import annotations

import math

from gateway.ratelimit.gcra import SLACK

__all__ = [
    "DEFAULT_HORIZON",
    "DEFAULT_TTL",
    "LEASE_BURST_SHARE",
    "LEASE_MAX_KEYS",
    "Lease",
    "LeasePolicy",
    "LeaseTable",
]

DEFAULT_HORIZON = 0.1  # seconds of this worker's recent rate per lease
DEFAULT_TTL = 1.0  # seconds a leased token stays valid
LEASE_BURST_SHARE = 0.05  # of the burst, held by all lease holders together (see above)
LEASE_MAX_KEYS = 10_000  # leases per limit and worker; beyond, new keys are decided one by one
SWEEP_INTERVAL = 0.5  # seconds between sweeps of one table (``sweep`` is called more often)
_EWMA = 0.5  # weight of a new rate sample


class Lease:
    """This worker's share of one key's bucket."""

    __slots__ = (
        "back",
        "denied_until",
        "expires",
        "key",
        "low_water",
        "rate",
        "refilling",
        "rkey",
        "since",
        "tat",
        "tokens",
        "used",
    )

    def __init__(self, key: str | bytes, rkey: bytes, now: float) -> None:
        self.key = key  # the key value (the fallback bucket's key)
        self.rkey = rkey  # the Redis key
        self.tokens = 0  # usable until ``expires``
        self.expires = 0.0
        self.tat = now  # Redis's TAT after the last grant, on this process's clock
        self.denied_until = 0.0  # Redis said the bucket is empty until then
        self.refilling = False  # a script call for this lease is out
        self.back = 0  # expired tokens to give back with the next call
        self.low_water = 0  # refill when ``tokens`` falls to this
        self.rate = 0.0  # requests per second of this key at this worker (moving average)
        self.used = 0  # requests since ``since`` (the last rate sample)
        self.since = now

    def x(self, now: float, interval: float) -> float:
        """GCRA ``x`` of a request that just took a token (for the RateLimit headers): the
        token is the lowest of the lease, ``tokens`` (those left) intervals below the TAT."""
        x = self.tat - self.tokens * interval - now
        return x if x > interval else interval

    def grant(
        self, got: int, x_us: int, want: int, sent_at: float, span_us: int, ttl: float
    ) -> None:
        """Apply a lease answer: ``got`` tokens and Redis's ``x`` after them (or, when none
        were granted, ``x`` of one more request), for a call sent at ``sent_at``. Times are
        taken from the send: the grant is then seen at most one round trip early (a token
        expires that much sooner, a refusal is retried that much sooner)."""
        if got > 0:
            self.tokens += got
            self.expires = sent_at + ttl
            self.tat = sent_at + x_us / 1_000_000
            self.denied_until = 0.0
        elif want > 0:
            wait = (x_us - span_us) / 1_000_000
            if wait > 0:
                self.denied_until = sent_at + wait

    def expire(self, now: float) -> None:
        """Tokens past their ``ttl`` are not used: they go back to Redis with the next call."""
        if self.tokens and now >= self.expires:
            self.back += self.tokens
            self.tokens = 0


class LeasePolicy:
    """How big a lease is: the sizing rule of the module docstring."""

    __slots__ = ("horizon", "max_tokens", "min_rate", "ttl")

    def __init__(self, burst: int, share: float, horizon: float, ttl: float) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError("lease share must be in (0, 1]")
        if horizon <= 0 or ttl <= 0:
            raise ValueError("lease horizon and ttl must be positive")
        self.max_tokens = max(1, math.floor(burst * share + SLACK))
        self.horizon = horizon
        self.ttl = ttl
        self.min_rate = 2.0 / ttl  # below: a token leased ahead would mostly expire unused

    def plan(self, lease: Lease, now: float) -> int:
        """Tokens to ask for now (0: none), after taking a rate sample; sets the low-water
        mark for the size it plans."""
        elapsed = now - lease.since
        if elapsed > 0.0:
            sample = lease.used / elapsed
            lease.rate = sample if lease.rate == 0.0 else lease.rate + _EWMA * (sample - lease.rate)
            lease.used = 0
            lease.since = now
        rate = lease.rate
        if rate < self.min_rate:
            lease.low_water = 0
            return 0
        size = math.ceil(rate * self.horizon)
        if size > self.max_tokens:
            size = self.max_tokens
        lease.low_water = size // 2
        room = self.max_tokens - lease.tokens
        return size if size <= room else max(room, 0)


class LeaseTable:
    """The leases of one limit in one worker (shared by the routes that share the limit)."""

    __slots__ = ("leases", "max_keys", "next_sweep", "policy", "prefix")

    def __init__(self, policy: LeasePolicy, prefix: bytes, max_keys: int = LEASE_MAX_KEYS) -> None:
        self.policy = policy
        self.prefix = prefix  # of the Redis keys: ``redis_prefix`` of the limit
        self.max_keys = max_keys
        self.leases: dict[str | bytes, Lease] = {}
        self.next_sweep = 0.0

    def __len__(self) -> int:
        return len(self.leases)

    def open(self, key: str | bytes, now: float) -> Lease | None:
        """The lease of ``key``, a new (empty) one when the key is new; None when the table is
        full (the key is decided one request at a time)."""
        lease = self.leases.get(key)
        if lease is None and len(self.leases) < self.max_keys:
            rkey = self.prefix + (key.encode("latin-1") if isinstance(key, str) else key)
            lease = self.leases[key] = Lease(key, rkey, now)
            # The opening request starts the first rate sample (at ``since``) rather than
            # counting in it: the caller counts every request, this one included.
            lease.used = -1
        return lease

    def sweep(self, now: float) -> list[Lease]:
        """Expire tokens past their ttl and forget idle leases; returns the leases with tokens
        to give back (the caller sends them). Cheap when called more than once per interval."""
        if now < self.next_sweep:
            return []
        self.next_sweep = now + SWEEP_INTERVAL
        ttl = self.policy.ttl
        returning: list[Lease] = []
        idle: list[str | bytes] = []
        for key, lease in self.leases.items():
            if lease.refilling:
                continue
            lease.expire(now)
            if lease.back:
                returning.append(lease)
            elif not lease.tokens and now - lease.since > ttl and now >= lease.denied_until:
                idle.append(key)
        for key in idle:
            del self.leases[key]
        return returning

    def held(self) -> int:
        """Tokens held (usable or waiting to go back): diagnostics and tests."""
        return sum(lease.tokens + lease.back for lease in self.leases.values())
