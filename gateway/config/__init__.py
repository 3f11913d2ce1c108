"""Config loading: YAML with line numbers -> validated, typed ``GatewayConfig``.

``load_config`` either returns a complete config or raises ``ConfigInvalid`` listing every
problem (file:line: key.path: message), never just the first one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.config.durations import parse_duration, parse_size
from gateway.config.errors import ConfigError, ConfigInvalid, format_errors
from gateway.config.model import (
    Address,
    GatewayConfig,
    InstanceConfig,
    LimitsConfig,
    MatchConfig,
    PathMatch,
    RewriteConfig,
    RouteConfig,
    Timeouts,
    UpstreamConfig,
)
from gateway.config.schema import ROOT
from gateway.config.secrets import Resolver
from gateway.config.validate import INVALID, Context, cross_check, parse_address
from gateway.config.yamlpos import load_yaml

__all__ = [
    "Address",
    "ConfigError",
    "ConfigInvalid",
    "GatewayConfig",
    "InstanceConfig",
    "LimitsConfig",
    "MatchConfig",
    "PathMatch",
    "RewriteConfig",
    "RouteConfig",
    "Timeouts",
    "UpstreamConfig",
    "config_warnings",
    "format_errors",
    "json_schema",
    "load_config",
    "load_config_text",
    "parse_address",
    "parse_duration",
    "parse_size",
    "redact_config",
]


def json_schema() -> dict[str, Any]:
    """The config's JSON Schema (draft 2020-12), generated from ``gateway.config.schema``."""
    # Imported here so that `python -m gateway.config.jsonschema_gen` does not import itself twice.
    from gateway.config.jsonschema_gen import json_schema as generate

    return generate()


def load_config(path: str | os.PathLike[str], *, require_routes: bool = True) -> GatewayConfig:
    """Read, parse and validate a config file; raises ConfigInvalid with every error.

    ``require_routes``: a file without a ``routes`` key (empty, comments only, truncated) is
    an error, as it is for ``gateway run``, ``gateway check`` and every reload."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigInvalid(
            [ConfigError(source, None, "", f"cannot read config: {exc.strerror or exc}")]
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigInvalid(
            [ConfigError(source, line, "", f"not valid UTF-8 (byte {exc.start})")]
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    return _load(text, source, digest, require_routes=require_routes)


def load_config_text(
    text: str,
    source: str = "<string>",
    *,
    require_routes: bool = False,
    references: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Parse and validate config text; ``source`` names it in errors.

    ``references``: values for ``${env:...}``/``${file:...}`` (as in ``GatewayConfig.references``)
    instead of reading the environment and files, so a worker builds what the supervisor built.
    """
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return _load(text, source, digest, require_routes=require_routes, references=references)


EMPTY_CONFIG = (
    "the config file is empty (or only comments): refusing it, an editor may have truncated it;"
    " write `routes: []` for a gateway without routes"
)
NO_ROUTES = (
    "required key is missing: refusing a config without routes (a truncated file?); write"
    " `routes: []` for a gateway without routes"
)


def _load(
    text: str,
    source: str,
    digest: str,
    *,
    require_routes: bool,
    references: Mapping[str, str] | None = None,
) -> GatewayConfig:
    data, positions, yaml_errors = load_yaml(text, source)
    if yaml_errors and data is None:
        raise ConfigInvalid(yaml_errors)  # syntax error: nothing to validate
    if data is None and require_routes:
        raise ConfigInvalid([ConfigError(source, 1, "routes", EMPTY_CONFIG)])
    doc: Any = {} if data is None else data  # an empty string means "all defaults"
    base_dir = Path(source).resolve().parent if source != "<string>" else None
    ctx = Context(source, positions, Resolver(base_dir, known=references))
    ctx.errors.extend(yaml_errors)  # e.g. duplicate keys: keep going to report the rest too
    if require_routes and isinstance(doc, dict) and "routes" not in doc:
        ctx.error(("routes",), NO_ROUTES)
    values = ROOT.check(ctx, (), doc)
    if isinstance(doc, dict):
        cross_check(ctx, doc)
    if ctx.errors or values is INVALID:
        raise ConfigInvalid(ctx.errors)
    return GatewayConfig(
        **values,
        source=source,
        sha256=digest,
        raw=doc,
        references=dict(ctx.resolver.resolved),
        secrets=tuple(ctx.secrets),
        key_lines={str(p[0]): line for p, line in positions.key_lines.items() if len(p) == 1},
    )


def redact_config(config: GatewayConfig) -> Any:
    """The config document as written, for display: secret keys and URL passwords hidden
    (references such as ``${env:NAME}`` are shown as written)."""
    return ROOT.redact(config.raw)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def config_warnings(config: GatewayConfig) -> list[str]:
    """Risky but valid settings, logged at start and printed by ``gateway check``."""
    warnings = []
    if not config.admin_token and not _is_loopback(config.admin.host):
        warnings.append(
            f"admin server on {config.admin} listens beyond loopback without admin.token:"
            " anyone who reaches it can read the config and reload it; set admin.token"
            " (e.g. token: ${env:GATEWAY_ADMIN_TOKEN})"
        )
    return warnings
