"""Pure request-validation rules of gateway/proxy/headers.py and their config keys."""

from __future__ import annotations

import pytest

from gateway.config import load_config_text
from gateway.proxy import headers as hdr
from tests.unit.test_config import errors_of

# RFC 9110 §7.2 / RFC 3986 §3.2.2-3.2.3: uri-host [":" port].
AUTHORITIES: list[tuple[bytes, bool]] = [
    (b"example.com", True),
    (b"example.com:443", True),
    (b"example.com:", True),  # port = *DIGIT
    (b"example.com:0065535", True),  # leading zeros: still 65535
    (b"192.0.2.1", True),
    (b"999.999.999.999", True),  # not an IPv4address, but a valid reg-name
    (b"[::1]", True),
    (b"[2001:db8::7]:8443", True),
    (b"[::ffff:192.0.2.128]", True),
    (b"[v7.abc:def]", True),  # IPvFuture
    (b"a_b-c~d.e", True),
    (b"%e4%b8%ad.example", True),
    (b"a!$&'()*+;=", True),
    (b"", False),
    (b"a,b", False),  # comma: a list separator downstream (deliberately stricter)
    (b"a b", False),
    (b"u@a", False),
    (b"a/b", False),
    (b"a:99999x", False),
    (b"a:65536", False),
    (b"a:1:2", False),
    (b"::1", False),
    (b"[::1", False),
    (b"[::g]", False),
    (b"[1:2:3:4:5:6:7:8:9]", False),
    (b"[fe80::1%25eth0]", False),  # zone ids (RFC 6874) are not accepted
    (b"a%2", False),
    (b"a\x00b", False),
    (b"a\tb", False),
]


@pytest.mark.parametrize(
    ("value", "valid"), AUTHORITIES, ids=[a.decode("latin-1") for a, _ in AUTHORITIES]
)
def test_valid_authority(value: bytes, valid: bool) -> None:
    assert hdr.valid_authority(value) is valid
    assert hdr.valid_authority(value) is valid  # the cached answer agrees


def test_authority_cache_is_bounded() -> None:
    for index in range(5000):
        assert hdr.valid_authority(b"h%d.example" % index)
    assert len(hdr.VALID_AUTHORITY_CACHE) <= 4096


@pytest.mark.parametrize(
    ("name", "lookalike"),
    [
        (b"transfer_encoding", True),
        (b"content_length", True),
        (b"keep_alive", True),
        (b"proxy_connection", True),
        (b"x_forwarded_for", True),
        (b"x_request_id", True),
        (b"x_custom", False),
        (b"user_agent", False),
    ],
)
def test_underscore_lookalike(name: bytes, lookalike: bool) -> None:
    assert hdr.underscore_lookalike(name) is lookalike


@pytest.mark.parametrize(
    ("name", "forbidden"),
    [
        (b"content-length", True),
        (b"host", True),
        (b"authorization", True),
        (b"if-none-match", True),
        (b"content_type", True),  # an underscore spelling counts as the field
        (b"x-checksum", False),
        (b"server-timing", False),
    ],
)
def test_forbidden_trailer(name: bytes, forbidden: bool) -> None:
    assert hdr.forbidden_trailer(name) is forbidden


def test_limits_defaults() -> None:
    limits = load_config_text("").limits
    assert limits.headers_with_underscores == "drop"
    assert (limits.max_chunk_line_bytes, limits.max_chunk_extensions_bytes) == (4096, 65536)
    assert limits.allowed_methods is None


def test_allowed_methods_accepts_any_token_upper_cased() -> None:
    limits = load_config_text("limits: {allowed_methods: [get, Foo, M-SEARCH]}").limits
    assert limits.allowed_methods == ("GET", "FOO", "M-SEARCH")


def test_route_methods_accept_extension_tokens() -> None:
    config = load_config_text(
        "upstreams: {u: {instances: ['127.0.0.1:9']}}\n"
        "routes: [{name: r, match: {methods: [FOO, x-bar]}, upstream: u}]\n"
    )
    assert config.routes[0].match.methods == ("FOO", "X-BAR")


def test_limit_errors_name_file_line_and_key() -> None:
    text = """\
    limits:
      headers_with_underscores: sometimes
      allowed_methods: [GET, "B@D"]
      max_chunk_line_bytes: 2
      max_chunk_extensions_bytes: lots
    """
    assert errors_of(text) == [
        "gateway.yaml:2: limits.headers_with_underscores: 'sometimes' is not one of allow,"
        " drop, reject",
        "gateway.yaml:3: limits.allowed_methods[1]: 'B@D' is not an HTTP method (a token,"
        " RFC 9110 §9.1)",
        "gateway.yaml:4: limits.max_chunk_line_bytes: must be at least 16 bytes, got 2",
        "gateway.yaml:5: limits.max_chunk_extensions_bytes: invalid size 'lots': expected a"
        " byte count or a number followed by B, KB, MB, GB, TB, KiB, MiB, GiB or TiB (e.g. 512,"
        " '64KiB', '10MB')",
    ]
