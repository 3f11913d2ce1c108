"""Ring hash, maglev and hash-key extraction: stickiness, spread, minimal key movement."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.balancing import Maglev, RingHash, compile_hash_key, hash_key_bytes, hash_key_from
from gateway.balancing.maglev import build_table, is_prime, table_size_for


@dataclass(eq=False)
class Inst:
    address: str
    weight: int = 1
    available: bool = True
    active_requests: int = 0


def fleet(count: int) -> list[Inst]:
    return [Inst(f"10.1.{i // 250}.{i % 250}:8080") for i in range(count)]


KEYS = [b"user-%d" % number for number in range(20_000)]

HASHERS = [
    pytest.param(lambda instances: RingHash(instances, rng=random.Random(1)), id="ring_hash"),
    pytest.param(lambda instances: Maglev(instances, rng=random.Random(1)), id="maglev"),
]


def mapping(balancer: object, keys: list[bytes]) -> dict[bytes, str]:
    return {key: balancer.pick(key).address for key in keys}  # type: ignore[attr-defined]


@pytest.mark.parametrize("make", HASHERS)
def test_same_key_same_instance_across_balancers(make) -> None:  # type: ignore[no-untyped-def]
    first = mapping(make(fleet(5)), KEYS[:2000])
    second = mapping(make(fleet(5)), KEYS[:2000])  # another worker, same set
    assert first == second


@pytest.mark.parametrize("make", HASHERS)
@pytest.mark.parametrize("count", [3, 5, 10])
def test_removing_one_of_n_moves_about_one_nth(make, count: int) -> None:  # type: ignore[no-untyped-def]
    instances = fleet(count)
    before = mapping(make(instances), KEYS)
    gone = instances[count // 2]
    after = mapping(make([i for i in instances if i is not gone]), KEYS)
    moved = sum(1 for key in KEYS if before[key] != after[key])
    owned = sum(1 for key in KEYS if before[key] == gone.address)
    # Every key of the removed instance must move; almost nothing else may.
    assert all(after[key] != gone.address for key in KEYS)
    assert moved >= owned
    assert moved / len(KEYS) == pytest.approx(1 / count, abs=0.35 / count)
    assert moved - owned <= 0.02 * len(KEYS)


@pytest.mark.parametrize("make", HASHERS)
def test_marking_unavailable_moves_only_its_keys_and_back(make) -> None:  # type: ignore[no-untyped-def]
    instances = fleet(4)
    balancer = make(instances)
    before = mapping(balancer, KEYS[:5000])
    instances[1].available = False
    balancer.refresh(1.0)
    during = mapping(balancer, KEYS[:5000])
    for key in KEYS[:5000]:
        if before[key] != instances[1].address:
            assert during[key] == before[key] or isinstance(balancer, Maglev)
        assert during[key] != instances[1].address
    instances[1].available = True
    balancer.refresh(2.0)
    assert mapping(balancer, KEYS[:5000]) == before


@pytest.mark.parametrize("make", HASHERS)
def test_spread_is_even(make) -> None:  # type: ignore[no-untyped-def]
    instances = fleet(8)
    got = Counter(mapping(make(instances), KEYS).values())
    for instance in instances:
        assert got[instance.address] / len(KEYS) == pytest.approx(1 / 8, rel=0.25)


@pytest.mark.parametrize("make", HASHERS)
def test_weights_scale_the_share(make) -> None:  # type: ignore[no-untyped-def]
    instances = fleet(3)
    instances[0].weight = 3
    got = Counter(mapping(make(instances), KEYS).values())
    assert got[instances[0].address] / len(KEYS) == pytest.approx(0.6, abs=0.06)


@pytest.mark.parametrize("make", HASHERS)
def test_no_key_spreads_randomly(make) -> None:  # type: ignore[no-untyped-def]
    instances = fleet(3)
    balancer = make(instances)
    assert len({balancer.pick(None).address for _ in range(100)}) == 3


@pytest.mark.parametrize("make", HASHERS)
def test_exclude_gives_a_stable_second_choice(make) -> None:  # type: ignore[no-untyped-def]
    instances = fleet(5)
    balancer = make(instances)
    for key in KEYS[:500]:
        first = balancer.pick(key)
        second = balancer.pick(key, exclude=(first,))
        assert second is not first
        assert balancer.pick(key, exclude=(first,)) is second


def test_maglev_table_properties() -> None:
    assert is_prime(65537) and not is_prime(65535)
    assert table_size_for(3) == 65537
    size = table_size_for(1000)
    assert size >= 100_000 and is_prime(size)
    table = build_table(["a:1", "b:1", "c:1"], [1.0, 1.0, 1.0], 307)
    shares = Counter(table)
    assert len(table) == 307 and set(shares) == {0, 1, 2}
    assert max(shares.values()) - min(shares.values()) <= 1


# -- hash keys ----------------------------------------------------------------------------------
HEADERS = [(b"host", b"api"), (b"x-user-id", b"42"), (b"x-multi", b"a"), (b"x-multi", b"b")]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("header:X-User-Id", b"42"),
        ("header:x-multi", b"a, b"),
        ("header:x-missing", None),
        ("cookie:session", b"abc"),
        ("cookie:quoted", b"q v"),
        ("cookie:nope", None),
        ("client_ip", b"192.0.2.7"),
        ("path", b"/users/42"),
        ("query:id", b"7 8"),
        ("query:tag", b"a/b"),
        ("query:empty", b""),
        ("query:nope", None),
    ],
)
def test_hash_key_from(spec: str, expected: bytes | None) -> None:
    assert (
        hash_key_from(
            spec,
            headers=HEADERS,
            cookies_header=b'theme=dark; session=abc;quoted="q v"',
            client_ip="192.0.2.7",
            path=b"/users/42",
            query=b"id=7+8&tag=a%2Fb&empty=&id=9",
        )
        == expected
    )


def test_hash_key_missing_parts_and_bad_specs() -> None:
    assert hash_key_from("cookie:session") is None
    assert hash_key_from("client_ip") is None
    assert hash_key_from("path") is None
    assert hash_key_from("query:id") is None
    for bad in ("header:", "cookie:", "query:", "client_ip:x", "body", ""):
        with pytest.raises(ValueError):
            compile_hash_key(bad)


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=64))
def test_key_hash_is_32_bit_and_deterministic(key: bytes) -> None:
    value = hash_key_bytes(key)
    assert 0 <= value < 2**32
    assert value == hash_key_bytes(bytes(key))


def test_key_hash_spreads_sequential_keys() -> None:
    buckets = Counter(hash_key_bytes(b"user-%d" % n) >> 28 for n in range(16_000))
    assert len(buckets) == 16 and min(buckets.values()) > 800
