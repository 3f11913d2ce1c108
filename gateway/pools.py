"""What the snapshot and the control plane need of an instance's connection pool.

The pools themselves belong to the data plane (``gateway.proxy.upstream.InstancePool``), which
registers its class here when it is imported. ``gateway.snapshot`` creates pools through the
registered factory and types them against ``ConnectionPool``, so it does not import the
transport: a snapshot can be built, carried over and described without it.
"""

from __future__ import annotations

import importlib
import ssl
from typing import Protocol

# The module that registers the data plane's pool factory when it is imported.
DATA_PLANE_POOLS = "gateway.proxy.upstream"


class IdleConnection(Protocol):
    def close(self) -> None: ...


class IdleConnections(Protocol):
    """The idle connections of a pool (a list in the data plane)."""

    def __len__(self) -> int: ...

    def pop(self) -> IdleConnection: ...


class ConnectionPool(Protocol):
    """The control-plane view of one instance's pool of kept-alive upstream connections."""

    @property
    def idle(self) -> IdleConnections: ...

    @property
    def open_count(self) -> int:
        """Connections open (idle or busy)."""
        ...

    @property
    def connecting(self) -> int:
        """Connections being opened."""
        ...

    def sweep(self, now: float) -> None:
        """Close idle connections past their idle timeout (``now``: monotonic seconds)."""

    def close_idle(self) -> None:
        """Close every idle connection now (the instance was ejected); new ones may follow."""

    def close_all(self) -> None:
        """The instance left the config: close idle connections now, busy ones on release."""


class PoolFactory(Protocol):
    def __call__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int,
        idle_timeout: float,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> ConnectionPool: ...


_factory: PoolFactory | None = None


def set_pool_factory(factory: PoolFactory) -> None:
    global _factory
    _factory = factory


def pool_factory() -> PoolFactory:
    """The registered factory. A process that builds a snapshot before it imported the data
    plane (``gateway check``, unit tests) gets the data plane imported now, once: the
    dependency is resolved at first use, never when ``gateway.snapshot`` is imported."""
    if _factory is None:
        importlib.import_module(DATA_PLANE_POOLS)
        if _factory is None:
            raise RuntimeError(f"{DATA_PLANE_POOLS} did not register a connection pool factory")
    return _factory
