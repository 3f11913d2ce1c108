"""Config of HTTP/2: listen[].http2 and upstreams.NAME.protocol."""

from __future__ import annotations

import textwrap

import pytest

from gateway.config import ConfigInvalid, load_config_text
from gateway.config.model import Http2Config

UPSTREAM = "upstreams:\n  a: {instances: [127.0.0.1:9001]}\nroutes: []\n"


def errors_of(text: str) -> list[str]:
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(textwrap.dedent(text), "gateway.yaml")
    return [str(e) for e in info.value.errors]


def test_http2_defaults_equal_model_defaults() -> None:
    cfg = load_config_text("listen: [{address: 127.0.0.1:8080, http2: {}}]\n" + UPSTREAM)
    assert cfg.listeners[0].http2 == Http2Config()
    assert cfg.listeners[0].http2.enabled is False
    assert cfg.listeners[0].http2.initial_window == 1024 * 1024
    assert cfg.listeners[0].http2.max_header_list_size == 64 * 1024
    assert cfg.upstreams["a"].protocol == "http1"


def test_http2_values_are_read() -> None:
    cfg = load_config_text(
        "listen:\n"
        "  - address: 127.0.0.1:8080\n"
        "    http2: {enabled: true, max_concurrent_streams: 7, initial_window: 2MiB,"
        " max_frame_size: 32KiB, max_resets_per_second: 9}\n"
        "upstreams:\n  a: {instances: [127.0.0.1:9001], protocol: h2c}\nroutes: []\n"
    )
    h2 = cfg.listeners[0].http2
    assert (h2.enabled, h2.max_concurrent_streams, h2.initial_window) == (True, 7, 2 * 1024 * 1024)
    assert (h2.max_frame_size, h2.max_resets_per_second) == (32 * 1024, 9)
    assert cfg.upstreams["a"].protocol == "h2c"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "listen: [{address: 127.0.0.1:8080, http2: {max_concurrent_streams: 0}}]\n",
            "gateway.yaml:1: listen[0].http2.max_concurrent_streams: must be at least 1, got 0",
        ),
        (
            # RFC 9113 §6.5.2: SETTINGS_MAX_FRAME_SIZE is at least 2^14.
            "listen: [{address: 127.0.0.1:8080, http2: {max_frame_size: 1000}}]\n",
            "gateway.yaml:1: listen[0].http2.max_frame_size: must be at least 16384 bytes,"
            " got 1000",
        ),
        (
            # RFC 9113 §6.9.1: a window is at most 2^31-1.
            "listen: [{address: 127.0.0.1:8080, http2: {initial_window: 4GiB}}]\n",
            "gateway.yaml:1: listen[0].http2.initial_window: must be at most 2147483647 bytes,"
            " got 4294967296",
        ),
        (
            "listen: [{address: 127.0.0.1:8080, http2: {enable: true}}]\n",
            "gateway.yaml:1: listen[0].http2.enable: unknown key 'enable' (did you mean"
            " 'enabled'?)",
        ),
        (
            "upstreams:\n  a: {instances: [127.0.0.1:9001], protocol: h3}\n",
            "gateway.yaml:2: upstreams.a.protocol: 'h3' is not one of http1, h2c, h2",
        ),
        (
            "upstreams:\n  a: {instances: [127.0.0.1:9001], protocol: h2}\n",
            "gateway.yaml:2: upstreams.a.protocol: h2 is HTTP/2 over TLS: set tls (or use h2c"
            " for plaintext)",
        ),
    ],
)
def test_http2_config_errors_name_file_line_key(text: str, expected: str) -> None:
    errors = errors_of(text + ("routes: []\n" if "routes" not in text else ""))
    assert expected in errors, errors


# -- upstreams.NAME.http2: the HTTP/2 pool settings ---------------------------------------

H2C = "upstreams:\n  a:\n    instances: [127.0.0.1:9001]\n    protocol: h2c\n"


