"""etcd discovery (``type: etcd``): keys under a prefix, read through etcd's v3 JSON gateway.

Layout (configurable with ``prefix`` and ``value_format``)::

    {prefix}{service}/{id}  ->  {"address": "10.0.0.5", "port": 8080, "weight": 2,
                                 "tags": ["v2"], "meta": {"zone": "a"}}      (value_format: json)
    {prefix}{service}/{id}  ->  "10.0.0.5:8080"                              (value_format: address)

One loop per query:

1. ``POST /v3/kv/range`` with the key prefix and ``range_end`` = prefix + 1 (the documented way
   to ask for "every key with this prefix"), which also returns the store's ``header.revision``;
2. ``POST /v3/watch`` with ``start_revision`` = that revision + 1, so nothing written between
   the range and the watch is missed; every event batch updates the keys and the complete set
   goes to the sink;
3. a watch cancelled because its revision was compacted (``compact_revision``), a stream that
   ends, or one idle for 5 minutes (a hung server would otherwise go unnoticed) goes back to 1
   (relist). Unreachable server, HTTP errors and garbage are failures:
   reported, retried with jittered backoff, and the next attempt starts with a fresh range.

A key whose value cannot be parsed is skipped and logged (one bad registration does not make the
whole service stale). The v3 gateway encodes keys and values in base64 and 64-bit numbers as
strings; event type PUT is the enum default and therefore omitted from the JSON.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import orjson

from gateway.config.model import DiscoveryConfig
from gateway.discovery.base import (
    Backend,
    Backoff,
    DiscoveredInstance,
    DiscoveryError,
    ServiceQuery,
    Sink,
    WatchTasks,
)
from gateway.discovery.http import client_ssl_context

__all__ = ["EtcdBackend", "parse_value", "prefix_range_end"]

log = logging.getLogger("gateway.discovery.etcd")

# Shortest time between two relists of one query (a watch stream that keeps ending at once
# must not turn into a busy loop).
MIN_RELIST_INTERVAL = 0.1
# A watch that receives nothing for this long is ended and the prefix listed again.
IDLE_RELIST = 300.0


def prefix_range_end(prefix: bytes) -> bytes:
    """The ``range_end`` that selects every key starting with ``prefix`` (etcd's rule: the
    prefix with its last byte that is < 0xff incremented, trailing 0xff bytes dropped)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # the whole keyspace


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _split_address(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise ValueError(f"bad port in {text!r}")
        return host, int(port)
    return text, None


def _valid_port(port: Any) -> int:
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"invalid port {port!r}")
    return port


def parse_value(instance_id: str, raw: bytes, value_format: str) -> DiscoveredInstance:
    """One key's value -> an instance; ``ValueError`` when it does not follow the layout."""
    if value_format == "address":
        host, port = _split_address(raw.decode().strip())
        if not host or port is None:
            raise ValueError("expected host:port")
        return DiscoveredInstance(host, _valid_port(port), id=instance_id)
    data = orjson.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    address = data.get("address")
    if not isinstance(address, str) or not address:
        raise ValueError("missing address")
    host, port = _split_address(address)
    if "port" in data:
        port = _valid_port(data["port"])
    if port is None:
        raise ValueError("missing port")
    weight = data.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ValueError(f"invalid weight {weight!r}")
    tags = data.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("tags must be a list of strings")
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError("meta must be an object")
    healthy = data.get("healthy", True) is not False
    return DiscoveredInstance(
        host,
        _valid_port(port),
        min(weight, 10_000),
        tuple(tags),
        {str(k): str(v) for k, v in meta.items()},
        healthy,
        instance_id,
    )


class _Compacted(Exception):
    """The watch's start revision was compacted away: relist."""


