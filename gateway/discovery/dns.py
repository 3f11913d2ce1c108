"""DNS discovery (``type: dns``, aiodns): A/AAAA for ``host:port``, SRV for ``_svc._proto.name``.

- ``host:port``: the A and AAAA records of ``host``, each with ``port`` (weight 1).
- SRV (RFC 2782): only the lowest-priority group whose targets resolve is used ("a client MUST
  attempt to contact the target host with the lowest-numbered priority it can reach"); the SRV
  weight becomes the instance weight (0 counts as 1, so such targets still get a little traffic).
  Target addresses come from the additional section when the server sent them, else from
  A/AAAA queries. A target of "." means "service not available here" and is skipped.

Each query is re-resolved when its answer's smallest TTL lapses, bounded by ``min_ttl`` and
``max_ttl``. NXDOMAIN/NODATA are answers (an empty set); timeouts, refusals and server failures are
backend errors and are retried with jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

import aiodns
import aiodns.error

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

__all__ = ["DnsBackend", "parse_target", "pick_srv_group"]

log = logging.getLogger("gateway.discovery.dns")

# c-ares status codes that mean "the name or the record type does not exist": an answer.
_EMPTY_CODES = frozenset({aiodns.error.ARES_ENOTFOUND, aiodns.error.ARES_ENODATA})
_A, _AAAA = 1, 28


def parse_target(service: str) -> tuple[str, int] | None:
    """'host:port' or '[v6]:port' -> (host, port); None for SRV names (leading '_')."""
    if service.startswith("_"):
        return None
    if service.startswith("["):
        host, _, rest = service[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = service.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"dns service {service!r}: expected host:port or an SRV name (_svc._tcp.…)"
        )
    return host, int(port)


def pick_srv_group(records: list[tuple[int, int, int, str]]) -> list[list[tuple[int, int, str]]]:
    """SRV (priority, weight, port, target) -> groups of (weight, port, target), lowest first."""
    groups: dict[int, list[tuple[int, int, str]]] = {}
    for priority, weight, port, target in records:
        if target in ("", "."):
            continue
        groups.setdefault(priority, []).append((weight, port, target.rstrip(".")))
    return [groups[p] for p in sorted(groups)]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class DnsBackend(Backend):
    type = "dns"

    def __init__(self, config: DiscoveryConfig, sink: Sink) -> None:
        super().__init__(config.name, sink)
        self.config = config
        self._resolver: aiodns.DNSResolver | None = None
        self._tasks = WatchTasks()

    async def start(self) -> None:
        kwargs: dict[str, Any] = {"timeout": self.config.timeout, "tries": 1}
        servers = list(self.config.nameservers) or None
        # No search domains and no /etc/hosts: discovery answers come from DNS servers only.
        self._resolver = aiodns.DNSResolver(nameservers=servers, **kwargs)
        self._tasks.start("dns", self.queries, self._watch)

    async def stop(self) -> None:
        await self._tasks.cancel()
        if self._resolver is not None:
            with contextlib.suppress(Exception):
                await self._resolver.close()
            self._resolver = None

    async def _watch(self, query: ServiceQuery) -> None:
        backoff = Backoff(self.config.retry_min, self.config.retry_max)
        while True:
            try:
                instances, ttl = await self.resolve(query.service)
            except DiscoveryError as exc:
                self.sink.failure(self.name, query, exc)
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            self.sink.update(self.name, query, instances)
            delay = self.config.max_ttl if ttl is None else ttl
            await asyncio.sleep(min(max(delay, self.config.min_ttl), self.config.max_ttl))

    async def _records(self, name: str, qtype: str) -> tuple[list[Any], list[Any]]:
        """(answer, additional) records; NXDOMAIN/NODATA -> empty; other errors raise."""
        assert self._resolver is not None
        try:
            result = await self._resolver.query_dns(name, qtype)
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            if code in _EMPTY_CODES:
                return [], []
            message = exc.args[1] if len(exc.args) > 1 else str(exc)
            raise DiscoveryError(f"{qtype} {name}: {message}") from None
        return list(result.answer), list(result.additional)

    async def _addresses(self, host: str) -> tuple[list[str], int | None]:
        if _is_ip(host):
            return [host], None
        (a, _), (aaaa, _) = await asyncio.gather(
            self._records(host, "A"), self._records(host, "AAAA")
        )
        records = [r for r in (*a, *aaaa) if r.type in (_A, _AAAA)]
        ttl = min((r.ttl for r in records), default=None)
        return [r.data.addr for r in records], ttl

    async def resolve(self, service: str) -> tuple[tuple[DiscoveredInstance, ...], int | None]:
        """The instances of ``service`` and the smallest TTL seen (None: nothing cached)."""
        try:
            target = parse_target(service)
        except ValueError as exc:
            raise DiscoveryError(str(exc)) from None
        if target is not None:
            host, port = target
            host_addresses, host_ttl = await self._addresses(host)
            return tuple(DiscoveredInstance(a, port) for a in host_addresses), host_ttl
        answer, additional = await self._records(service, "SRV")
        srv = [r for r in answer if hasattr(r.data, "priority")]
        ttls = [r.ttl for r in srv]
        known: dict[str, list[str]] = {}
        for record in additional:
            if record.type in (_A, _AAAA):
                known.setdefault(record.name.rstrip(".").lower(), []).append(record.data.addr)
                ttls.append(record.ttl)
        records = [(r.data.priority, r.data.weight, r.data.port, r.data.target) for r in srv]
        for group in pick_srv_group(records):
            instances: list[DiscoveredInstance] = []
            for weight, port, name in group:
                addresses = known.get(name.lower())
                if addresses is None:
                    addresses, ttl = await self._addresses(name)
                    if ttl is not None:
                        ttls.append(ttl)
                for address in addresses:
                    instances.append(DiscoveredInstance(address, port, max(1, weight)))
            if instances:  # else: this priority group is unreachable, fall to the next
                return tuple(instances), min(ttls, default=None)
        return (), min(ttls, default=None)
