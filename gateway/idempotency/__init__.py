"""Idempotency-Key replay store at the gateway (docs/idempotency.md).

``core`` is pure (key syntax, scoping, fingerprints, decisions, records); ``stores`` holds the
local (SQLite, shared by the workers of one gateway) and Redis stores; ``policy`` is what the
listener drives per request.
"""

from __future__ import annotations

from gateway.idempotency import stores as _stores
from gateway.idempotency.policy import Recorder, RouteIdempotency
from gateway.idempotency.registry import idempotency_stores

__all__ = ["Recorder", "RouteIdempotency", "_stores", "idempotency_stores"]
