"""Key extraction, RouteLimiter decisions, and header format against the draft's examples."""

from __future__ import annotations

import re

import orjson
import pytest

from gateway.proxy.headers import TrustedProxies
from gateway.ratelimit import ALLOW, Decision, LimitSpec, RouteLimiter, compile_key, parse_rate
from gateway.ratelimit import headers as rlh

TRUSTED = TrustedProxies(["10.0.0.0/8", "192.168.1.1/32"])
NO_HEADERS: list[tuple[bytes, bytes]] = []


# -- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "trusted", "xff", "expected"),
    [
        ("203.0.113.9", False, [b"198.51.100.1"], "203.0.113.9"),  # untrusted peer: XFF ignored
        ("10.0.0.2", True, [], "10.0.0.2"),  # trusted peer without XFF
        ("10.0.0.2", True, [b"198.51.100.1"], "198.51.100.1"),
        # The client wrote the leftmost entry itself: the rightmost untrusted one counts.
        ("10.0.0.2", True, [b"6.6.6.6, 198.51.100.1, 10.1.1.1"], "198.51.100.1"),
        ("10.0.0.2", True, [b"6.6.6.6", b"198.51.100.1 , 192.168.1.1"], "198.51.100.1"),
        ("10.0.0.2", True, [b"10.9.9.9, 10.1.1.1"], "10.9.9.9"),  # all trusted: leftmost
        ("10.0.0.2", True, [b"[2001:db8::1]:4711"], "2001:db8::1"),
        ("10.0.0.2", True, [b"198.51.100.7:8080"], "198.51.100.7"),
        ("10.0.0.2", True, [b" , "], "10.0.0.2"),
    ],
)
def test_client_ip_honours_trusted_proxies(
    peer: str, trusted: bool, xff: list[bytes], expected: str
) -> None:
    extract = compile_key("client_ip", TRUSTED)
    headers = [(b"x-forwarded-for", value) for value in xff]
    assert extract(peer, trusted, headers, b"") == expected


def test_header_query_route_and_combined_keys() -> None:
    headers = [(b"x-api-key", b"k1"), (b"x-empty", b"")]
    assert compile_key("header:X-Api-Key")("ip", False, headers, b"") == b"k1"
    assert compile_key("header:x-empty")("ip", False, headers, b"") is None
    assert compile_key("header:x-none")("ip", False, headers, b"") is None
    assert compile_key("query:token")("ip", False, [], b"a=1&token=t9&b") == b"t9"
    assert compile_key("query:token")("ip", False, [], b"mytoken=x") is None
    assert compile_key("route")("ip", False, [], b"") == b""
    combined = compile_key(["header:x-api-key", "client_ip"])
    assert combined("192.0.2.1", False, headers, b"") == b"k1\x00192.0.2.1"
    assert compile_key(["header:x-none", "route"])("ip", False, headers, b"") is None
    long_value = compile_key("header:x-api-key")("ip", False, [(b"x-api-key", b"v" * 5000)], b"")
    assert long_value is not None and len(long_value) == 17  # digested


@pytest.mark.parametrize("spec", ["ip", "header:", "cookie:x", ""])
def test_invalid_key_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        compile_key(spec)


def test_parse_rate() -> None:
    assert parse_rate("100/s") == (100, 1.0)
    assert parse_rate("5/min") == (5, 60.0)
    assert parse_rate("1000/h") == (1000, 3600.0)
    assert parse_rate("7/10s") == (7, 10.0)
    for bad in ("0/s", "10/fortnight", "ten/s", "10"):
        with pytest.raises(ValueError):
            parse_rate(bad)


# -- decisions -------------------------------------------------------------------------------


def ask(limiter: RouteLimiter, now: float, ip: str = "192.0.2.1", **kw: object) -> Decision:
    headers = kw.get("headers", NO_HEADERS)
    return limiter.check_local(now, ip, False, headers, b"")  # type: ignore[arg-type]


def test_allowed_without_headers_is_the_shared_constant() -> None:
    limiter = RouteLimiter("r", [LimitSpec(10, 1.0, 2)])
    assert ask(limiter, 0.0) is ALLOW
    assert ask(limiter, 0.0) is ALLOW
    denied = ask(limiter, 0.0)
    assert not denied.allowed and denied.status == 429 and denied.reason == "rate_limited"
    assert denied.retry_after == 1
    assert b"retry-after: 1\r\n" in denied.headers
    assert limiter.stats()["allowed"] == 2 and limiter.stats()["limited"] == 1


def test_keys_are_isolated_per_client_and_per_route() -> None:
    spec = LimitSpec(1, 60.0, 1, key="header:x-api-key")
    one, two = RouteLimiter("one", [spec]), RouteLimiter("two", [spec])
    key_a, key_b = [(b"x-api-key", b"a")], [(b"x-api-key", b"b")]
    assert ask(one, 0.0, headers=key_a).allowed
    assert ask(one, 0.0, headers=key_b).allowed
    assert ask(two, 0.0, headers=key_a).allowed
    assert not ask(one, 0.0, headers=key_a).allowed


def test_missing_key_shared_or_rejected() -> None:
    shared = RouteLimiter("r", [LimitSpec(1, 60.0, 1, key="header:x-api-key")])
    assert ask(shared, 0.0).allowed
    assert not ask(shared, 0.0, ip="198.51.100.2").allowed  # one bucket for all key-less
    assert ask(shared, 0.0, headers=[(b"x-api-key", b"k")]).allowed
    reject = RouteLimiter("r", [LimitSpec(100, 1.0, key="header:x-api-key", missing="reject")])
    decision = ask(reject, 0.0)
    assert (decision.allowed, decision.status, decision.reason) == (False, 400, "missing_key")


