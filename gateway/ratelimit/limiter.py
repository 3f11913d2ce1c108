"""Per-route admission: a list of GCRA limits that must all pass, plus a concurrency cap.

The data plane calls one method per request, after the route matched, with what it already holds
(no request object is built):

    decision = limiter.check(now, peer_ip, peer_trusted, headers, query, callback)

- ``decision`` is a ``Decision`` when the answer is known at once (only local limits, Redis
  down, a local limit or ``max_in_flight`` already refused, a missing key rejected);
- ``None`` when a Redis round trip is needed: ``callback(decision)`` is called later from the
  event loop, within the store's ``timeout`` (with the fallback decision if Redis is late).

``check_local`` is the same without a callback, for limiters whose ``uses_redis`` is False.

A decision with ``holds_slot`` (route has ``max_in_flight``) must be followed by exactly one
``limiter.release()`` when the exchange ends, whatever way it ends. Nothing else needs releasing.

When several limits apply, a request consumes from all of them or from none: local limits are
taken one by one and given back (``refund``) if a later one denies; Redis limits of one request
are decided all-or-nothing inside one script call. Limits are evaluated in config order, local
ones before the Redis round trip (a request refused locally costs no round trip).

A ``store: redis`` limit with ``lease`` (the config's default) decides from a **lease**: tokens
of the key's Redis bucket this process took ahead in one script entry (``gateway.ratelimit.
lease``: sizing, expiry, the error bound). A request that finds a token, or finds Redis's last
refusal still in force, is decided at once; one that finds the lease empty takes the Redis path
above (its own decision in the next script call) while a refill is sent behind it.

A limit belongs to an **owner**: its route (the default), ``upstream:NAME`` for a limit declared
on an upstream, or ``global``. The snapshot builder composes a route's own limits with those of
its upstream and the global ones into the route's ``RouteLimiter``; limits with the same owner,
name and parameters share one bucket table across routes (``BucketStores``) and one Redis key
space (``prefix:owner:limit:keyvalue``). With several worker processes the tables live in shared
memory (``gateway.ratelimit.shared``), so ``store: local`` is exact for the whole machine.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from gateway.ratelimit import headers as rlh
from gateway.ratelimit.gcra import SLACK, retry_after_seconds
from gateway.ratelimit.keys import Headers, KeyExtractor, TrustedAddresses, compile_key
from gateway.ratelimit.lease import Lease, LeaseTable
from gateway.ratelimit.local import DEFAULT_MAX_KEYS, BucketStore, LocalStore
from gateway.ratelimit.redis_store import RedisStore

if TYPE_CHECKING:
    from gateway.ratelimit.shared import SharedTable

__all__ = [
    "ALLOW",
    "BucketStores",
    "Decision",
    "Limit",
    "LimitSpec",
    "RouteLimiter",
    "parse_rate",
]

StoreKind = Literal["local", "redis"]
OnStoreError = Literal["allow", "local", "deny"]
Missing = Literal["shared", "reject"]

_MISSING = b""  # the shared bucket of requests without a key value (real values are non-empty)

_PERIODS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0}
_PERIODS |= {"h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")


def parse_rate(text: str) -> tuple[int, float]:
    """``"100/s"`` -> ``(100, 1.0)``; also ``N/min``, ``N/h``, ``N/day``, ``N/10s``."""
    match = _RATE.match(text.lower())
    if match is None or match.group(3) not in _PERIODS:
        raise ValueError(f"invalid rate {text!r}: expected N/s, N/min or N/h")
    count = int(match.group(1))
    if count <= 0:
        raise ValueError(f"invalid rate {text!r}: must be positive")
    period = _PERIODS[match.group(3)] * (int(match.group(2)) if match.group(2) else 1)
    if period <= 0:
        raise ValueError(f"invalid rate {text!r}: period must be positive")
    return count, period


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One ``rate_limit`` entry as the config validator produces it."""

    count: int  # requests ...
    period: float  # ... per this many seconds (the sustained rate)
    burst: int | None = None  # requests admitted at once from idle; None = ``count``
    key: str | tuple[str, ...] = "client_ip"
    store: StoreKind = "local"
    dry_run: bool = False
    missing: Missing = "shared"
    on_store_error: OnStoreError = "local"
    name: str | None = None  # policy name in headers and in the Redis key; default limitN
    max_keys: int = DEFAULT_MAX_KEYS  # local bucket table bound (LRU)
    owner: str | None = None  # whose buckets: None = the route; "upstream:NAME"; "global"
    # store: redis only: decide from a lease of tokens taken from Redis (gateway.ratelimit.lease).
    # The config's default is True; False here keeps one script call per request.
    lease: bool = False


