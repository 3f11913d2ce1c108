"""The filters: config sections: the examples load and match the JSON Schema, the schema
describes every built-in filter, and entry-level mistakes are file:line errors."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.config import ConfigInvalid, json_schema, load_config, load_config_text

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "config" / "examples").glob("filters-*.yaml"))
VALIDATOR = jsonschema.Draft202012Validator(json_schema())


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_load_and_match_the_json_schema(path: Path) -> None:
    config = load_config(path)
    assert any(route.filters for route in config.routes)
    VALIDATOR.validate(yaml.safe_load(path.read_text()))


def test_every_builtin_filter_is_in_the_json_schema() -> None:
    entry = json_schema()["$defs"]["filter"]
    kinds = {next(iter(option["required"])) for option in entry["oneOf"]}
    assert kinds == {
        "headers",
        "cors",
        "api_key",
        "jwt",
        "ip_filter",
        "compress",
        "forward_auth",
        "traffic_split",
        "mirror",
        "tracing",
        "grpc_web",
        "python",
    }
    assert not VALIDATOR.is_valid({"filters": [{"gzip": {}}]})
    assert not VALIDATOR.is_valid({"filters": [{"cors": {"allow_origins": ["*"], "bogus": 1}}]})
    assert VALIDATOR.is_valid({"filters": [{"cors": {"allow_origins": ["*"]}}]})


@pytest.mark.parametrize(
    ("text", "line", "path", "message"),
    [
        (
            "filters:\n  - corz: {}\n",
            2,
            "filters[0].corz",
            "unknown filter 'corz' (did you mean 'cors'?)",
        ),
        (
            "filters:\n  - {cors: {allow_origins: ['*']}, compress: {}}\n",
            2,
            "filters[0]",
            "one key",
        ),
        ("filters:\n  - cors\n", 2, "filters[0]", "got string 'cors'"),
        (
            "filters:\n  - compress: {algorithms: [lz4]}\n",
            2,
            "filters[0].compress.algorithms[0]",
            "'lz4'",
        ),
        (
            "filters:\n  - ip_filter: {}\n",
            2,
            "filters[0].ip_filter.allow",
            "give allow, deny or both",
        ),
        (
            "upstreams:\n  u:\n    instances: [h:1]\n    filters:\n      - cors: {max_age: 5}\n",
            5,
            "upstreams.u.filters[0].cors.max_age",
            "expected a duration",
        ),
    ],
)
def test_entry_errors(text: str, line: int, path: str, message: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(text, "gw.yaml")
    errors = [e for e in info.value.errors if e.path == path]
    assert errors, info.value.errors
    assert errors[0].line == line and message in errors[0].message


def test_a_filter_without_options() -> None:
    config = load_config_text("filters:\n  - compress:\n")
    assert config.filters[0].kind == "compress"
    assert config.filters[0].options["min_bytes"] == 1024


def test_upstreams_reached_through_traffic_split_are_not_unused() -> None:
    from gateway.config.lint import lint_text

    text = (
        "upstreams:\n  a: {instances: [127.0.0.1:1]}\n  b: {instances: [127.0.0.1:2]}\n"
        "  c: {instances: [127.0.0.1:3]}\n"
        "routes:\n  - name: r\n    upstream: a\n"
        "    filters: [{traffic_split: {upstreams: {a: 9, b: 1}}}]\n"
    )
    warnings = lint_text(text, load_config_text(text))
    unused = [w.message for w in warnings if "not used" in w.message]
    assert unused == ["upstream 'c' is not used by any route"]


def test_filter_secrets_are_redacted_when_the_config_is_shown() -> None:
    from gateway.config import redact_config

    text = (
        "upstreams:\n  u:\n    instances: [127.0.0.1:1]\n"
        "    filters: [{jwt: {secret: hunter2-hunter2, algorithms: [HS256]}}]\n"
        "filters:\n  - jwt: {secret: 'top-secret-value', algorithms: [HS256]}\n"
        "routes:\n  - name: r\n    upstream: u\n"
        "    filters: [{jwt: {secret: route-secret, algorithms: [HS256]}}]\n"
    )
    config = load_config_text(text)
    shown = repr(redact_config(config))
    for secret in ("top-secret-value", "hunter2-hunter2", "route-secret"):
        assert secret not in shown
        assert secret in config.secrets  # and scrubbed from log lines
    assert redact_config(config)["filters"][0]["jwt"]["algorithms"] == ["HS256"]
