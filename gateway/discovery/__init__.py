"""Service discovery: backends deliver complete instance sets; the manager turns them into
per-upstream instance lists for the data-plane snapshot. See docs/discovery.md."""

from gateway.discovery.base import (
    Backend,
    Backoff,
    DiscoveredInstance,
    DiscoveryError,
    ServiceQuery,
    Sink,
)
from gateway.discovery.manager import DiscoveryManager, query_of
from gateway.discovery.registry import Registry, add_discovery_routes

__all__ = [
    "Backend",
    "Backoff",
    "DiscoveredInstance",
    "DiscoveryError",
    "DiscoveryManager",
    "Registry",
    "ServiceQuery",
    "Sink",
    "add_discovery_routes",
    "query_of",
]