class Decision:
    """What the listener needs: admit or not, the status, and header lines to add."""

    __slots__ = (
        "allowed",
        "dry_run",
        "headers",
        "holds_slot",
        "limit",
        "reason",
        "retry_after",
        "status",
        "store_error",
    )

    def __init__(
        self,
        allowed: bool,
        status: int = 200,
        reason: str = "ok",
        headers: bytes = b"",
        retry_after: int = 0,
        limit: str = "",
        dry_run: bool = False,
        store_error: bool = False,
        holds_slot: bool = False,
    ) -> None:
        self.allowed = allowed
        self.status = status  # 200 admitted; 429 limited; 503 max_in_flight or store down
        self.reason = reason  # ok, rate_limited, max_in_flight, store_unavailable, missing_key
        self.headers = headers  # b"name: value\r\n" lines for the response (may be b"")
        self.retry_after = retry_after  # integer seconds >= 1 on refusals, 0 when admitted
        self.limit = limit  # the limit that refused (or would have, in dry run)
        self.dry_run = dry_run  # a dry-run limit would have refused this admitted request
        self.store_error = store_error  # a Redis limit was decided by its fallback
        self.holds_slot = holds_slot  # call limiter.release() when the exchange ends

    def __repr__(self) -> str:
        return (
            f"Decision(allowed={self.allowed}, status={self.status}, reason={self.reason!r}, "
            f"retry_after={self.retry_after}, limit={self.limit!r}, dry_run={self.dry_run}, "
            f"store_error={self.store_error})"
        )


ALLOW = Decision(True)  # shared: admitted, no headers, no slot
_ALLOW_SLOT = Decision(True, holds_slot=True)


class Limit:
    """One compiled limit of a route."""

    __slots__ = (
        "bucket_id",
        "burst",
        "count",
        "debt_cap",
        "dry_run",
        "interval",
        "interval_us",
        "key",
        "lease",
        "leases",
        "local",
        "local_interval",
        "local_span",
        "local_span_cmp",
        "max_keys",
        "name",
        "on_store_error",
        "owner",
        "period",
        "policy",
        "qname",
        "redis_prefix",
        "reject_missing",
        "span",
        "span_cmp",
        "span_us",
        "store",
        "window",
    )

    def __init__(
        self,
        spec: LimitSpec,
        route: str,
        index: int,
        trusted: TrustedAddresses,
        prefix: str,
        fallback_share: float = 1.0,
    ) -> None:
        self.name = spec.name or f"limit{index}"
        self.count = spec.count
        self.period = spec.period
        self.burst = spec.burst if spec.burst is not None else spec.count
        if self.burst < 1:
            raise ValueError("burst must be at least 1")
        self.interval = spec.period / spec.count
        self.span = self.burst * self.interval
        self.span_cmp = self.span + SLACK
        # Redis works in integer microseconds (exact in Lua doubles up to 2**53).
        self.interval_us = max(1, round(self.interval * 1_000_000))
        self.span_us = self.burst * self.interval_us
        self.key: KeyExtractor = compile_key(spec.key, trusted)
        self.store: StoreKind = spec.store
        self.dry_run = spec.dry_run
        self.reject_missing = spec.missing == "reject"
        self.on_store_error: OnStoreError = spec.on_store_error
        self.owner = spec.owner or route
        # The bucket in ``local``: the limit itself for ``store: local``; for ``store: redis``
        # the fallback bucket, at ``fallback_share`` of the rate and burst (this gateway's share
        # when N gateways fall back at once), debited by every request Redis admits.
        share = fallback_share if spec.store == "redis" else 1.0
        if not 0.0 < share <= 1.0:
            raise ValueError("fallback_share must be in (0, 1]")
        local_burst = max(1, math.floor(self.burst * share + SLACK))
        self.local_interval = self.interval / share
        self.local_span = local_burst * self.local_interval
        self.local_span_cmp = self.local_span + SLACK
        # Debits of Redis-admitted requests may run the fallback bucket at most one burst into
        # debt: enough to account for what Redis admitted, bounded when this gateway gets more
        # than its share from Redis (then the fallback admits again within one span).
        self.debt_cap = 2 * self.local_span
        # Limits with the same identity share buckets (an upstream's limit across its routes);
        # a changed rate, burst or share is a new identity, so it starts from full buckets.
        self.bucket_id = (self.owner, self.name, self.local_interval, self.local_span)
        self.max_keys = spec.max_keys
        # Local limits keep their buckets here; Redis limits keep their fallback buckets.
        # Replaced by a shared table when the RouteLimiter is given ``stores``.
        self.local: BucketStore = LocalStore(spec.max_keys)
        # ``prefix:owner:limit:keyvalue``: two routes (or two limits) never share a bucket
        # by accident; an upstream-level or global limit is one key space for all its routes.
        self.redis_prefix = f"{prefix}:{self.owner}:{self.name}:".encode()
        self.qname = rlh.sf_string(self.name)
        # Set by RouteLimiter when the limit is leased (store: redis, lease, not a dry run).
        self.lease = spec.lease and spec.store == "redis" and not spec.dry_run
        self.leases: LeaseTable | None = None
        self.window = max(1, math.ceil(spec.period))
        self.policy = rlh.policy_item(self.name, spec.count, self.window)

    def remaining(self, x: float) -> int:
        left = int((self.span_cmp - x) / self.interval)
        return left if left > 0 else 0