def test_all_limits_must_pass_and_refusal_consumes_nothing() -> None:
    per_second = LimitSpec(10, 1.0, 10, name="second")
    per_minute = LimitSpec(3, 60.0, 3, name="minute")
    limiter = RouteLimiter("r", [per_second, per_minute], headers=True)
    assert [ask(limiter, 0.0).allowed for _ in range(5)] == [True, True, True, False, False]
    refused = ask(limiter, 0.0)
    assert refused.limit == "minute" and refused.retry_after == 20
    # The refusals by "minute" gave back what "second" had taken: 7 of 10 left, not 4.
    only_second = limiter.limits[0]
    x = only_second.local.take("192.0.2.1", 0.0, only_second.interval, only_second.span_cmp)
    assert only_second.remaining(x) == 6


def test_dry_run_counts_but_admits() -> None:
    limiter = RouteLimiter("r", [LimitSpec(1, 1.0, 1, dry_run=True)])
    assert ask(limiter, 0.0) is ALLOW
    would_be = ask(limiter, 0.0)
    assert would_be.allowed and would_be.dry_run and would_be.limit == "limit0"
    assert limiter.stats()["dry_run"] == 1 and limiter.stats()["limited"] == 0


def test_max_in_flight() -> None:
    limiter = RouteLimiter("r", [], max_in_flight=2)
    first, second = ask(limiter, 0.0), ask(limiter, 0.0)
    assert first.allowed and first.holds_slot and second.allowed
    third = ask(limiter, 0.0)
    assert (third.allowed, third.status, third.retry_after) == (False, 503, 1)
    assert b"retry-after: 1\r\n" in third.headers
    limiter.release()
    assert ask(limiter, 0.0).allowed
    # A request refused by a rate limit gives its slot back.
    both = RouteLimiter("r", [LimitSpec(1, 60.0, 1)], max_in_flight=5)
    assert ask(both, 0.0).allowed and not ask(both, 0.0).allowed
    assert both.in_flight == 1


def test_reload_keeps_buckets_of_unchanged_limits() -> None:
    old = RouteLimiter("r", [LimitSpec(1, 60.0, 1)])
    assert ask(old, 0.0).allowed
    new = RouteLimiter("r", [LimitSpec(1, 60.0, 1)], previous=old)
    assert not ask(new, 1.0).allowed
    changed = RouteLimiter("r", [LimitSpec(2, 60.0, 2)], previous=old)
    assert ask(changed, 1.0).allowed


def test_redis_limit_requires_a_store() -> None:
    with pytest.raises(ValueError):
        RouteLimiter("r", [LimitSpec(1, 1.0, store="redis")])


# -- header format (draft-ietf-httpapi-ratelimit-headers-11) -----------------------------------

SF_ITEM = r'"[\x20-\x21\x23-\x5b\x5d-\x7e]*";[a-z]+=\d+(;[a-z]+=\d+)*'


def test_header_lines_reproduce_the_drafts_examples() -> None:
    # §3.2: RateLimit-Policy: "default";q=100;w=10
    assert rlh.policy_line([rlh.policy_item("default", 100, 10)]) == (
        b'ratelimit-policy: "default";q=100;w=10\r\n'
    )
    # §3.2: RateLimit-Policy: "permin";q=50;w=60,"perhr";q=1000;w=3600 (SF lists allow OWS)
    two = rlh.policy_line([rlh.policy_item("permin", 50, 60), rlh.policy_item("perhr", 1000, 3600)])
    assert (
        two.replace(b", ", b",")
        == b'ratelimit-policy: "permin";q=50;w=60,"perhr";q=1000;w=3600\r\n'
    )
    # §4.2: RateLimit: "default";r=50;t=30
    assert rlh.ratelimit_line([(rlh.sf_string("default"), 50, 30)]) == (
        b'ratelimit: "default";r=50;t=30\r\n'
    )
    assert rlh.sf_string('a"b\\') == b'"a\\"b\\\\"'
    with pytest.raises(ValueError):
        rlh.sf_string("caf\u00e9")
    with pytest.raises(ValueError):
        rlh.policy_item("x", 1, 0)


def test_limiter_headers_are_well_formed() -> None:
    limiter = RouteLimiter(
        "r", [LimitSpec(100, 1.0, 50, name="default")], headers=True, legacy_headers=True
    )
    admitted = ask(limiter, 0.0)
    lines = admitted.headers.split(b"\r\n")
    assert lines[0] == b'ratelimit-policy: "default";q=100;w=1'
    assert lines[1] == b'ratelimit: "default";r=49;t=1'
    assert b"x-ratelimit-limit: 100" in lines and b"x-ratelimit-remaining: 49" in lines
    for line in lines[:2]:
        value = line.split(b": ", 1)[1].decode()
        assert re.fullmatch(SF_ITEM, value), value
    for _ in range(49):
        ask(limiter, 0.0)
    refused = ask(limiter, 0.0)
    assert refused.status == 429
    fields = dict(line.split(b": ", 1) for line in refused.headers.split(b"\r\n") if line)
    retry_after = int(fields[b"retry-after"])
    assert retry_after >= 1
    # §6: Retry-After is not earlier than the end of the effective window.
    t = int(re.search(rb";t=(\d+)", fields[b"ratelimit"]).group(1))  # type: ignore[union-attr]
    assert t <= retry_after
    assert fields[b"x-ratelimit-remaining"] == b"0"


def test_error_body() -> None:
    body = orjson.loads(rlh.error_body(429, "rate_limited", "slow down", b"rid-1"))
    assert body == {
        "error": "rate_limited",
        "message": "slow down",
        "status": 429,
        "request_id": "rid-1",
    }
