"""Secrets in the config: ${env:...}/${file:...} references, redaction, scrubbing, and the
refusal of empty files."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    ConfigInvalid,
    config_warnings,
    load_config,
    load_config_text,
    redact_config,
)
from gateway.config.secrets import (
    REDACTED,
    RedactingFilter,
    Resolver,
    SecretScrubber,
    redact_userinfo,
)

ROUTES = "upstreams: {a: {instances: ['127.0.0.1:9001']}}\nroutes: []\n"


def errors_of(text: str, **kwargs: Any) -> list[str]:
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(text, "gw.yaml", **kwargs)
    return [str(e) for e in info.value.errors]


def write(tmp_path: Path, text: str, name: str = "gw.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- references ---------------------------------------------------------------------------------


def test_env_and_file_references_are_expanded_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GW_UNIT_TOKEN", "token-from-env")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "redis").write_text("pass-from-file\n")  # trailing newline dropped
    path = write(
        tmp_path,
        """\
        admin: {address: 127.0.0.1:9901, token: "${env:GW_UNIT_TOKEN}"}
        redis: {url: "redis://:${file:secrets/redis}@127.0.0.1:6379/0"}
        discovery:
          c: {type: consul, address: "http://127.0.0.1:8500", token: "${ENV:GW_UNIT_TOKEN}"}
        routes: []
        """,
    )
    config = load_config(path)
    assert config.admin_token == "token-from-env"
    assert config.redis is not None
    assert config.redis.url == "redis://:pass-from-file@127.0.0.1:6379/0"
    assert config.discovery["c"].token == "token-from-env"
    assert config.references == {
        "env:GW_UNIT_TOKEN": "token-from-env",
        "file:secrets/redis": "pass-from-file",
    }
    assert set(config.secrets) >= {"token-from-env", "pass-from-file"}
    # The file as written hashes the same whatever the secrets are: it holds only references.
    assert "${env:GW_UNIT_TOKEN}" in config.raw["admin"]["token"]


def test_a_worker_resolves_from_the_supervisors_values_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = 'admin: {address: 127.0.0.1:9901, token: "${env:GW_UNIT_TOKEN}"}\n' + ROUTES
    monkeypatch.setenv("GW_UNIT_TOKEN", "from-this-environment")
    config = load_config_text(text, references={"env:GW_UNIT_TOKEN": "from-the-supervisor"})
    assert config.admin_token == "from-the-supervisor"
    assert any("was not resolved by the supervisor" in e for e in errors_of(text, references={}))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("${env:GW_UNIT_MISSING}", "environment variable GW_UNIT_MISSING is not set"),
        ("${env:1BAD}", "is not an environment variable name"),
        ("${file:no-such-file}", "cannot read"),
        ("${GW_UNIT_TOKEN}", "unknown reference ${GW_UNIT_TOKEN}: write ${env:NAME}"),
        ("${vault:x}", "unknown reference ${vault:x}"),
    ],
)
def test_bad_references_are_errors_with_file_line_and_key(value: str, message: str) -> None:
    text = f"listen: 127.0.0.1:0\nadmin: {{address: 127.0.0.1:9901, token: '{value}'}}\n"
    errors = errors_of(text + ROUTES)
    assert len(errors) == 1
    assert errors[0].startswith("gw.yaml:2: admin.token: ")
    assert message in errors[0]


def test_a_reference_where_it_is_not_expanded_is_an_error() -> None:
    text = (
        "upstreams: {a: {instances: ['127.0.0.1:9001']}}\n"
        "routes:\n"
        "  - name: r\n"
        "    upstream: a\n"
        "    match: {headers: {x-key: '${env:HOME}'}}\n"
    )
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(text, "gw.yaml")
    [error] = [str(e) for e in info.value.errors]
    assert error.startswith("gw.yaml:5: routes[0].match.headers.x-key: ")
    assert "only expanded in secret keys" in error


def test_secret_file_size_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * (64 * 1024 + 1))
    with pytest.raises(ValueError, match="larger than"):
        Resolver(tmp_path).expand("${file:big}")


# --- redaction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:hunter22@127.0.0.1:6379/0", "redis://:<redacted>@127.0.0.1:6379/0"),
        ("redis://user:hunter22@h:1/0", "redis://user:<redacted>@h:1/0"),
        ("https://TOKEN123@h/x", "https://<redacted>@h/x"),
        ("redis://:p@ss@h:1", "redis://:<redacted>@h:1"),  # raw '@' in the password
        ("redis://:${env:PW}@h:1", "redis://:${env:PW}@h:1"),  # a reference is shown
        ("redis://h:1/0", "redis://h:1/0"),
        (
            "failed on http://a:b@x and https://c:d@y",
            "failed on http://a:<redacted>@x and https://c:<redacted>@y",
        ),
        ("mail me at a@b.example", "mail me at a@b.example"),
    ],
)
def test_url_userinfo_redaction(text: str, expected: str) -> None:
    assert redact_userinfo(text) == expected


def test_redacted_view_hides_every_secret_and_keeps_references(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GW_UNIT_TOKEN", "token-from-env")
    text = textwrap.dedent(
        """\
        admin: {address: 127.0.0.1:9901, token: literal-admin-token}
        redis: {url: "redis://:redis-password@127.0.0.1:6379/0"}
        discovery:
          c: {type: consul, address: "http://127.0.0.1:8500", token: "${env:GW_UNIT_TOKEN}",
              cert_file: /tls/c.pem, key_file: /tls/c.key}
          e: {type: eureka, address: "http://eu:eureka-pass@127.0.0.1:8761/eureka"}
          k: {type: kubernetes, address: "https://k8s:6443", token: k8s-bearer-token}
          k2: {type: kubernetes, token_file: /var/run/token}
        upstreams: {a: {instances: ['127.0.0.1:9001']}}
        routes: [{name: r, upstream: a}]
        """
    )
    config = load_config_text(text)
    view = redact_config(config)
    assert view["admin"] == {"address": "127.0.0.1:9901", "token": REDACTED}
    assert view["redis"]["url"] == "redis://:<redacted>@127.0.0.1:6379/0"
    consul = view["discovery"]["c"]
    assert consul["token"] == "${env:GW_UNIT_TOKEN}"
    assert consul["key_file"] == REDACTED and consul["cert_file"] == "/tls/c.pem"
    assert view["discovery"]["e"]["address"] == "http://eu:<redacted>@127.0.0.1:8761/eureka"
    assert view["discovery"]["k"]["token"] == REDACTED
    assert view["discovery"]["k2"]["token_file"] == REDACTED
    assert view["routes"] == [{"name": "r", "upstream": "a"}]
    shown = repr(view)
    for secret in (
        "literal-admin-token",
        "redis-password",
        "token-from-env",
        "eureka-pass",
        "k8s-bearer-token",
        "/tls/c.key",
    ):
        assert secret not in shown
    assert config.raw["admin"]["token"] == "literal-admin-token"  # the real value is kept


def test_every_secret_field_of_the_schema_is_redacted() -> None:
    """The flag drives redaction: a secret key added later is covered without more code."""
    from gateway.config.schema import ROOT
    from gateway.config.validate import Field, ListOf, MapOf, Mapped, Struct, Type, Union

    def secret_fields(node: Type, seen: set[int]) -> list[Field]:
        if id(node) in seen:
            return []
        seen.add(id(node))
        if isinstance(node, Struct):
            found = [f for f in node.fields.values() if f.secret]
            for f in node.fields.values():
                found += secret_fields(f.type, seen)
            return found
        if isinstance(node, Union):
            return [f for o in node.options for f in secret_fields(o, seen)]
        if isinstance(node, ListOf):
            return secret_fields(node.item, seen)
        if isinstance(node, MapOf):
            return secret_fields(node.value, seen)
        if isinstance(node, Mapped):
            return secret_fields(node.inner, seen)
        return []

    names = {f.name for f in secret_fields(ROOT, set())}
    assert names == {"token", "key_file", "token_file", "key"}  # key: TLS key paths


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        ("admin: {address: 127.0.0.1:1, token: 12345678}\n", "12345678"),  # wrong type
        ("admin: {address: 127.0.0.1:1, token: ['tok-in-a-list']}\n", "tok-in-a-list"),
        ("redis: {url: 'http://:pw-secret-1@h'}\n", "pw-secret-1"),  # bad scheme
        ("redis: {url: 'http//:pw-secret-2@h'}\n", "pw-secret-2"),  # not even a URL
        ("redis: {url: 'redis://:pw-secret-3@h', prefix: 1}\n", "pw-secret-3"),
    ],
)
def test_error_messages_never_quote_a_secret(text: str, secret: str) -> None:
    errors = errors_of(text + ROUTES)
    assert errors, text
    assert all(secret not in e for e in errors), errors


# --- scrubbing free text ------------------------------------------------------------------------


def test_scrubber_replaces_secret_values_and_userinfo() -> None:
    scrubber = SecretScrubber()
    scrubber.set_secrets(["s3cret-token", "abc"])  # too short to scrub safely: ignored
    text = "token s3cret-token, url redis://:pw@h, word abc"
    assert scrubber.text(text) == "token <redacted>, url redis://:<redacted>@h, word abc"
    body = b'{"x": "s3cret-token", "u": "redis://:pw@h"}'
    assert scrubber.json_bytes(body) == b'{"x": "<redacted>", "u": "redis://:<redacted>@h"}'
    scrubber.set_secrets(['quo"te-secret'])
    assert scrubber.json_bytes(b'{"x": "quo\\"te-secret"}') == b'{"x": "<redacted>"}'


def test_log_filter_scrubs_messages_and_tracebacks() -> None:
    scrubber = SecretScrubber()
    scrubber.set_secrets(["s3cret-token"])
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    handler.addFilter(RedactingFilter(scrubber))
    logger = logging.getLogger("test-secrets")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("redis store at %s is down", "redis://:hunter22@127.0.0.1:6379/0")
        try:
            raise RuntimeError("bad token s3cret-token")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert records[0] == "redis store at redis://:<redacted>@127.0.0.1:6379/0 is down"
    assert "s3cret-token" not in records[1] and "bad token <redacted>" in records[1]


# --- empty files --------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n", "# just a comment\n# and another\n", "---\n"])
def test_an_empty_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(content)
    with pytest.raises(ConfigInvalid) as info:
        load_config(path)
    [error] = [str(e) for e in info.value.errors]
    assert error.startswith(f"{path}:1: routes: the config file is empty")
    assert "routes: []" in error


def test_a_file_without_routes_is_refused_unless_they_are_written_as_empty(
    tmp_path: Path,
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("listen: 127.0.0.1:0\nupstreams: {a: {instances: ['127.0.0.1:9001']}}\n")
    with pytest.raises(ConfigInvalid) as info:
        load_config(path)
    [error] = [str(e) for e in info.value.errors]
    assert error.startswith(f"{path}:1: routes: required key is missing")
    path.write_text("listen: 127.0.0.1:0\nroutes: []\n")
    assert load_config(path).routes == ()
    path.write_text("listen: 127.0.0.1:0\nroutes:\n")  # `routes:` alone is null, not a list
    with pytest.raises(ConfigInvalid, match="routes: expected a list"):
        load_config(path)


def test_admin_beyond_loopback_without_token_is_warned_about() -> None:
    def warnings(admin: str) -> list[str]:
        return config_warnings(load_config_text(f"admin: {admin}\nroutes: []\n"))

    assert any("without admin.token" in w for w in warnings("0.0.0.0:9901"))
    assert any("without admin.token" in w for w in warnings("'[::]:9901'"))
    assert any("without admin.token" in w for w in warnings("gateway.internal:9901"))
    assert warnings("127.0.0.1:9901") == []
    assert warnings("'[::1]:9901'") == []
    assert warnings("localhost:9901") == []
    assert warnings("{address: 0.0.0.0:9901, token: a-long-token}") == []