class _Pending:
    """A request waiting for its Redis round trip (one per Redis-limited request)."""

    __slots__ = ("callback", "dry", "keys", "leased", "limiter", "now", "redis_idx", "taken", "xs")

    def __init__(
        self,
        limiter: RouteLimiter,
        now: float,
        keys: list[str | bytes | None],
        xs: list[float | None],
        taken: list[tuple[Limit, str | bytes]],
        dry: Limit | None,
        redis_idx: list[int],
        callback: Callable[[Decision], None],
        leased: list[Lease] | None,
    ) -> None:
        self.limiter = limiter
        self.now = now
        self.keys = keys
        self.xs = xs
        self.taken = taken
        self.dry = dry
        self.redis_idx = redis_idx
        self.callback = callback
        self.leased = leased  # tokens this request took from leases of its other limits

    def done(self, result: list[int] | None) -> None:
        self.callback(self.limiter._complete(self, result))


class _LeaseCall:
    """One lease script entry (a refill and/or a return) waiting for its answer."""

    __slots__ = ("back", "lease", "limit", "sent_at", "store", "want")

    def __init__(
        self, store: RedisStore, limit: Limit, lease: Lease, sent_at: float, want: int, back: int
    ) -> None:
        self.store = store
        self.limit = limit
        self.lease = lease
        self.sent_at = sent_at
        self.want = want
        self.back = back

    def done(self, result: list[Any] | None) -> None:
        lease = self.lease
        lease.refilling = False
        if result is None:
            # Failed or late: a call that ran in Redis granted tokens nobody will use (fewer
            # admissions, never more); returned tokens may be lost the same way.
            return
        limit = self.limit
        got, x_us = result[0]
        store = self.store
        store.lease_returned += self.back
        lease.grant(got, x_us, self.want, self.sent_at, limit.span_us, store.lease_ttl)
        if limit.on_store_error == "local":
            # The fallback bucket learns of leased tokens as of Redis admissions (see _complete).
            if got > 0:
                store.leased += got
                limit.local.debit(
                    lease.key, self.sent_at, got * limit.local_interval, limit.debt_cap
                )
            if self.back:
                limit.local.refund(lease.key, self.back * limit.local_interval)
        elif got > 0:
            store.leased += got


