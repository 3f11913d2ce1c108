"""The discovery keys of the config: parsing, defaults and error messages."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from gateway.config import ConfigInvalid, json_schema, load_config_text
from gateway.config.model import Address, DiscoveryConfig


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(text, "gateway.yaml")
    return [str(e) for e in info.value.errors]


def test_discovery_backends_and_upstream_keys() -> None:
    cfg = load_config_text(
        """
admin: {address: 127.0.0.1:9901, token: t0k, registry: c1}
discovery:
  c1: {type: consul, address: "http://127.0.0.1:8500", token: acl, wait: 10s}
  d1: {type: dns, nameservers: ["127.0.0.1:5353", "::1"], min_ttl: 2s}
upstreams:
  u: {discovery: c1, service: users, tags: [v2], datacenter: dc2, passing_only: false}
  v: {discovery: d1, service: "_http._tcp.v.example"}
  w: {discovery: registry, service: w}
"""
    )
    assert cfg.admin == Address("127.0.0.1", 9901)
    assert cfg.admin_token == "t0k" and cfg.admin_registry == "c1"
    c1 = cfg.discovery["c1"]
    assert c1 == DiscoveryConfig(
        name="c1", type="consul", address="http://127.0.0.1:8500", token="acl", wait=10.0
    )
    assert cfg.discovery["d1"].nameservers == ("127.0.0.1:5353", "::1")
    assert (cfg.discovery["d1"].min_ttl, cfg.discovery["d1"].max_ttl) == (2.0, 60.0)
    u = cfg.upstreams["u"]
    assert (u.instances, u.discovery, u.service, u.tags) == ((), "c1", "users", ("v2",))
    assert (u.datacenter, u.passing_only) == ("dc2", False)
    assert cfg.admin_token is not None
    plain = load_config_text("admin: 127.0.0.1:1\n")
    assert plain.admin_token is None and plain.discovery == {}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "upstreams:\n  a: {discovery: nope, service: s}\n",
            "gateway.yaml:2: upstreams.a.discovery: unknown discovery backend 'nope'"
            " (known: registry)",
        ),
        (
            "upstreams:\n  a: {discovery: registry}\n",
            "gateway.yaml:2: upstreams.a.service: required with discovery",
        ),
        (
            "upstreams:\n  a: {discovery: registry, service: s, instances: [h:1]}\n",
            "gateway.yaml:2: upstreams.a.discovery: give either instances or discovery",
        ),
        (
            "upstreams:\n  a: {instances: [h:1], tags: [x]}\n",
            "gateway.yaml:2: upstreams.a.tags: only meaningful with discovery",
        ),
        (
            "discovery:\n  d: {type: consul}\n",
            "gateway.yaml:2: discovery.d.address: required for type consul",
        ),
        (
            "discovery:\n  d: {type: dns, address: 'http://x:1'}\n",
            "gateway.yaml:2: discovery.d.address: not a key of type dns"
            " (it belongs to type consul)",
        ),
        (
            "discovery:\n  d: {type: dns, min_ttl: 5s, max_ttl: 1s}\n",
            "gateway.yaml:2: discovery.d.min_ttl: must not be greater than max_ttl",
        ),
        (
            "discovery:\n  d: {type: nacos}\n",
            "gateway.yaml:2: discovery.d.type: 'nacos' is not one of registry, dns, consul,"
            " kubernetes, etcd, zookeeper, eureka",
        ),
        (
            "discovery:\n  d: {type: dns}\n"
            "upstreams:\n  a: {discovery: d, service: 'x:1', tags: [t]}\n",
            "gateway.yaml:4: upstreams.a.tags: not supported by dns backend 'd'",
        ),
        (
            "admin: {address: 127.0.0.1:1, registry: d}\ndiscovery:\n  d: {type: dns}\n",
            "gateway.yaml:1: admin.registry: backend 'd' is of type dns",
        ),
        (
            # Two registries: which one POST /register fills must be said, on b's line.
            "discovery:\n  a: {type: registry}\n  b: {type: registry}\n",
            "gateway.yaml:3: discovery.b: several backends of type registry (a, b): set"
            " admin.registry",
        ),
        (
            # A declared registry replaces the embedded one: `registry` is no longer a name.
            "discovery:\n  reg: {type: registry}\n"
            "upstreams:\n  a: {discovery: registry, service: s}\n",
            "gateway.yaml:4: upstreams.a.discovery: unknown discovery backend 'registry'"
            " (known: reg)",
        ),
        (
            "state_dir: 7\n",
            "gateway.yaml:1: state_dir:",
        ),
    ],
)
def test_discovery_errors(text: str, expected: str) -> None:
    got = errors_of(text)
    assert any(line.startswith(expected) for line in got), got


def test_several_registries_with_admin_registry_and_state_dir() -> None:
    cfg = load_config_text(
        "admin: {address: 127.0.0.1:1, registry: b}\n"
        "state_dir: /srv/gw-state\n"
        "discovery:\n  a: {type: registry}\n  b: {type: registry, state_file: b.json}\n"
    )
    assert cfg.admin_registry == "b" and cfg.state_dir == "/srv/gw-state"
    assert load_config_text("admin: 127.0.0.1:1\n").state_dir is None


def test_json_schema_agrees_on_discovery_shapes() -> None:
    schema = json_schema()
    good = yaml.safe_load(
        "admin: {address: 127.0.0.1:1, token: x}\n"
        "discovery: {c: {type: consul, address: 'http://127.0.0.1:8500'}}\n"
        "upstreams: {a: {discovery: c, service: s}}\n"
    )
    jsonschema.validate(good, schema)
    for bad in (
        {"upstreams": {"a": {"discovery": "c"}}},  # no service
        {"upstreams": {"a": {"discovery": "c", "service": "s", "instances": ["h:1"]}}},
        {"discovery": {"d": {"type": "nacos"}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
