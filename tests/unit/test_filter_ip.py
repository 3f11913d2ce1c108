"""The ip_filter: allow/deny CIDRs checked against the client address the data plane resolved
(request.client_ip: behind trusted_proxies, the rightmost untrusted X-Forwarded-For hop)."""

from __future__ import annotations

import pytest

from gateway.proxy.headers import TrustedProxies
from gateway.ratelimit.keys import forwarded_client_ip
from tests.filters_support import filter_from_yaml, reply_of, request


@pytest.mark.parametrize(
    ("options", "client_ip", "admitted"),
    [
        ("{allow: [10.0.0.0/8]}", "10.1.2.3", True),
        ("{allow: [10.0.0.0/8]}", "11.1.2.3", False),
        ("{deny: [10.0.0.0/8]}", "10.1.2.3", False),
        ("{deny: [10.0.0.0/8]}", "192.0.2.1", True),
        ("{allow: [10.0.0.0/8], deny: [10.9.0.0/16]}", "10.9.1.1", False),  # deny first
        ("{allow: [10.0.0.0/8], deny: [10.9.0.0/16]}", "10.8.1.1", True),
        ("{allow: ['2001:db8::/32']}", "2001:db8::1", True),
        ("{allow: ['2001:db8::/32']}", "2001:db9::1", False),
        ("{allow: [10.0.0.0/8]}", "::ffff:10.0.0.1", True),  # v4-mapped on a dual-stack socket
        ("{allow: [192.0.2.7]}", "192.0.2.7", True),  # a single address
        ("{allow: [0.0.0.0/0]}", "not-an-ip", False),
    ],
)
def test_allow_and_deny(options: str, client_ip: str, admitted: bool) -> None:
    item = filter_from_yaml(f"ip_filter: {options}")
    result = item.on_request_headers(request(client_ip=client_ip))
    if admitted:
        assert result is None
    else:
        assert reply_of(result).status == 403


def test_status_is_configurable() -> None:
    item = filter_from_yaml("ip_filter: {deny: [0.0.0.0/0], status: 404}")
    assert reply_of(item.on_request_headers(request())).status == 404


@pytest.mark.parametrize(
    ("peer", "xff", "admitted"),
    [
        ("203.0.113.5", b"10.0.0.1", False),  # untrusted peer: its X-Forwarded-For is not believed
        ("10.255.0.1", b"10.0.0.1", True),  # trusted proxy: the client behind it is checked
        ("10.255.0.1", b"10.0.0.1, 203.0.113.9", False),  # rightmost untrusted hop
    ],
)
def test_client_ip_as_the_data_plane_resolves_it(peer: str, xff: bytes, admitted: bool) -> None:
    trusted = TrustedProxies(["10.255.0.0/16"])
    headers = [(b"x-forwarded-for", xff)]
    client_ip = forwarded_client_ip(peer, headers, trusted) if peer in trusted else peer
    item = filter_from_yaml("ip_filter: {allow: [10.0.0.0/8]}")
    result = item.on_request_headers(request(client_ip=client_ip, headers=headers))
    assert (result is None) == admitted
