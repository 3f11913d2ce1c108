"""One store per kind (and Redis URL / database file) per process, shared by snapshots: a
reload that keeps the settings keeps the connection or the database thread."""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path
from typing import cast

from gateway.config.model import GatewayConfig
from gateway.idempotency.policy import RouteIdempotency
from gateway.idempotency.stores import IdempotencyStore, RedisIdempotencyStore, SQLiteStore
from gateway.proxy.headers import TrustedProxies

DATABASE_NAME = "idempotency.sqlite3"


class IdempotencyStores:
    def __init__(self) -> None:
        self._stores: dict[tuple[str, str, float], IdempotencyStore] = {}

    def _store(self, config: GatewayConfig, kind: str) -> tuple[IdempotencyStore, str]:
        if kind == "redis":
            redis = config.redis
            assert redis is not None  # schema check: store: redis needs the redis section
            key = ("redis", redis.url, redis.timeout)
            store = self._stores.get(key)
            if store is None:
                store = self._stores[key] = RedisIdempotencyStore(redis.url, timeout=redis.timeout)
            return store, redis.prefix
        from gateway.discovery.manager import state_dir_of

        directory = state_dir_of(config)
        path = None if directory is None else Path(directory) / DATABASE_NAME
        key = ("local", str(path), 0.0)
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = SQLiteStore(path)
        return store, "gateway"

    def for_config(self, config: GatewayConfig) -> dict[str, RouteIdempotency]:
        policies: dict[str, RouteIdempotency] = {}
        trusted: Container[str] | None = None
        for route in config.routes:
            idem = route.idempotency
            if idem is None:
                continue
            if trusted is None:
                # Membership by address string (its __contains__ is typed for str only).
                trusted = cast("Container[str]", TrustedProxies(config.trusted_proxies))
            store, prefix = self._store(config, idem.store)
            policies[route.name] = RouteIdempotency(
                route.name, idem, store, trusted=trusted, prefix=prefix
            )
        return policies

    async def close(self) -> None:
        while self._stores:
            _, store = self._stores.popitem()
            await store.close()


idempotency_stores = IdempotencyStores()
