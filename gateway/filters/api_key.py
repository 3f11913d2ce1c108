"""``api_key``: requests must carry a known API key, in a header or a query parameter.

Keys are never stored: the config (or ``keys_file``, a YAML/JSON mapping of the same shape)
holds ``consumer: sha256:<hex>``, and a request's key is hashed and looked up, so the lookup
time does not depend on how much of a key matches. No key or an unknown key: 401 with
``WWW-Authenticate``; a known consumer not in ``allow``: 403. The consumer's name goes upstream
in ``forward_header`` and into ``request.vars["consumer"]`` (the access log writes it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import yaml

from gateway.filters.base import Filter, LocalReply, RequestInfo

__all__ = ["ApiKeyFilter", "hash_key", "read_keys_file"]


def hash_key(key: str | bytes) -> str:
    """The ``sha256:<hex>`` form a key is configured as."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def read_keys_file(path: str) -> dict[str, str]:
    """consumer -> sha256:<hex> from a YAML/JSON mapping; ValueError says what is wrong."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of consumer names to sha256:<hex>")
    out: dict[str, str] = {}
    for consumer, digest in data.items():
        text = str(digest).lower() if isinstance(digest, str) else ""
        if (
            not text.startswith("sha256:")
            or len(text) != 71
            or any(c not in "0123456789abcdef" for c in text[7:])
        ):
            raise ValueError(f"{path}: consumer {consumer!r}: expected sha256:<64 hex digits>")
        out[str(consumer)] = text
    return out


def _unauthorized(realm: bytes, description: bytes) -> LocalReply:
    return LocalReply(
        401,
        [
            (b"www-authenticate", b'ApiKey realm="' + realm + b'"'),
            (b"content-type", b"text/plain; charset=utf-8"),
        ],
        description,
    )


class ApiKeyFilter(Filter):
    name = "api_key"

    @classmethod
    def validate_config(cls, options: Mapping[str, Any]) -> list[str]:
        path = options.get("keys_file")
        if path is None:
            return []
        try:
            read_keys_file(path)
        except ValueError as exc:
            return [f"keys_file: {exc}"]
        return []

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        keys: dict[str, str] = dict(options.get("keys") or {})
        if options.get("keys_file"):
            keys.update(read_keys_file(options["keys_file"]))
        # digest bytes -> consumer name
        self.consumers: dict[bytes, str] = {
            bytes.fromhex(digest.split(":", 1)[1]): name for name, digest in keys.items()
        }
        self.header = options.get("header", "x-api-key").encode("ascii")
        query = options.get("query")
        self.query: str | None = query
        allow = options.get("allow")
        self.allow: frozenset[str] | None = frozenset(allow) if allow else None
        self.forward = options.get("forward_header", "x-consumer").encode("ascii")
        self.strip = bool(options.get("strip", True))
        self.realm = options.get("realm", "gateway").encode("latin-1")

    def on_request_headers(self, request: RequestInfo) -> LocalReply | None:
        headers = request.headers
        key: bytes | None = None
        header = self.header
        for name, value in headers:
            if name == header:
                key = value
                break
        if key is None and self.query is not None and request.query:
            for param, param_value in parse_qsl(request.query, keep_blank_values=True):
                if param == self.query:
                    key = param_value.encode("utf-8")
                    break
        if not key:
            return _unauthorized(self.realm, b"an API key is required\n")
        consumer = self.consumers.get(hashlib.sha256(key).digest())
        if consumer is None:
            return _unauthorized(self.realm, b"unknown API key\n")
        if self.allow is not None and consumer not in self.allow:
            return LocalReply(
                403,
                [(b"content-type", b"text/plain; charset=utf-8")],
                b"this API key is not allowed here\n",
            )
        forward = self.forward
        drop = (header, forward) if self.strip else (forward,)
        headers[:] = [item for item in headers if item[0] not in drop]
        headers.append((forward, consumer.encode("utf-8")))
        request.vars["consumer"] = consumer
        return None
