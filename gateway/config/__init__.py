"""Config loading: YAML with line numbers -> validated, typed ``GatewayConfig``.

``load_config`` either returns a complete config or raises ``ConfigInvalid`` listing every
problem (file:line: key.path: message), never just the first one.
"""

from __future__ import annotations

import hashlib
import os
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
    "format_errors",
    "json_schema",
    "load_config",
    "load_config_text",
    "parse_address",
    "parse_duration",
    "parse_size",
]


def json_schema() -> dict[str, Any]:
    """The config's JSON Schema (draft 2020-12), generated from ``gateway.config.schema``."""
    # Imported here so that `python -m gateway.config.jsonschema_gen` does not import itself twice.
    from gateway.config.jsonschema_gen import json_schema as generate

    return generate()


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read, parse and validate a config file; raises ConfigInvalid with every error."""
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
    return _load(text, source, hashlib.sha256(data).hexdigest())


def load_config_text(text: str, source: str = "<string>") -> GatewayConfig:
    """Parse and validate config text; ``source`` names it in errors."""
    return _load(text, source, hashlib.sha256(text.encode("utf-8")).hexdigest())


def _load(text: str, source: str, digest: str) -> GatewayConfig:
    data, positions, yaml_errors = load_yaml(text, source)
    if yaml_errors and data is None:
        raise ConfigInvalid(yaml_errors)  # syntax error: nothing to validate
    doc: Any = {} if data is None else data  # an empty file means "all defaults"
    ctx = Context(source, positions)
    ctx.errors.extend(yaml_errors)  # e.g. duplicate keys: keep going to report the rest too
    values = ROOT.check(ctx, (), doc)
    if isinstance(doc, dict):
        cross_check(ctx, doc)
    if ctx.errors or values is INVALID:
        raise ConfigInvalid(ctx.errors)
    return GatewayConfig(**values, source=source, sha256=digest, raw=doc)
