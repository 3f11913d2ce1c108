"""Rate limiting: GCRA limits per route, local or in Redis, plus a per-route concurrency cap.

Data-plane entry point: ``RouteLimiter.check`` / ``check_local`` (see ``limiter``). Pure
arithmetic lives in ``gcra``, bucket tables in ``local`` (one process) and ``redis_store``
(shared by gateways), key extraction in ``keys``, response header lines in ``headers``.
"""

from gateway.ratelimit.gcra import Gcra, GcraResult, retry_after_seconds
from gateway.ratelimit.keys import compile_key, forwarded_client_ip
from gateway.ratelimit.limiter import (
    ALLOW,
    Decision,
    Limit,
    LimitSpec,
    RouteLimiter,
    parse_rate,
)
from gateway.ratelimit.local import BucketStore, LocalStore
from gateway.ratelimit.redis_store import RedisStore

__all__ = [
    "ALLOW",
    "BucketStore",
    "Decision",
    "Gcra",
    "GcraResult",
    "Limit",
    "LimitSpec",
    "LocalStore",
    "RedisStore",
    "RouteLimiter",
    "compile_key",
    "forwarded_client_ip",
    "parse_rate",
    "retry_after_seconds",
]
