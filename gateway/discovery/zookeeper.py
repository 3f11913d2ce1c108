"""ZooKeeper discovery (``type: zookeeper``) in Apache Curator's service-discovery layout.

Curator's ``ServiceDiscovery`` registers each instance as a (usually ephemeral) znode
``{base path}/{service name}/{instance id}`` whose data is the JSON form of ``ServiceInstance``::

    {"name": "users", "id": "8f0c…", "address": "10.0.0.5", "port": 8080, "sslPort": null,
     "payload": null, "registrationTimeUTC": 1700000000000, "serviceType": "DYNAMIC",
     "uriSpec": null, "enabled": true}

so services that register through Curator are found as they are. ``port`` is used, else
``sslPort`` (meta ``scheme: https``); ``enabled: false`` (Curator 4+) hides an instance; a
payload object's scalar values become metadata and an integer ``weight`` in it the weight.

Client: **kazoo**, the maintained pure-Python ZooKeeper client (python-zk). It implements the
whole session protocol (session timeout negotiation, reconnects within the session, expiry,
one-shot watches) which an asyncio client would have to re-implement; the asyncio options on
PyPI are unmaintained. kazoo runs its connection in its own thread; its blocking reads run in the
default executor (``asyncio.to_thread``) and its callbacks come back to the event loop with
``call_soon_threadsafe``, so the event loop never blocks on ZooKeeper.

Per query: read the children of the service node with a children watch, and each child's data
with a data watch; any watch firing triggers a fresh read of the complete set. A missing service
node is an empty set (with an ``exists`` watch for its creation). Connection loss (SUSPENDED) is
reported as a failure (stale); on every (re)connection all queries are read again, which also
re-installs the watches: after a session expiry (LOST) kazoo establishes a new session and the
old watches are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import orjson
from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.retry import KazooRetry

from gateway.config.model import DiscoveryConfig
from gateway.discovery.base import (
    Backend,
    Backoff,
    DiscoveredInstance,
    DiscoveryError,
    ServiceQuery,
    Sink,
)

__all__ = ["ZooKeeperBackend", "parse_curator_instance"]

log = logging.getLogger("gateway.discovery.zookeeper")


def _port(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ValueError(f"invalid port {value!r}")
    return value


def parse_curator_instance(node: str, raw: bytes) -> DiscoveredInstance | None:
    """A Curator ``ServiceInstance`` JSON -> instance; None when disabled; ``ValueError`` on
    data that is not a Curator instance."""
    data = orjson.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    address = data.get("address")
    if not isinstance(address, str) or not address:
        raise ValueError("missing address")
    port, ssl_port = _port(data.get("port")), _port(data.get("sslPort"))
    if port is None and ssl_port is None:
        raise ValueError("neither port nor sslPort")
    if data.get("enabled", True) is False:
        return None
    meta: dict[str, str] = {}
    weight = 1
    payload = data.get("payload")
    if isinstance(payload, dict):
        for key, value in payload.items():
            if key == "@class" or isinstance(value, dict | list) or value is None:
                continue
            meta[str(key)] = str(value)
        given = payload.get("weight")
        if isinstance(given, int) and not isinstance(given, bool) and given >= 1:
            weight = min(given, 10_000)
    if port is None:
        meta["scheme"] = "https"
    service_type = data.get("serviceType")
    if isinstance(service_type, str):
        meta.setdefault("serviceType", service_type)
    instance_id = data.get("id")
    return DiscoveredInstance(
        address.strip("[]"),
        port if port is not None else ssl_port,  # type: ignore[arg-type]
        weight,
        (),
        meta,
        True,
        str(instance_id) if instance_id is not None else node,
    )


class ZooKeeperBackend(Backend):
    type = "zookeeper"

    def __init__(self, config: DiscoveryConfig, sink: Sink) -> None:
        super().__init__(config.name, sink)
        self.config = config
        assert config.hosts is not None
        self.base = "/" + (config.prefix or "/services").strip("/")
        self.client: KazooClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: dict[ServiceQuery, asyncio.Event] = {}
        self._watchers: dict[ServiceQuery, Callable[[Any], None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._bad_nodes: set[str] = set()
        self.sessions: list[int] = []  # session ids seen, in order (tests: re-established)

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        retry = KazooRetry(
            max_tries=-1,
            delay=self.config.retry_min,
            max_delay=self.config.retry_max,
            max_jitter=0.5,
        )
        self.client = KazooClient(
            hosts=self.config.hosts,
            timeout=self.config.session_timeout,
            connection_retry=retry,
            logger=logging.getLogger("gateway.discovery.zookeeper.kazoo"),
        )
        self.client.add_listener(self._on_state)
        for query in self.queries:
            event = asyncio.Event()
            event.set()
            self._wake[query] = event
            self._watchers[query] = self._watcher(event)
        # Connects (and reconnects, forever) in kazoo's thread; state changes arrive in
        # _on_state. start_async itself does not block.
        self.client.start_async()
        for query in self.queries:
            self._tasks.append(asyncio.create_task(self._run(query), name=f"zookeeper-{query}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        client, self.client = self.client, None
        if client is not None:
            client.remove_listener(self._on_state)

            def close() -> None:
                with contextlib.suppress(Exception):
                    client.stop()
                    client.close()

            await asyncio.to_thread(close)

    # -- kazoo thread -> event loop ------------------------------------------------------------

    def _watcher(self, event: asyncio.Event) -> Callable[[Any], None]:
        # One callable per query: kazoo keeps watchers in sets, so re-reading does not stack
        # duplicate watchers on a node.
        def fire(_: Any) -> None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(event.set)

        return fire

    def _on_state(self, state: str) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._state_changed, state)

    def _state_changed(self, state: str) -> None:
        if state == KazooState.CONNECTED:
            session = self.client.client_id[0] if self.client and self.client.client_id else 0
            if not self.sessions or self.sessions[-1] != session:
                self.sessions.append(session)
            for event in self._wake.values():
                event.set()  # relist: re-reads everything and re-installs the watches
        elif state == KazooState.SUSPENDED:
            self.sink.failure(self.name, None, DiscoveryError("connection to ZooKeeper lost"))
        elif state == KazooState.LOST:
            log.warning("zookeeper %s: session lost; a new one is being established", self.name)
            self.sink.failure(self.name, None, DiscoveryError("ZooKeeper session expired"))

    # -- per query ---------------------------------------------------------------------------

    async def _run(self, query: ServiceQuery) -> None:
        backoff = Backoff(self.config.retry_min, self.config.retry_max)
        wake = self._wake[query]
        reported_down = False
        while True:
            await wake.wait()
            wake.clear()
            client = self.client
            if client is None:
                return
            if not client.connected:
                # The connection comes back by itself (CONNECTED sets wake). Until then, say
                # once that we have no answer, so the first-answer wait does not hang.
                if not reported_down:
                    try:
                        await asyncio.wait_for(wake.wait(), self.config.timeout)
                        continue
                    except TimeoutError:
                        pass
                    if not client.connected:
                        reported_down = True
                        self.sink.failure(
                            self.name,
                            query,
                            DiscoveryError(f"not connected to ZooKeeper at {self.config.hosts}"),
                        )
                continue
            try:
                instances = await asyncio.to_thread(self._read, client, query)
            except (KazooException, KazooTimeoutError, ValueError) as exc:
                self.sink.failure(self.name, query, DiscoveryError(f"{type(exc).__name__}: {exc}"))
                await asyncio.sleep(backoff.next_delay())
                wake.set()
                continue
            reported_down = False
            backoff.reset()
            self.sink.update(self.name, query, instances)

    def _read(self, client: KazooClient, query: ServiceQuery) -> tuple[DiscoveredInstance, ...]:
        """Runs in a worker thread: the complete set, with watches (re)installed."""
        path = f"{self.base}/{query.service}"
        watch = self._watchers[query]
        try:
            children = client.get_children(path, watch=watch)
        except NoNodeError:
            # No such service (yet): empty, and wake up when the node appears.
            if client.exists(path, watch=watch) is not None:
                return self._read(client, query)
            return ()
        out: list[DiscoveredInstance] = []
        for child in sorted(children):
            try:
                raw, _ = client.get(f"{path}/{child}", watch=watch)
            except NoNodeError:
                continue  # gone between listing and reading; the children watch fires
            try:
                instance = parse_curator_instance(child, raw or b"")
            except ValueError as exc:
                node = f"{path}/{child}"
                if node not in self._bad_nodes:
                    self._bad_nodes.add(node)
                    log.warning("zookeeper %s: skipping %s: %s", self.name, node, exc)
                continue
            if instance is not None:
                out.append(instance)
        return tuple(out)
