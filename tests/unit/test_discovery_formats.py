"""Instance formats of the etcd, ZooKeeper (Curator) and Eureka backends, and their config."""

from __future__ import annotations

import json

import pytest

from gateway.config import ConfigInvalid, load_config_text
from gateway.discovery.etcd import parse_value, prefix_range_end
from gateway.discovery.eureka import parse_application, parse_delta
from gateway.discovery.zookeeper import parse_curator_instance


def test_prefix_range_end() -> None:
    assert prefix_range_end(b"/services/a/") == b"/services/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff\xff") == b"\0"


def test_etcd_values() -> None:
    value = {"address": "10.0.0.1", "port": 80, "weight": 2, "tags": ["a"], "meta": {"z": 1}}
    instance = parse_value("i1", json.dumps(value).encode(), "json")
    assert (instance.address, instance.weight, instance.tags, dict(instance.meta)) == (
        "10.0.0.1:80",
        2,
        ("a",),
        {"z": "1"},
    )
    assert parse_value("i", b'{"address": "10.0.0.1:81"}', "json").port == 81
    assert parse_value("i", b"[::1]:82", "address").address == "[::1]:82"
    for bad in (b'{"address": "h"}', b'{"address": "h", "port": 0}', b"[1]", b"{"):
        with pytest.raises(ValueError):
            parse_value("i", bad, "json")


def test_curator_instances() -> None:
    base = {"name": "s", "id": "abc", "address": "10.0.0.2", "port": 8080, "sslPort": None}
    instance = parse_curator_instance("node", json.dumps(base).encode())
    assert instance is not None and (instance.address, instance.id) == ("10.0.0.2:8080", "abc")
    tls = parse_curator_instance("n", json.dumps({**base, "port": None, "sslPort": 8443}).encode())
    assert tls is not None and tls.port == 8443 and tls.meta["scheme"] == "https"
    assert parse_curator_instance("n", json.dumps({**base, "enabled": False}).encode()) is None
    payload = {"@class": "x.Payload", "weight": 5, "zone": "b"}
    weighted = parse_curator_instance("n", json.dumps({**base, "payload": payload}).encode())
    assert weighted is not None and weighted.weight == 5 and weighted.meta["zone"] == "b"
    with pytest.raises(ValueError):
        parse_curator_instance("n", json.dumps({**base, "port": None}).encode())


def eureka(status: str, port: object, enabled: str = "true") -> dict[str, object]:
    return {
        "instanceId": f"i-{port}",
        "ipAddr": "10.0.0.3",
        "status": status,
        "port": {"$": port, "@enabled": enabled},
        "securePort": {"$": 443, "@enabled": "false"},
    }


def test_eureka_application() -> None:
    # A single instance comes as an object, not a list (Eureka's JSON converter).
    (single,) = parse_application({"application": {"name": "A", "instance": eureka("UP", 80)}})
    assert single.address == "10.0.0.3:80"
    many = parse_application(
        {
            "application": {
                "name": "A",
                "instance": [
                    eureka("UP", "81"),
                    eureka("DOWN", 82),
                    eureka("OUT_OF_SERVICE", 83),
                    eureka("UP", 84, enabled="false"),  # no enabled port at all
                ],
            }
        }
    )
    assert [i.port for i in many] == [81]
    with pytest.raises(ValueError):
        parse_application({"applications": {}})
    delta = {"applications": {"application": [{"name": "web", "instance": []}]}}
    assert parse_delta(delta) == {"WEB"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("discovery:\n  e: {type: etcd}\n", "discovery.e.address: required for type etcd"),
        ("discovery:\n  z: {type: zookeeper}\n", "discovery.z.hosts: required for type zookeeper"),
        (
            "discovery:\n  e: {type: eureka, address: 'http://h/eureka', hosts: 'h:1'}\n",
            "discovery.e.hosts: not a key of type eureka",
        ),
        (
            "discovery:\n  k: {type: kubernetes, kubeconfig: k, address: 'https://h'}\n",
            "discovery.k.address: give either kubeconfig or address",
        ),
        (
            "discovery:\n  k: {type: kubernetes}\n"
            "upstreams:\n  a: {discovery: k, service: s, tags: [x]}\n",
            "upstreams.a.tags: not supported by kubernetes backend 'k'",
        ),
    ],
)
def test_config_errors(text: str, expected: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(text, "gateway.yaml")
    assert any(expected in str(e) for e in info.value.errors), info.value.errors


def test_config_defaults_per_type() -> None:
    config = load_config_text(
        "discovery:\n"
        "  k: {type: kubernetes}\n"
        "  e: {type: etcd, address: 'http://127.0.0.1:2379'}\n"
        "  z: {type: zookeeper, hosts: '127.0.0.1:2181', prefix: /curator}\n"
        "  u: {type: eureka, address: 'http://127.0.0.1:8761/eureka'}\n"
    )
    k, e, z, u = (config.discovery[n] for n in "kezu")
    assert (k.wait, k.include_terminating, k.port) == (300.0, False, None)
    assert (e.prefix, e.value_format) == ("/services/", "json")
    assert (z.prefix, z.session_timeout) == ("/curator", 10.0)
    assert (u.refresh_interval, u.delta) == (30.0, True)
