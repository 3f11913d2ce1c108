"""The JSON Schema and the validator come from one source and must agree."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.config import ConfigInvalid, json_schema, load_config, load_config_text
from gateway.config.jsonschema_gen import render

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "config"
SHIPPED = [CONFIG_DIR / "gateway.yaml", *sorted((CONFIG_DIR / "examples").glob("*.yaml"))]

_VALIDATOR = jsonschema.Draft202012Validator(json_schema())


def schema_errors(doc: Any) -> list[str]:
    return [e.message for e in _VALIDATOR.iter_errors(doc)]


def test_schema_is_valid_draft_2020_12() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_committed_schema_is_up_to_date() -> None:
    committed = (CONFIG_DIR / "schema.json").read_text()
    assert committed == render(), (
        "config/schema.json is stale: python -m gateway.config.jsonschema_gen > config/schema.json"
    )
    assert json.loads(committed) == json_schema()


def _objects(node: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if node.get("type") == "object":
            found.append(node)
        for value in node.values():
            found.extend(_objects(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_objects(value))
    return found


def test_every_object_is_closed_and_every_key_documented() -> None:
    objects = _objects(json_schema())
    assert objects
    for obj in objects:
        # Fixed-key objects forbid extras; maps constrain their values with a schema instead.
        assert "additionalProperties" in obj
        if "properties" in obj:
            assert obj["additionalProperties"] is False
            for name, prop in obj["properties"].items():
                assert prop.get("description"), name


def test_durations_are_string_patterns() -> None:
    duration = json_schema()["$defs"]["duration"]
    assert duration["type"] == "string"
    assert duration["pattern"].startswith("^")


def test_gateway_yaml_is_the_documented_default() -> None:
    cfg = load_config(CONFIG_DIR / "gateway.yaml")
    assert str(cfg.listen) == "0.0.0.0:8080"
    assert str(cfg.admin) == "127.0.0.1:9901"
    assert cfg.workers == 1
    demo = cfg.upstreams["demo"]
    assert [i.address for i in demo.instances] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert demo.balancer == "round_robin"
    (route,) = cfg.routes
    assert route.name == "demo" and route.upstream == "demo"
    assert (route.match.path.kind, route.match.path.value) == ("prefix", "/demo")  # type: ignore[union-attr]
    assert route.rewrite is not None and route.rewrite.strip_prefix == "/demo"
    assert route.timeout == 15.0


def test_examples_exist() -> None:
    names = {p.name for p in SHIPPED}
    assert {"gateway.yaml", "routing.yaml", "rewrite.yaml", "weighted.yaml", "limits.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_valid_for_both(path: Path) -> None:
    load_config(path)  # raises on any error
    assert schema_errors(yaml.safe_load(path.read_text())) == []


VALID_DOCS = [
    "{}",
    "workers: auto",
    "listen: '[::1]:0'\nadmin: '[::1]:1'",
    "trusted_proxies: ['::1', 10.0.0.0/8]",
    "limits: {max_body_bytes: 0, max_header_bytes: 1KB}",
    "upstreams: {a: {instances: [h:1, {address: '[::1]:2', weight: 5}]}}\n"
    "routes: [{name: r, upstream: a, match: {host: '*.x.io', path: {exact: /}}}]",
    "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, rewrite: {regex: '^/(a)', replacement: '/\\1'}}]",
]


@pytest.mark.parametrize("text", VALID_DOCS)
def test_valid_docs_accepted_by_both(text: str) -> None:
    load_config_text(text)
    assert schema_errors(yaml.safe_load(text)) == []


# Each is invalid for a reason JSON Schema can express too; both must reject it.
INVALID_DOCS = {
    "unknown-top-key": "lisen: 0.0.0.0:80",
    "unknown-key": "upstreams: {a: {instances: [h:1], cache: {size: 1}}}",
    "rate-limit-store": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, rate_limit: {rate: 1/s, store: disk}}]",
    "rate-limit-key": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, rate_limit: {rate: 1/s, key: cookie:x}}]",
    "listen-type": "listen: 8080",
    "listen-no-port": "listen: localhost",
    "workers-zero": "workers: 0",
    "workers-word": "workers: all",
    "duration-bare": "limits: {header_timeout: '10'}",
    "duration-int": "limits: {header_timeout: 10}",
    "duration-unit": "limits: {header_timeout: 10d}",
    "size-unit": "limits: {max_body_bytes: 10XB}",
    "size-negative": "limits: {max_body_bytes: -1}",
    "max-connections-zero": "limits: {max_connections: 0}",
    "zero-instances": "upstreams: {a: {instances: []}}",
    "no-instances": "upstreams: {a: {balancer: round_robin}}",
    "balancer": "upstreams: {a: {instances: [h:1], balancer: fastest}}",
    "hedge-after": "upstreams: {a: {instances: [h:1], hedge: {after: soon}}}",
    "retry-condition": "upstreams: {a: {instances: [h:1], retry: {on: [sometimes]}}}",
    "retry-status": "upstreams: {a: {instances: [h:1], retry: {on: [700]}}}",
    "hash-key": "upstreams: {a: {instances: [h:1], balancer: maglev, hash_key: 'cookie:'}}",
    "percent": "upstreams: {a: {instances: [h:1], outlier: {max_ejection_percent: 120}}}",
    "weight": "upstreams: {a: {instances: [{address: 'h:1', weight: 0}]}}",
    "instance-no-address": "upstreams: {a: {instances: [{weight: 2}]}}",
    "upstream-name": "upstreams: {'a b': {instances: [h:1]}}",
    "route-no-name": "upstreams: {a: {instances: [h:1]}}\nroutes: [{upstream: a}]",
    "route-no-upstream": "routes: [{name: r}]",
    "path-two-kinds": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, match: {path: {exact: /a, prefix: /b}}}]",
    "path-no-kind": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, match: {path: {}}}]",
    "path-no-slash": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, match: {path: {prefix: a}}}]",
    "wildcard-host": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, match: {host: 'a.*.io'}}]",
    "method-token": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, match: {methods: ['G T']}}]",
    "methods-empty": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, match: {methods: []}}]",
    "header-name": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, match: {headers: {'a b': x}}}]",
    "header-value-int": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, match: {headers: {a: 1}}}]",
    "regex-alone": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, rewrite: {regex: '^/x'}}]",
    "replacement-alone": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, rewrite: {replacement: '/y'}}]",
    "strip-prefix-no-slash": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, rewrite: {strip_prefix: x}}]",
    "route-timeout-number": "upstreams: {a: {instances: [h:1]}}\n"
    "routes: [{name: r, upstream: a, timeout: 1.5}]",
    "routes-mapping": "routes: {r: {upstream: a}}",
    "not-a-mapping": "[1, 2]",
}


@pytest.mark.parametrize("text", INVALID_DOCS.values(), ids=INVALID_DOCS.keys())
def test_invalid_docs_rejected_by_both(text: str) -> None:
    with pytest.raises(ConfigInvalid):
        load_config_text(textwrap.dedent(text))
    assert schema_errors(yaml.safe_load(text)) != []
