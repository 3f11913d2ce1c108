"""The watcher contract between discovery backends and the control plane.

A backend watches *queries* (a service name plus filters). Whenever it learns the current
instances of a query it hands the **complete** set to its ``Sink`` (never a delta), or reports
a failure. The sink (``DiscoveryManager``) owns what happens next: keeping the last good set on
failure, the ``allow_empty`` rule, metrics, and rebuilding the data-plane snapshot.

Backends never decide staleness and never empty an upstream themselves.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "Backend",
    "Backoff",
    "DiscoveredInstance",
    "DiscoveryError",
    "ServiceQuery",
    "Sink",
]


class DiscoveryError(Exception):
    """A backend could not produce an answer (down, slow, garbage)."""


@dataclass(frozen=True, slots=True)
class DiscoveredInstance:
    host: str
    port: int
    weight: int = 1
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)
    healthy: bool = True
    id: str = ""

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "address": self.address,
            "weight": self.weight,
            "tags": list(self.tags),
            "meta": dict(self.meta),
            "healthy": self.healthy,
        }


@dataclass(frozen=True, slots=True)
class ServiceQuery:
    """What an upstream follows. Equal queries share one watch in a backend."""

    service: str
    tags: tuple[str, ...] = ()
    datacenter: str | None = None
    passing_only: bool = True

    def __str__(self) -> str:
        extra = [f"tags={','.join(self.tags)}"] if self.tags else []
        if self.datacenter:
            extra.append(f"dc={self.datacenter}")
        if not self.passing_only:
            extra.append("all")
        return self.service + (f" ({' '.join(extra)})" if extra else "")


class Sink(Protocol):
    """Where a backend sends its answers (implemented by the manager)."""

    def update(
        self, backend: str, query: ServiceQuery, instances: tuple[DiscoveredInstance, ...]
    ) -> None:
        """The complete current instance set of ``query``."""

    def failure(self, backend: str, query: ServiceQuery | None, error: BaseException) -> None:
        """The backend failed to answer ``query`` (None: the backend as a whole)."""


class Backend(abc.ABC):
    """A discovery backend. ``watch`` is called for every query before ``start``."""

    type: str = ""

    def __init__(self, name: str, sink: Sink) -> None:
        self.name = name
        self.sink = sink
        self.queries: set[ServiceQuery] = set()

    def watch(self, query: ServiceQuery) -> None:
        self.queries.add(query)

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin watching every query; returns once the watches run (not once answered)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop every watch and release connections."""


class WatchTasks:
    """One watch task per query, started together and cancelled together (what the backends
    that poll or long-poll per service have in common)."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[None]] = []

    def start(
        self,
        label: str,
        queries: Iterable[ServiceQuery],
        watch: Callable[[ServiceQuery], Coroutine[Any, Any, None]],
    ) -> None:
        for query in queries:
            self._tasks.append(asyncio.create_task(watch(query), name=f"{label}-{query}"))

    async def cancel(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Backoff:
    """Exponential backoff with full jitter between ``low`` and the doubling cap.

    Full jitter (a uniform pick in [low, cap]) spreads the retries of many gateways that lost
    the same backend at the same moment, instead of having them retry in lockstep.
    """

    def __init__(self, low: float, high: float, rng: random.Random | None = None) -> None:
        self.low = low
        self.high = max(high, low)
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        cap = min(self.high, self.low * (2**self.failures))
        self.failures = min(self.failures + 1, 32)
        return self._rng.uniform(self.low, cap)

    def reset(self) -> None:
        self.failures = 0
