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