class RouteLimiter:
    """All admission control of one route. Build one per route per snapshot (buckets live in
    the ``Limit`` objects: pass ``previous`` to keep them across a reload)."""

    def __init__(
        self,
        route: str,
        specs: Sequence[LimitSpec],
        *,
        trusted: TrustedAddresses = (),
        headers: bool = False,
        legacy_headers: bool = False,
        max_in_flight: int = 0,
        redis: RedisStore | None = None,
        previous: RouteLimiter | None = None,
        stores: BucketStores | None = None,
    ) -> None:
        self.route = route
        prefix = redis.prefix if redis is not None else "gateway"
        share = redis.fallback_share if redis is not None else 1.0
        self.limits = [
            Limit(spec, route, index, trusted, prefix, share) for index, spec in enumerate(specs)
        ]
        names = [limit.name for limit in self.limits]
        if len(set(names)) != len(names):
            raise ValueError(f"route {route!r}: rate limit names must be unique: {names}")
        self.uses_redis = any(limit.store == "redis" for limit in self.limits)
        if self.uses_redis and redis is None:
            raise ValueError(f"route {route!r}: store: redis needs a top-level redis section")
        if stores is not None:
            for limit in self.limits:
                limit.local = stores.get(limit)
        elif previous is not None:
            # A reload keeps the buckets of limits whose parameters did not change.
            old = {lim.bucket_id: lim.local for lim in previous.limits}
            for limit in self.limits:
                kept = old.get(limit.bucket_id)
                if kept is not None:
                    limit.local = kept
        self.redis = redis
        if redis is not None:
            for limit in self.limits:
                if limit.lease:
                    limit.leases = redis.lease_table(
                        limit.redis_prefix, limit.interval_us, limit.span_us, limit.burst
                    )
        self.headers = headers
        self.legacy_headers = legacy_headers
        self.max_in_flight = max_in_flight
        self.in_flight: int = previous.in_flight if previous is not None else 0
        self.policy_line = (
            rlh.policy_line([limit.policy for limit in self.limits]) if self.limits else b""
        )
        # The fast path: one local limit, refusals are real (no dry run).
        only = self.limits[0] if len(self.limits) == 1 else None
        self._single = only if only is not None and only.store == "local" else None
        # The leased fast path: one leased Redis limit, no max_in_flight.
        self._single_lease = (
            only if only is not None and only.leases is not None and not max_in_flight else None
        )
        self._single_head: bytes | None = None
        if self._single is not None and headers and not legacy_headers:
            self._single_head = self.policy_line + b"ratelimit: " + self._single.qname + b";r="
        self._overload = Decision(
            False, 503, "max_in_flight", rlh.retry_after_line(1), 1, "max_in_flight"
        )
        # Counters for gateway_ratelimit_decisions_total{route,result}.
        self.allowed = 0
        self.limited = 0
        self.dry_run_hits = 0
        self.store_errors = 0
        self.overloaded = 0
        self.missing_rejected = 0

    # -- data plane ------------------------------------------------------------------------
    def check_local(
        self, now: float, peer_ip: str, peer_trusted: bool, headers: Headers, query: bytes
    ) -> Decision:
        """Decide a request of a route without Redis limits (``uses_redis`` False)."""
        limit = self._single
        if limit is None or self.max_in_flight:
            decision = self.check(now, peer_ip, peer_trusted, headers, query, None)
            assert decision is not None
            return decision
        key = limit.key(peer_ip, peer_trusted, headers, query)
        if key is None:
            if limit.reject_missing:
                return self._missing(limit)
            key = _MISSING
        x = limit.local.take(key, now, limit.interval, limit.span_cmp)
        if x <= limit.span_cmp:
            if not self.headers:
                self.allowed += 1
                return ALLOW
            if self._single_head is None:
                return self._admit([limit], [x], None, False)  # counts it
            self.allowed += 1
            # Pre-rendered up to r=; only two integers are formatted per request.
            left = int((limit.span_cmp - x) / limit.interval)
            reset = int(x - SLACK) + 1  # ceil for x > 0
            return Decision(True, 200, "ok", self._single_head + b"%d;t=%d\r\n" % (left, reset))
        if limit.dry_run:
            return self._admit([limit], [None], limit, False)
        return self._deny(limit, x)

    def check(
        self,
        now: float,
        peer_ip: str,
        peer_trusted: bool,
        headers: Headers,
        query: bytes,
        callback: Callable[[Decision], None] | None,
    ) -> Decision | None:
        """Decide now (return a Decision) or after a Redis round trip (return None, then call
        ``callback(decision)`` from the event loop). ``callback`` may be None only when
        ``uses_redis`` is False."""
        single = self._single_lease
        if single is not None:
            # Leased fast path: a token of this key's lease, or Redis's refusal still in force.
            key = single.key(peer_ip, peer_trusted, headers, query)
            if key is not None:
                assert single.leases is not None
                lease = single.leases.leases.get(key)
                if lease is not None:
                    tokens = lease.tokens
                    if tokens > 0 and now < lease.expires:
                        tokens -= 1
                        lease.tokens = tokens
                        lease.used += 1
                        if tokens <= lease.low_water and not lease.refilling:
                            self._lease_call(single, lease, now, True)
                        if not self.headers:
                            self.allowed += 1
                            return ALLOW
                        x = lease.x(now, single.interval)
                        return self._admit(self.limits, [x], None, False)  # counts it
                    if not tokens and now < lease.denied_until:
                        lease.used += 1
                        return self._deny(single, single.span + lease.denied_until - now)
        slot = False
        if self.max_in_flight:
            if self.in_flight >= self.max_in_flight:
                self.overloaded += 1
                return self._overload
            self.in_flight += 1  # reserved now: concurrent Redis decisions cannot overshoot
            slot = True
        limits = self.limits
        n = len(limits)
        keys: list[str | bytes | None] = [None] * n
        xs: list[float | None] = [None] * n
        taken: list[tuple[Limit, str | bytes]] = []
        dry: Limit | None = None
        redis_idx: list[int] = []
        leased: list[Lease] | None = None  # tokens taken from leases (given back on a refusal)
        refills: list[tuple[Limit, Lease]] | None = None  # lease calls to send after the decision
        for i in range(n):
            limit = limits[i]
            key = limit.key(peer_ip, peer_trusted, headers, query)
            if key is None:
                if limit.reject_missing:
                    self._undo(taken, slot, leased)
                    return self._missing(limit)
                key = _MISSING
            keys[i] = key
            if limit.store == "redis":
                leases = limit.leases
                lease = leases.open(key, now) if leases is not None else None
                if lease is not None:
                    if lease.tokens:
                        lease.expire(now)
                    lease.used += 1
                    if lease.tokens:
                        lease.tokens -= 1
                        xs[i] = lease.x(now, limit.interval)
                        if leased is None:
                            leased = []
                        leased.append(lease)
                        if lease.tokens <= lease.low_water and not lease.refilling:
                            refills = refills or []
                            refills.append((limit, lease))
                        continue
                    if now < lease.denied_until:
                        self._undo(taken, slot, leased)
                        return self._deny(limit, limit.span + lease.denied_until - now)
                    if not lease.refilling:
                        refills = refills or []
                        refills.append((limit, lease))
                redis_idx.append(i)
                continue
            x = limit.local.take(key, now, limit.interval, limit.span_cmp)
            xs[i] = x
            if x > limit.span_cmp:
                if limit.dry_run:
                    dry = dry or limit
                    xs[i] = None
                    continue
                self._undo(taken, slot, leased)
                return self._deny(limit, x)
            taken.append((limit, key))
        if redis_idx:
            redis = self.redis
            assert redis is not None
            if callback is None:
                raise RuntimeError("a route with Redis limits needs check(..., callback)")
            rkeys: list[bytes] = []
            args: list[int] = [len(redis_idx)]
            for i in redis_idx:
                limit = limits[i]
                key = keys[i]
                assert key is not None
                rkeys.append(
                    limit.redis_prefix + (key.encode("latin-1") if isinstance(key, str) else key)
                )
                args += (limit.interval_us, limit.span_us, 1 if limit.dry_run else 0)
            pending = _Pending(self, now, keys, xs, taken, dry, redis_idx, callback, leased)
            sent = redis.submit(rkeys, args, pending.done)
            if refills is not None:
                # After the decision's own entry: Redis runs it first, so a refill cannot take
                # the token this request needs.
                for limit, lease in refills:
                    self._lease_call(limit, lease, now, True)
            if sent:
                return None
            # Never sent (the store is down): what the fallback admits is owed to Redis.
            return self._complete(pending, None, rkeys)
        if refills is not None:
            for limit, lease in refills:
                self._lease_call(limit, lease, now, True)
        return self._admit(limits, xs, dry, False, slot)

    def release(self) -> None:
        """The exchange of a decision with ``holds_slot`` ended."""
        if self.in_flight > 0:
            self.in_flight -= 1

    def expire(self, now: float) -> None:
        """Periodic (e.g. once a second): drop idle keys so memory shrinks after a flood; give
        expired lease tokens back to Redis."""
        for limit in self.limits:
            limit.local.expire(now)
            if limit.leases is not None:
                for lease in limit.leases.sweep(now):
                    self._lease_call(limit, lease, now, False)

    def stats(self) -> dict[str, int]:
        """Decision counts by result, for ``gateway_ratelimit_decisions_total{route,result}``."""
        return {
            "allowed": self.allowed,
            "limited": self.limited,
            "dry_run": self.dry_run_hits,
            "store_error": self.store_errors,
            "max_in_flight": self.overloaded,
            "missing_key": self.missing_rejected,
        }

    # -- internals ---------------------------------------------------------------------------
    def _complete(
        self, pending: _Pending, result: list[int] | None, unsent: list[bytes] | None = None
    ) -> Decision:
        """Finish a decision with Redis results (``result``) or the fallback (None). ``unsent``:
        the decision's Redis keys when it never reached Redis (then the requests the local
        fallback admits are owed to Redis, which is debited for them when it is back)."""
        limits = self.limits
        xs = pending.xs
        taken = pending.taken
        dry = pending.dry
        slot = bool(self.max_in_flight)
        if result is not None:
            denied: Limit | None = None
            worst = 0.0
            for j, i in enumerate(pending.redis_idx):
                limit = limits[i]
                x_us = result[j]
                if x_us > limit.span_us:
                    if limit.dry_run:
                        dry = dry or limit
                        continue
                    wait = (x_us - limit.span_us) / 1_000_000
                    if limit.leases is not None:
                        # Empty in Redis until then: this key is refused locally meanwhile.
                        lease = limit.leases.leases.get(pending.keys[i] or _MISSING)
                        if lease is not None and not lease.tokens:
                            lease.denied_until = pending.now + wait
                    if denied is None or wait > worst:
                        denied, worst = limit, wait
                    continue
                xs[i] = x_us / 1_000_000
            if denied is not None:
                self._undo(taken, slot, pending.leased)
                return self._deny(denied, worst + denied.span)
            # Redis admitted: the fallback buckets learn it, so a fallback right after these
            # decisions cannot hand out the same budget again.
            now = pending.now
            keys = pending.keys
            for j, i in enumerate(pending.redis_idx):
                limit = limits[i]
                if limit.on_store_error == "local" and result[j] <= limit.span_us:
                    key = keys[i]
                    assert key is not None
                    limit.local.debit(key, now, limit.local_interval, limit.debt_cap)
            return self._admit(limits, xs, dry, False, slot)
        self.store_errors += 1
        now = pending.now
        for i in pending.redis_idx:
            limit = limits[i]
            mode = limit.on_store_error
            if mode == "allow":
                continue
            if mode == "deny":
                if limit.dry_run:
                    dry = dry or limit
                    continue
                self._undo(taken, slot, pending.leased)
                self.limited += 1
                return Decision(
                    False,
                    503,
                    "store_unavailable",
                    self.policy_line + rlh.retry_after_line(1),
                    1,
                    limit.name,
                    store_error=True,
                )
            key = pending.keys[i]
            assert key is not None
            x = limit.local.take(key, now, limit.local_interval, limit.local_span_cmp)
            if x > limit.local_span_cmp:
                if limit.dry_run:
                    dry = dry or limit
                    continue
                self._undo(taken, slot, pending.leased)
                return self._deny(limit, x - limit.local_span + limit.span, store_error=True)
            taken.append((limit, key))
            # Headers speak of the configured limit: scale the share's x back to it.
            xs[i] = x * limit.interval / limit.local_interval
        if unsent is not None and self.redis is not None:
            for j, i in enumerate(pending.redis_idx):
                limit = limits[i]
                if limit.on_store_error == "local" and xs[i] is not None:
                    self.redis.owe(unsent[j], limit.interval_us, limit.span_us)
        return self._admit(limits, xs, dry, True, slot)

    def _undo(
        self, taken: list[tuple[Limit, str | bytes]], slot: bool, leased: list[Lease] | None = None
    ) -> None:
        for limit, key in taken:
            limit.local.refund(key, limit.local_interval)
        if leased is not None:
            for lease in leased:
                lease.tokens += 1
        if slot:
            self.in_flight -= 1

    def _lease_call(self, limit: Limit, lease: Lease, now: float, refill: bool) -> None:
        """Send one lease entry: a refill sized by the lease policy (``refill``) and the
        lease's expired tokens going back. Nothing is sent while the store is down: the
        lease's tokens keep deciding until they run out or expire, then the fallback does."""
        redis = self.redis
        leases = limit.leases
        if redis is None or leases is None or not redis.available:
            return
        want = leases.policy.plan(lease, now) if refill else 0
        back = lease.back
        if want <= 0 and back <= 0:
            return
        call = _LeaseCall(redis, limit, lease, now, want, back)
        args = [-1, limit.interval_us, limit.span_us, want, back]
        lease.refilling = True  # before submit: a store may answer at once
        lease.back = 0
        if redis.submit([lease.rkey], args, call.done):
            redis.lease_calls += 1
        else:
            lease.refilling = False
            lease.back = back

    def _admit(
        self,
        limits: Sequence[Limit],
        xs: Sequence[float | None],
        dry: Limit | None,
        store_error: bool,
        slot: bool = False,
    ) -> Decision:
        if dry is None:
            self.allowed += 1
            if not self.headers and not store_error:
                return _ALLOW_SLOT if slot else ALLOW
        else:
            self.dry_run_hits += 1
        lines = b""
        if self.headers:
            items: list[tuple[bytes, int, int]] = []
            tightest: tuple[int, int, int] | None = None
            for limit, x in zip(limits, xs, strict=True):
                if x is None:
                    continue
                left = limit.remaining(x)
                reset = math.ceil(x - SLACK)
                items.append((limit.qname, left, reset))
                if tightest is None or left < tightest[1]:
                    tightest = (limit.count, left, reset)
            lines = self.policy_line
            if items:
                lines += rlh.ratelimit_line(items)
            if self.legacy_headers and tightest is not None:
                lines += rlh.legacy_lines(*tightest)
        return Decision(
            True,
            headers=lines,
            limit=dry.name if dry is not None else "",
            dry_run=dry is not None,
            store_error=store_error,
            holds_slot=slot,
        )

    def _deny(self, limit: Limit, x: float, store_error: bool = False) -> Decision:
        self.limited += 1
        retry = retry_after_seconds(x - limit.span)
        # §6 of the draft: Retry-After not earlier than the end of the effective window t.
        lines = (
            self.policy_line
            + rlh.ratelimit_line([(limit.qname, 0, retry)])
            + rlh.retry_after_line(retry)
        )
        if self.legacy_headers:
            lines += rlh.legacy_lines(limit.count, 0, retry)
        return Decision(
            False, 429, "rate_limited", lines, retry, limit.name, store_error=store_error
        )

    def _missing(self, limit: Limit) -> Decision:
        self.missing_rejected += 1
        # Not 429: waiting does not help a request that lacks the key (RFC 9110 §15.5.1).
        return Decision(False, 400, "missing_key", b"", 0, limit.name)


