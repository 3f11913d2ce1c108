"""A gateway filter shipped as its own package: the tenant is the first label of the Host."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.filters.base import Filter, LocalReply, RequestInfo, set_header


class TenantHeader(Filter):
    """Forwards the tenant in a header, into request.vars["tenant"]; unknown tenants get 403."""

    @classmethod
    def validate_config(cls, options: Mapping[str, Any]) -> list[str]:
        errors = []
        header = options.get("header", "x-tenant")
        if not isinstance(header, str) or not header:
            errors.append("header: expected a header name")
        tenants = options.get("tenants")
        if tenants is not None and not (
            isinstance(tenants, list) and all(isinstance(t, str) for t in tenants)
        ):
            errors.append("tenants: expected a list of tenant names")
        unknown = set(options) - {"header", "tenants"}
        errors += [f"unknown option {key!r}" for key in sorted(unknown)]
        return errors

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__(options)
        self.header = options.get("header", "x-tenant").lower().encode("ascii")
        tenants = options.get("tenants")
        self.tenants = frozenset(tenants) if tenants is not None else None

    def on_request_headers(self, request: RequestInfo) -> LocalReply | None:
        tenant = request.host.split(".", 1)[0].lower()
        if self.tenants is not None and tenant not in self.tenants:
            return LocalReply(403, [(b"content-type", b"text/plain")], b"unknown tenant\n")
        set_header(request.headers, self.header, tenant)
        request.vars["tenant"] = tenant
        return None