class EtcdBackend(Backend):
    type = "etcd"

    def __init__(self, config: DiscoveryConfig, sink: Sink) -> None:
        super().__init__(config.name, sink)
        self.config = config
        assert config.address is not None
        self.base = config.address.rstrip("/")
        self.prefix = config.prefix or "/services/"
        self._session: aiohttp.ClientSession | None = None
        self._tasks = WatchTasks()
        self._bad_keys: set[str] = set()  # logged once each
        self.relists = 0  # visible to tests: how often a query was listed from scratch

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=client_ssl_context(self.config), limit=0)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def start(self) -> None:
        self._tasks.start("etcd", self.queries, self._run)

    async def stop(self) -> None:
        await self._tasks.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def key_prefix(self, query: ServiceQuery) -> bytes:
        return f"{self.prefix}{query.service}/".encode()

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self, query: ServiceQuery) -> None:
        backoff = Backoff(self.config.retry_min, self.config.retry_max)
        while True:
            started = time.monotonic()
            try:
                values, revision = await self.range(query)
                self.relists += 1
                self._deliver(query, values)
                backoff.reset()
                await self.watch_from(query, values, revision + 1)
            except _Compacted as exc:
                log.info("etcd %s: %s; listing %s again", self.name, exc, query)
            except DiscoveryError as exc:
                self.sink.failure(self.name, query, exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            elapsed = time.monotonic() - started
            if elapsed < MIN_RELIST_INTERVAL:
                await asyncio.sleep(MIN_RELIST_INTERVAL - elapsed)

    def _deliver(self, query: ServiceQuery, values: Mapping[bytes, bytes]) -> None:
        prefix = self.key_prefix(query)
        wanted = set(query.tags)
        instances: list[DiscoveredInstance] = []
        for key, raw in values.items():
            instance_id = key[len(prefix) :].decode(errors="replace")
            if "/" in instance_id:  # a deeper key (another layout level): not an instance
                continue
            try:
                instance = parse_value(instance_id, raw, self.config.value_format)
            except (ValueError, UnicodeDecodeError) as exc:
                name = key.decode(errors="replace")
                if name not in self._bad_keys:
                    self._bad_keys.add(name)
                    log.warning("etcd %s: skipping %s: %s", self.name, name, exc)
                continue
            if wanted.issubset(instance.tags) and instance.healthy:
                instances.append(instance)
        self.sink.update(self.name, query, tuple(instances))

    async def _post(self, path: str, body: dict[str, Any], total: float | None) -> Any:
        url = f"{self.base}{path}"
        timeout = aiohttp.ClientTimeout(total=total, sock_connect=self.config.timeout)
        try:
            async with self.session().post(url, json=body, timeout=timeout) as response:
                raw = await response.read()
                if response.status != 200:
                    text = raw[:200].decode(errors="replace").strip()
                    raise DiscoveryError(f"HTTP {response.status} from {url}: {text}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DiscoveryError(f"{url}: {type(exc).__name__}: {exc}") from None
        try:
            return orjson.loads(raw)
        except ValueError as exc:
            raise DiscoveryError(f"bad answer from {url}: {exc}") from None

    async def range(self, query: ServiceQuery) -> tuple[dict[bytes, bytes], int]:
        """Every key under the query's prefix and the revision the answer reflects."""
        prefix = self.key_prefix(query)
        body = {"key": _b64(prefix), "range_end": _b64(prefix_range_end(prefix))}
        data = await self._post("/v3/kv/range", body, self.config.timeout + 10.0)
        try:
            revision = int(data["header"]["revision"])
            values = {
                base64.b64decode(kv["key"]): base64.b64decode(kv.get("value", ""))
                for kv in data.get("kvs") or ()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise DiscoveryError(f"bad range answer from etcd: {exc!r}") from None
        return values, revision

    async def watch_from(
        self, query: ServiceQuery, values: dict[bytes, bytes], start_revision: int
    ) -> None:
        """Apply watch events to ``values`` until the stream ends (return) or fails (raise)."""
        prefix = self.key_prefix(query)
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_range_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        url = f"{self.base}/v3/watch"
        # An idle watch is normal, but a server that hung would never be noticed: after
        # IDLE_RELIST seconds without a byte the watch ends quietly and the range is redone.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.config.timeout, sock_read=IDLE_RELIST
        )
        try:
            async with self.session().post(url, json=body, timeout=timeout) as response:
                if response.status != 200:
                    text = (await response.read())[:200].decode(errors="replace").strip()
                    raise DiscoveryError(f"HTTP {response.status} from {url}: {text}")
                buffer = b""
                async for chunk in response.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        if line.strip() and self._apply(query, values, line):
                            self._deliver(query, values)
        except aiohttp.ServerTimeoutError:
            return  # idle for IDLE_RELIST: relist (which fails loudly if the server hangs)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DiscoveryError(f"{url}: {type(exc).__name__}: {exc}") from None

    def _apply(self, query: ServiceQuery, values: dict[bytes, bytes], line: bytes) -> bool:
        """One watch message; True when it changed ``values``."""
        try:
            message = orjson.loads(line)
        except ValueError as exc:
            raise DiscoveryError(f"bad watch message from etcd: {exc}") from None
        if not isinstance(message, dict):
            raise DiscoveryError("bad watch message from etcd: not an object")
        if "error" in message:
            error = message["error"]
            text = error.get("message") if isinstance(error, dict) else error
            if "compacted" in str(text):
                raise _Compacted(str(text))
            raise DiscoveryError(f"etcd watch error: {text}")
        result = message.get("result")
        if not isinstance(result, dict):
            raise DiscoveryError("bad watch message from etcd: no result")
        compact = int(result.get("compact_revision") or 0)
        if compact > 0:
            raise _Compacted(f"watch revision compacted (compact_revision {compact})")
        if result.get("canceled"):
            raise DiscoveryError(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
        changed = False
        try:
            for event in result.get("events") or ():
                kv = event["kv"]
                key = base64.b64decode(kv["key"])
                if event.get("type", "PUT") == "DELETE":
                    changed |= values.pop(key, None) is not None
                else:
                    values[key] = base64.b64decode(kv.get("value", ""))
                    changed = True
        except (KeyError, TypeError, ValueError) as exc:
            raise DiscoveryError(f"bad watch event from etcd: {exc!r}") from None
        return changed
