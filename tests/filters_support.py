"""Building the api.py objects filters see, without a data plane (tests of gateway.filters)."""

from __future__ import annotations

from typing import Any

from gateway.config import load_config_text
from gateway.filters.api import Headers, LocalReply, RequestInfo, ResponseInfo
from gateway.filters.base import Filter
from gateway.filters.registry import build_filters


def request(
    method: str = "GET",
    path: str = "/",
    *,
    headers: Headers | None = None,
    query: str = "",
    host: str = "api.example",
    client_ip: str = "192.0.2.10",
    route: str = "r",
    request_id: str = "req-1",
) -> RequestInfo:
    return RequestInfo(
        method=method,
        path=path,
        query=query,
        host=host,
        headers=list(headers or []),
        client_ip=client_ip,
        route=route,
        request_id=request_id,
    )


def response(req: RequestInfo, status: int = 200, headers: Headers | None = None) -> ResponseInfo:
    return ResponseInfo(req, status, list(headers or []))


def filter_from_yaml(kind_and_options: str, source: str = "<string>") -> Filter:
    """The filter one `filters:` entry (YAML flow text such as `cors: {...}`) configures,
    validated exactly as a config file's entry is."""
    config = load_config_text(f"filters:\n  - {kind_and_options}\n", source)
    (instance,) = build_filters(config.filters)
    return instance


def header(headers: Headers, name: bytes) -> bytes | None:
    values = [v for n, v in headers if n == name]
    assert len(values) <= 1, (name, values)
    return values[0] if values else None


def reply_of(result: Any) -> LocalReply:
    assert isinstance(result, LocalReply), result
    return result
