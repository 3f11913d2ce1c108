"""Filter classes by config name, and the compilation of config into ``Snapshot.filters``.

Instances: a global filter is one object shared by every route's chain, an upstream's filter
one object shared by the chains of that upstream's routes, a route's filter belongs to that
route. Chains are rebuilt only when the config object changes (a load or reload); snapshots
rebuilt for discovery updates keep the very same chains, so caches (JWKS keys) survive.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from gateway.filters.base import Filter, overridden_hooks
from gateway.filters.chain import Chain

if TYPE_CHECKING:
    from gateway.config.model import FilterConfig, GatewayConfig

__all__ = [
    "FilterLoadError",
    "build_filters",
    "close_filters",
    "compile_filters",
    "load_filter_class",
]

log = logging.getLogger("gateway.filters")


class FilterLoadError(Exception):
    """A filter class could not be imported or is not a Filter."""


def load_filter_class(target: str, path: str | None = None) -> type[Filter]:
    """``package.module:ClassName`` -> the class; ``path``: a directory searched first."""
    module_name, sep, class_name = target.partition(":")
    if not sep or not module_name or not class_name:
        raise FilterLoadError(f"{target!r} is not package.module:ClassName")
    if path is not None and path not in sys.path:
        sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself raising
        raise FilterLoadError(
            f"cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise FilterLoadError(f"module {module_name!r} has no {class_name!r}")
    if not isinstance(cls, type) or not issubclass(cls, Filter):
        raise FilterLoadError(f"{target} is not a subclass of gateway.filters.base.Filter")
    hooks = overridden_hooks(cls)
    async_hooks = sorted(h for h, is_async in hooks.items() if is_async)
    if async_hooks and async_hooks != ["on_request_headers"]:
        raise FilterLoadError(
            f"{target}: only on_request_headers may be async, not {', '.join(async_hooks)}"
        )
    return cls


def build_filters(specs: tuple[FilterConfig, ...]) -> list[Filter]:
    out: list[Filter] = []
    for spec in specs:
        cls = cast(type[Filter], spec.cls)
        instance = cls.from_config(spec.options)
        if spec.kind == "python":
            # Instance attribute: the class's ``name`` stays as its author wrote it.
            instance.name = spec.label
        out.append(instance)
    return out


def compile_filters(
    config: GatewayConfig,
    previous: Mapping[str, Chain] | None = None,
    previous_config: GatewayConfig | None = None,
) -> dict[str, Chain]:
    """One chain per route that has filters (global -> route -> upstream). The chains of
    ``previous`` are kept when ``previous_config`` is this very config object (a discovery
    update); otherwise they are closed and new ones built."""
    if previous is not None and previous_config is config:
        return dict(previous)
    if previous:
        close_filters(previous)
    global_filters = build_filters(config.filters)
    upstream_filters = {
        name: build_filters(upstream.filters)
        for name, upstream in config.upstreams.items()
        if upstream.filters
    }
    chains: dict[str, Chain] = {}
    for route in config.routes:
        filters = [
            *global_filters,
            *build_filters(route.filters),
            *upstream_filters.get(route.upstream, ()),
        ]
        if filters:
            chains[route.name] = Chain(route.name, filters)
    return chains


def close_filters(chains: Mapping[str, Chain]) -> None:
    """Filters of a replaced config: let them stop background work. Requests in flight keep
    their snapshot and may still call hooks; tasks of suspended requests run to the end."""
    seen: set[int] = set()
    for chain in chains.values():
        for item in chain.filters:
            if id(item) not in seen:
                seen.add(id(item))
                try:
                    item.close()
                except Exception:
                    log.exception("filter %s: close failed", item.name)