@pytest.mark.parametrize(
    ("http2", "field", "value"),
    [
        ("{max_connections: 1}", "max_connections", 1),
        ("{max_connections: 1000}", "max_connections", 1000),
        ("{max_concurrent_streams: 1}", "max_concurrent_streams", 1),
        ("{max_pending: 5}", "max_pending", 5),
        ("{initial_window: 65535}", "initial_window", 65535),
        ("{initial_window: 1MiB}", "initial_window", 1 << 20),
        ("{connection_window: 2147483647}", "connection_window", 2**31 - 1),
        ("{max_header_list_size: 16KiB}", "max_header_list_size", 16 << 10),
        ("{ping_interval: 30s}", "ping_interval", 30.0),
        ("{ping_interval: 500ms, ping_timeout: 2s}", "ping_timeout", 2.0),
    ],
)
def test_upstream_http2_good_values(http2: str, field: str, value: object) -> None:
    cfg = load_config_text(H2C + f"    http2: {http2}\nroutes: []\n", "gateway.yaml")
    settings = cfg.upstreams["a"].http2
    assert settings is not None and getattr(settings, field) == value


def test_upstream_http2_defaults() -> None:
    from gateway.config.model import UpstreamHttp2Config

    cfg = load_config_text(H2C + "    http2: {}\nroutes: []\n", "gateway.yaml")
    assert cfg.upstreams["a"].http2 == UpstreamHttp2Config()
    assert UpstreamHttp2Config() == UpstreamHttp2Config(
        max_connections=4,
        max_concurrent_streams=None,
        max_pending=1024,
        initial_window=1 << 20,
        connection_window=16 << 20,
        max_header_list_size=64 << 10,
        ping_interval=None,
        ping_timeout=20.0,
    )
    absent = load_config_text(H2C + "routes: []\n", "gateway.yaml")
    assert absent.upstreams["a"].http2 is None  # (the pool uses the defaults above)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            H2C + "    http2: {max_connections: 0}\n",
            "gateway.yaml:5: upstreams.a.http2.max_connections: must be at least 1, got 0",
        ),
        (
            H2C + "    http2: {max_connections: many}\n",
            "gateway.yaml:5: upstreams.a.http2.max_connections: expected an integer, got string"
            " 'many'",
        ),
        (
            H2C + "    http2: {max_concurrent_streams: 0}\n",
            "gateway.yaml:5: upstreams.a.http2.max_concurrent_streams: must be at least 1, got 0",
        ),
        (
            # RFC 9113 §6.9.2: a window below the initial 65,535 bytes cannot be announced.
            H2C + "    http2: {initial_window: 1KiB}\n",
            "gateway.yaml:5: upstreams.a.http2.initial_window: must be at least 65535 bytes,"
            " got 1024",
        ),
        (
            # RFC 9113 §6.9.1: at most 2^31-1.
            H2C + "    http2: {connection_window: 2GiB}\n",
            "gateway.yaml:5: upstreams.a.http2.connection_window: must be at most 2147483647"
            " bytes, got 2147483648",
        ),
        (
            H2C + "    http2: {ping_interval: soon}\n",
            "gateway.yaml:5: upstreams.a.http2.ping_interval: invalid duration 'soon'",
        ),
        (
            H2C + "    http2: {ping_interval: 0s}\n",
            "gateway.yaml:5: upstreams.a.http2.ping_interval: duration must be greater than"
            " zero, got '0s'",
        ),
        (
            H2C + "    http2: {max_conections: 2}\n",
            "gateway.yaml:5: upstreams.a.http2.max_conections: unknown key 'max_conections'"
            " (did you mean 'max_connections'?)",
        ),
        (
            "upstreams:\n  a:\n    instances: [127.0.0.1:9001]\n    http2: {max_connections: 2}\n",
            "gateway.yaml:4: upstreams.a.http2: only meaningful with protocol h2c or h2 (this"
            " upstream is http1)",
        ),
        (
            "upstreams:\n  a:\n    instances: [127.0.0.1:9001]\n    protocol: http1\n"
            "    http2: {}\n",
            "gateway.yaml:5: upstreams.a.http2: only meaningful with protocol h2c or h2",
        ),
    ],
)
def test_upstream_http2_errors_name_file_line_key(text: str, expected: str) -> None:
    errors = errors_of(text + "routes: []\n")
    assert any(error.startswith(expected) for error in errors), errors
