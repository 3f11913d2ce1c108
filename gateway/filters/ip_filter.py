"""``ip_filter``: admit or refuse clients by address.

The address checked is ``request.client_ip``, which the data plane resolves the way the rest of
the gateway does (rate-limit keys, X-Forwarded-For): the peer's address, or when the peer is in
``trusted_proxies`` the rightmost untrusted hop of X-Forwarded-For. A client behind an
untrusted peer cannot choose the address checked by sending X-Forwarded-For.

``deny`` is checked first; then, when ``allow`` is given, only its networks are admitted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from gateway.filters.base import Filter, LocalReply, RequestInfo

__all__ = ["IpFilter"]

_CACHE_SIZE = 4096  # decisions remembered per filter (client addresses are attacker-chosen)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(cidrs: Any) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs or ())


def _contains(
    networks: tuple[Network, ...], address: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        mapped = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1 (dual-stack listeners)
        if any(mapped in n for n in networks if n.version == 4):
            return True
    return any(address in n for n in networks if n.version == address.version)


class IpFilter(Filter):
    name = "ip_filter"

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.allow = _networks(options.get("allow"))
        self.deny = _networks(options.get("deny"))
        self.status = int(options.get("status", 403))
        self._decisions: dict[str, bool] = {}

    def admits(self, ip: str) -> bool:
        known = self._decisions.get(ip)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            admitted = False  # not an address: never admitted
        else:
            admitted = not _contains(self.deny, address) and (
                not self.allow or _contains(self.allow, address)
            )
        if len(self._decisions) < _CACHE_SIZE:
            self._decisions[ip] = admitted
        return admitted

    def on_request_headers(self, request: RequestInfo) -> LocalReply | None:
        if self.admits(request.client_ip):
            return None
        return LocalReply(
            self.status,
            [(b"content-type", b"text/plain; charset=utf-8")],
            b"your address is not allowed here\n",
        )