class BucketStores:
    """Which bucket table each limit of one snapshot uses.

    Limits with the same ``bucket_id`` (owner, name, rate, burst) get the same table, so the
    limit of an upstream or a global one is one set of buckets whatever route a request took.
    Tables of ``previous`` limiters are carried over (a reload keeps the buckets of unchanged
    limits). With ``shared`` (a worker of ``workers: N``) every table is a view of the shared
    memory table instead: the state then lives outside the snapshot altogether.
    """

    def __init__(
        self, shared: SharedTable | None = None, previous: Iterable[RouteLimiter] = ()
    ) -> None:
        self.shared = shared
        self.tables: dict[tuple[str, str, float, float], BucketStore] = {}
        self._previous: dict[tuple[str, str, float, float], BucketStore] = {}
        for limiter in previous:
            for limit in limiter.limits:
                self._previous[limit.bucket_id] = limit.local

    def get(self, limit: Limit) -> BucketStore:
        bucket_id = limit.bucket_id
        store = self.tables.get(bucket_id)
        if store is None:
            if self.shared is not None:
                owner, name, interval, span = bucket_id
                store = self.shared.view(f"{owner}\x00{name}\x00{interval!r}\x00{span!r}")
            else:
                kept = self._previous.get(bucket_id)
                store = kept if isinstance(kept, LocalStore) else LocalStore(limit.max_keys)
            self.tables[bucket_id] = store
        return store
