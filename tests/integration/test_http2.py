"""HTTP/2 toward clients, end to end: curl (h2c prior knowledge, h2 over TLS by ALPN), a raw
frame-level client for every protection, flow control, drain and hot reload.

Each RFC 9113 rule is a table row with the section in a comment; the client is
tests/integration/h2_support.RawH2, which sends exactly the frames given.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import hpack
import pytest
import yaml
from hpack.hpack import encode_integer
from hyperframe.frame import HeadersFrame, RstStreamFrame, SettingsFrame

from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess, free_ports
from tests.integration.h2_support import (
    ENHANCE_YOUR_CALM,
    NO_ERROR,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RawH2,
)
from tests.integration.tls_support import CertFiles, tls_get

MAX_STREAMS = 4
HTTP2 = {
    "enabled": True,
    "max_concurrent_streams": MAX_STREAMS,
    "max_header_list_size": "8KiB",
    "max_header_block": "32KiB",
    "max_resets_per_second": 20,
    "max_pings_per_second": 10,
    "max_settings_per_second": 10,
}


class Setup:
    def __init__(self, gateway: GatewayProcess, h2c_port: int, tls_port: int, certs: CertFiles):
        self.gateway = gateway
        self.h2c_port = h2c_port
        self.tls_port = tls_port
        self.certs = certs

    def client(self, **options: Any) -> RawH2:
        return RawH2(self.h2c_port, **options)


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, app_backend: AppBackend, start_gateway: Any
) -> Setup:
    directory = tmp_path_factory.mktemp("h2tls")
    certs = CertFiles(directory)
    cert, key = certs.issue("api", "api.test", "localhost")
    h2c_port, tls_port = free_ports(2)
    gateway = start_gateway(
        {
            "listen": [
                {"address": f"127.0.0.1:{h2c_port}", "http2": HTTP2},
                {
                    "address": f"127.0.0.1:{tls_port}",
                    "tls": {"certificates": [{"cert": str(cert), "key": str(key)}]},
                    "http2": HTTP2,
                },
            ],
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [{"name": "all", "upstream": "app"}],
        }
    )
    return Setup(gateway, h2c_port, tls_port, certs)


def echo_headers(response_body: bytes) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for name, value in json.loads(response_body)["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


# -- real clients ------------------------------------------------------------------------------


def test_curl_prior_knowledge_and_http1_share_the_listener(setup: Setup) -> None:
    url = f"http://127.0.0.1:{setup.h2c_port}/echo/curl"
    out = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-w", "\n%{http_version}", url],
        capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    body, _, version = out.stdout.rpartition(b"\n")
    assert version == b"2"
    assert json.loads(body)["path"] == "/echo/curl"
    plain = subprocess.run(
        ["curl", "-sS", "--http1.1", "-w", "\n%{http_version}", url],
        capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    assert plain.stdout.rpartition(b"\n")[2] == b"1.1"


def test_curl_http2_over_tls_negotiates_h2_by_alpn(setup: Setup) -> None:
    url = f"https://api.test:{setup.tls_port}/echo/tls"
    out = subprocess.run(
        ["curl", "-sS", "--http2", "--cacert", str(setup.certs.ca_path),
         "--resolve", f"api.test:{setup.tls_port}:127.0.0.1", "-w", "\n%{http_version}", url],
        capture_output=True, timeout=20, check=True,
    )  # fmt: skip
    body, _, version = out.stdout.rpartition(b"\n")
    assert version == b"2"
    seen = echo_headers(body)
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["host"] == [f"api.test:{setup.tls_port}"]
    # An HTTP/1.1-only client still gets HTTP/1.1 on the same listener.
    status, _, facts = tls_get(setup.tls_port, "api.test", setup.certs.client_context())
    assert status == 200 and facts["alpn"] == "http/1.1"


def test_raw_h2_over_tls(setup: Setup) -> None:
    context = ssl.create_default_context(cafile=str(setup.certs.ca_path))
    context.set_alpn_protocols(["h2"])
    client = RawH2(setup.tls_port, context=context, server_name="api.test")
    try:
        client.request(1, "/echo/raw-tls", authority="api.test")
        response = client.response(1)
        assert response.status == 200
        assert json.loads(response.body)["path"] == "/echo/raw-tls"
    finally:
        client.close()


def test_headers_are_translated_to_http1(setup: Setup, app_backend: AppBackend) -> None:
    client = setup.client()
    try:
        # RFC 9113 §8.3.1: :authority becomes Host; §8.2.3: cookie crumbs joined with "; ";
        # §8.2.2: te: trailers is allowed but is hop-by-hop, not forwarded.
        client.request(
            1,
            "/echo/translate?q=1",
            method="POST",
            authority="svc.example",
            extra=[(b"cookie", b"a=1"), (b"x-custom", b"v"), (b"cookie", b"b=2"),
                   (b"te", b"trailers")],
            body=b"hello body",
        )  # fmt: skip
        response = client.response(1)
        assert response.status == 200
        echoed = json.loads(response.body)
        seen = echo_headers(response.body)
        assert echoed["method"] == "POST" and echoed["body_size"] == 10
        assert echoed["version"] == "1.1"
        assert seen["host"] == ["svc.example"]
        assert seen["cookie"] == ["a=1; b=2"]
        assert seen["x-custom"] == ["v"]
        assert "te" not in seen and "connection" not in seen
        # Response: no connection-specific fields on the HTTP/2 side (RFC 9113 §8.2.2).
        names = [name for name, _ in response.headers]
        assert all(name == name.lower() for name in names)
        for banned in (b"connection", b"keep-alive", b"transfer-encoding"):
            assert banned not in names
        assert response.header(b"x-request-id")
    finally:
        client.close()


def test_chunked_upstream_response_and_head(setup: Setup) -> None:
    client = setup.client()
    try:
        client.request(1, "/stream/300000")
        response = client.response(1)
        assert response.status == 200 and len(response.body) == 300000
        client.request(3, "/bytes/1000", method="HEAD")
        head = client.response(3)
        assert head.status == 200 and head.body == b""
        assert head.header(b"content-length") == b"1000"
    finally:
        client.close()


# -- RFC 9113 rules ------------------------------------------------------------------------------

BASE = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/echo")]
AUTH = [(b":authority", b"127.0.0.1")]


@pytest.mark.parametrize(
    "headers",
    [
        # §8.2.1: a field name with upper case is malformed.
        pytest.param([*BASE, *AUTH, (b"X-Upper", b"1")], id="8.2.1-uppercase-name"),
        # §8.2.1: CR/LF in a value.
        pytest.param([*BASE, *AUTH, (b"x-a", b"1\r\nx-b: 2")], id="8.2.1-crlf-in-value"),
        # §8.2.2: connection-specific fields.
        pytest.param([*BASE, *AUTH, (b"connection", b"close")], id="8.2.2-connection"),
        pytest.param([*BASE, *AUTH, (b"keep-alive", b"5")], id="8.2.2-keep-alive"),
        pytest.param([*BASE, *AUTH, (b"transfer-encoding", b"chunked")], id="8.2.2-te-chunked"),
        pytest.param([*BASE, *AUTH, (b"upgrade", b"websocket")], id="8.2.2-upgrade"),
        pytest.param([*BASE, *AUTH, (b"proxy-connection", b"x")], id="8.2.2-proxy-connection"),
        pytest.param([*BASE, *AUTH, (b"te", b"gzip")], id="8.2.2-te-not-trailers"),
        # §8.3: pseudo-headers before regular fields, only defined ones, once each.
        pytest.param(
            [(b":method", b"GET"), (b"x-a", b"1"), (b":scheme", b"http"), (b":path", b"/")],
            id="8.3-pseudo-after-regular",
        ),
        pytest.param([*BASE, *AUTH, (b":foo", b"1")], id="8.3-unknown-pseudo"),
        pytest.param([*BASE, *AUTH, (b":status", b"200")], id="8.3-response-pseudo"),
        pytest.param([*BASE, (b":path", b"/again"), *AUTH], id="8.3-duplicate-path"),
        # §8.3.1: required pseudo-headers, non-empty :path, Host agreeing with :authority.
        pytest.param([(b":method", b"GET"), (b":scheme", b"http"), *AUTH], id="8.3.1-no-path"),
        pytest.param(
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b""), *AUTH],
            id="8.3.1-empty-path",
        ),
        pytest.param([*BASE, *AUTH, (b"host", b"elsewhere")], id="8.3.1-host-differs"),
        # §8.5: CONNECT is not proxied.
        pytest.param([(b":method", b"CONNECT"), *AUTH], id="8.5-connect"),
    ],
)
def test_malformed_request_is_a_stream_error(
    setup: Setup, headers: list[tuple[bytes, bytes]]
) -> None:
    """§8.1.1: a malformed request is a stream error PROTOCOL_ERROR; the connection lives."""
    client = setup.client()
    try:
        client.send(client.headers_frame(1, headers))
        assert client.response(1).reset == PROTOCOL_ERROR
        client.request(3, "/echo/after")
        assert client.response(3).status == 200
    finally:
        client.close()


@pytest.mark.parametrize(
    ("declared", "sent"),
    [
        # §8.1.1: DATA beyond content-length, or less than it at END_STREAM, is malformed.
        pytest.param(b"5", b"0123456789", id="8.1.1-more-than-content-length"),
        pytest.param(b"10", b"01234", id="8.1.1-less-than-content-length"),
    ],
)
def test_body_length_must_match_content_length(setup: Setup, declared: bytes, sent: bytes) -> None:
    """h2 checks this one itself and makes it a connection error (GOAWAY PROTOCOL_ERROR),
    stricter than the stream error §8.1.1 asks for (docs/http2.md, deviations)."""
    client = setup.client()
    try:
        client.send(
            client.headers_frame(
                1, [*BASE[:2], (b":path", b"/sink"), *AUTH, (b"content-length", declared)],
                end_stream=False,
            )
        )  # fmt: skip
        client.send_body(1, sent)
        goaway = client.wait_closed()
        assert goaway is not None and goaway.error_code == PROTOCOL_ERROR
        assert client.responses.get(1) is None or client.responses[1].status is None
    finally:
        client.close()


# -- protections --------------------------------------------------------------------------------


def test_settings_advertise_the_configured_limits(setup: Setup) -> None:
    client = setup.client()
    try:
        client.pump(lambda: bool(client.server_settings))
        settings = client.server_settings
        assert settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == MAX_STREAMS
        assert settings[SettingsFrame.MAX_HEADER_LIST_SIZE] == 8 * 1024
        assert settings[SettingsFrame.INITIAL_WINDOW_SIZE] == 1024 * 1024
    finally:
        client.close()


def test_too_many_concurrent_streams_are_refused(setup: Setup, app_backend: AppBackend) -> None:
    """RFC 9113 §5.1.2: a stream over SETTINGS_MAX_CONCURRENT_STREAMS gets REFUSED_STREAM
    (the others carry on)."""
    client = setup.client()
    try:
        ids = [1 + 2 * n for n in range(MAX_STREAMS + 1)]
        for stream_id in ids:
            client.request(stream_id, "/slow?delay=0.5")
        assert client.response(ids[-1]).reset == REFUSED_STREAM
        for stream_id in ids[:-1]:
            response = client.response(stream_id)
            assert response.status == 200 and response.body == b"slow\n"
        client.request(ids[-1] + 2, "/echo/later")  # slots are free again
        assert client.response(ids[-1] + 2).status == 200
    finally:
        client.close()


def test_rapid_reset_ends_the_connection(setup: Setup) -> None:
    """CVE-2023-44487: HEADERS then RST_STREAM, over and over: past max_resets_per_second,
    GOAWAY ENHANCE_YOUR_CALM and close."""
    client = setup.client()
    try:
        frames = b""
        for n in range(60):
            stream_id = 1 + 2 * n
            frames += client.headers_frame(stream_id, [*BASE, *AUTH]).serialize()
            reset = RstStreamFrame(stream_id)
            reset.error_code = 0x8
            frames += reset.serialize()
        client.send_raw(frames)
        goaway = client.wait_closed()
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
        assert client.eof
    finally:
        client.close()


def test_resets_under_the_cap_are_fine(setup: Setup) -> None:
    client = setup.client()
    try:
        for stream_id in (1, 3, 5):
            client.send(client.headers_frame(stream_id, [*BASE, *AUTH]))
            client.reset(stream_id)
        client.request(7, "/echo/after-resets")
        assert client.response(7).status == 200
        assert client.goaway is None
    finally:
        client.close()


def test_continuation_flood_ends_the_connection(setup: Setup) -> None:
    """CVE-2024-27316: a header block that never ends (CONTINUATION after CONTINUATION) is cut
    off at max_header_block encoded bytes: GOAWAY and close, before END_HEADERS."""
    client = setup.client()
    try:
        client.send(client.headers_frame(1, [*BASE, *AUTH], end_headers=False))
        filler = b"a" * 16000  # header block fragments: never decoded, END_HEADERS never comes
        # 3 frames, 48000 bytes: over max_header_block (32 KiB) and far under h2's own cap of
        # 64 frames, so the cut is ours.
        with contextlib.suppress(OSError):  # (the gateway may close while we still send)
            for _ in range(3):
                client.send(client.continuation(1, filler))
        goaway = client.wait_closed()
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
        assert goaway.last_stream_id == 0  # stream 1 was never processed
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["ping", "settings"])
def test_ping_and_settings_floods_end_the_connection(setup: Setup, kind: str) -> None:
    client = setup.client()
    try:
        frame = client.ping() if kind == "ping" else SettingsFrame(0)
        client.send_raw(frame.serialize() * 200)
        goaway = client.wait_closed()
        assert goaway is not None and goaway.error_code == ENHANCE_YOUR_CALM
    finally:
        client.close()


def test_a_few_pings_are_answered(setup: Setup) -> None:
    client = setup.client()
    try:
        for _ in range(3):
            client.send(client.ping())
        client.request(1, "/echo/pinged")
        assert client.response(1).status == 200
        assert client.goaway is None
    finally:
        client.close()


def test_header_list_over_the_limit_gets_431(setup: Setup) -> None:
    """RFC 9113 §10.5.1 (RFC 6585 §5): over SETTINGS_MAX_HEADER_LIST_SIZE, 431 on the stream;
    the connection lives on."""
    client = setup.client()
    try:
        client.request(1, "/echo", extra=[(b"x-big", b"v" * 12000)])
        response = client.response(1)
        assert response.status == 431
        client.request(3, "/echo/after-431")
        assert client.response(3).status == 200
    finally:
        client.close()


def test_hpack_bomb_ends_the_connection(setup: Setup) -> None:
    """An HPACK bomb: one 4000-byte entry in the dynamic table referenced 300 times, a few KiB
    encoded but 1.2 MB decoded: the decoder stops at its cap (4x the advertised list size) and
    the connection ends with GOAWAY."""
    client = setup.client()
    try:
        encoder = hpack.Encoder()
        block = encoder.encode([*BASE, *AUTH])
        # Literal with incremental indexing, new name (RFC 7541 §6.2.1), then indexed refs.
        name, value = b"x-bomb", b"b" * 4000
        block += b"\x40" + bytes(encode_integer(len(name), 7)) + name
        block += bytes(encode_integer(len(value), 7)) + value
        index = 62  # the newest dynamic entry (static table has 61)
        block += bytes([0x80 | index]) * 300
        frame = HeadersFrame(1)
        frame.data = block
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        client.send(frame)
        goaway = client.wait_closed()
        assert goaway is not None and goaway.error_code in (ENHANCE_YOUR_CALM, 0x9)
    finally:
        client.close()


# -- flow control ---------------------------------------------------------------------------------


def test_a_stream_without_window_is_held_back_and_others_go_on(setup: Setup) -> None:
    """The client never opens stream 1's window: the gateway sends exactly the initial 65535
    bytes on it and pauses that upstream; stream 3 on the same connection completes."""
    client = setup.client(auto_window=False)
    try:
        client.grant(0, 64 * 1024 * 1024)  # the connection window is not the limit
        client.request(1, "/stream/4000000")
        client.pump(lambda: 1 in client.responses and len(client.responses[1].body) >= 65535)
        client.request(3, "/echo/meanwhile")
        other = client.response(3)
        assert other.status == 200
        assert len(client.responses[1].body) == 65535  # not a byte over the window
        assert not client.responses[1].ended
        client.auto_window = True
        client.grant(1, 4000000)
        assert len(client.response(1).body) == 4000000
    finally:
        client.close()


def test_request_body_is_acknowledged_only_as_the_upstream_takes_it(
    setup: Setup, start_gateway: Any
) -> None:
    """A slow upstream bounds what a client can send: an upstream that never reads means
    WINDOW_UPDATEs stop, so the client's window runs dry."""
    blackhole = socket.socket()
    blackhole.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(8)  # accepted by the kernel, never read
    (port,) = free_ports(1)
    gateway = start_gateway(
        {
            "listen": [{"address": f"127.0.0.1:{port}", "http2": {"enabled": True}}],
            "upstreams": {
                "hole": {"instances": [f"127.0.0.1:{blackhole.getsockname()[1]}"],
                         "timeouts": {"read": "30s"}},
            },
            "routes": [{"name": "all", "upstream": "hole"}],
        }
    )  # fmt: skip
    client = RawH2(port)
    try:
        client.send(
            client.headers_frame(1, [(b":method", b"POST"), (b":scheme", b"http"),
                                     (b":path", b"/up"), *AUTH], end_stream=False)
        )  # fmt: skip
        window = 65535  # the client's view of stream 1's send window (server's initial)
        client.pump(lambda: bool(client.server_settings))
        window = client.server_settings.get(SettingsFrame.INITIAL_WINDOW_SIZE, 65535)
        sent = 0
        chunk = b"u" * 16384
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            granted = client.window_updates.get(1, 0)
            room = window + granted - sent
            if room <= 0:
                # Dry: does any more window come within a second? It must not, for long.
                try:
                    client.pump(
                        lambda before=granted: client.window_updates.get(1, 0) > before,
                        timeout=1.0,
                    )
                except TimeoutError:
                    break
                continue
            size = min(room, len(chunk))
            client.send_body(1, chunk[:size], end_stream=False)
            sent += size
            with contextlib.suppress(TimeoutError):
                client.pump(lambda: False, timeout=0.001)  # take WINDOW_UPDATEs in
        else:
            pytest.fail(f"the window never ran dry: {sent} bytes sent")
        # Bounded: the initial window plus what the kernel and the gateway's bounded buffers
        # took, far from unbounded.
        assert sent < 1024 * 1024 + 16 * 1024 * 1024, sent
        assert sent >= 1024 * 1024
    finally:
        client.close()
        gateway.stop()
        blackhole.close()


# -- drain and reload -----------------------------------------------------------------------------


def test_drain_sends_goaway_and_finishes_open_streams(
    app_backend: AppBackend, start_gateway: Any
) -> None:
    (port,) = free_ports(1)
    gateway = start_gateway(
        {
            "listen": [{"address": f"127.0.0.1:{port}", "http2": {"enabled": True}}],
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [{"name": "all", "upstream": "app"}],
        }
    )
    client = RawH2(port)
    try:
        before = sum(1 for r in app_backend.requests if r["path"].startswith("/slow?delay=1.5"))
        client.request(1, "/slow?delay=1.5")
        client.request(3, "/echo/first")
        assert client.response(3).status == 200
        deadline = time.monotonic() + 10
        while sum(1 for r in app_backend.requests if r["path"].startswith("/slow?delay=1.5")) == (
            before
        ):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        gateway.process.send_signal(signal.SIGTERM)
        client.pump(lambda: client.goaway is not None)
        assert client.goaway is not None
        assert client.goaway.error_code == NO_ERROR
        assert client.goaway.last_stream_id == 3  # the highest stream it processed
        slow = client.response(1)
        assert slow.status == 200 and slow.body == b"slow\n"
        client.wait_closed()
        assert client.eof
        assert gateway.process.wait(20) == 0
    finally:
        client.close()


def test_reload_keeps_h2_connections_and_new_streams_see_new_routes(
    app_backend: AppBackend, start_gateway: Any
) -> None:
    (port,) = free_ports(1)
    config = {
        "listen": [{"address": f"127.0.0.1:{port}", "http2": {"enabled": True}}],
        "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
        "routes": [{"name": "old", "match": {"path": {"prefix": "/old"}}, "upstream": "app"}],
    }
    gateway = start_gateway(config)
    client = RawH2(port)
    try:
        client.request(1, "/new/x")
        assert client.response(1).status == 404
        written = yaml.safe_load(Path(gateway.config_path).read_text())
        written["routes"].append(
            {"name": "new", "match": {"path": {"prefix": "/new"}}, "upstream": "app"}
        )
        Path(gateway.config_path).write_text(yaml.safe_dump(written, sort_keys=False))
        request = urllib.request.Request(gateway.admin_url + "/admin/reload", method="POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
        client.request(3, "/new/x")  # same connection, a new stream
        response = client.response(3)
        assert response.status == 200
        assert json.loads(response.body)["path"] == "/new/x"
        assert client.goaway is None and not client.eof
    finally:
        client.close()


def test_h2_streams_are_in_the_access_log_and_metrics(
    app_backend: AppBackend, start_gateway: Any, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    log_path = tmp_path / "access.log"
    gateway = start_gateway(
        {
            "listen": [{"address": f"127.0.0.1:{port}", "http2": {"enabled": True}}],
            "access_log": {"path": str(log_path)},
            "upstreams": {"app": {"instances": [f"127.0.0.1:{app_backend.port}"]}},
            "routes": [{"name": "logged", "upstream": "app"}],
        }
    )
    client = RawH2(port)
    try:
        for n in range(3):
            client.request(1 + 2 * n, f"/echo/log{n}")
        for n in range(3):
            assert client.response(1 + 2 * n).status == 200
    finally:
        client.close()
    deadline = time.monotonic() + 10
    lines: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        if log_path.exists():
            lines = [json.loads(line) for line in log_path.read_text().splitlines() if line]
            if len([e for e in lines if e["path"].startswith("/echo/log")]) == 3:
                break
        time.sleep(0.05)
    logged = sorted(e["path"] for e in lines if e["path"].startswith("/echo/log"))
    assert logged == ["/echo/log0", "/echo/log1", "/echo/log2"]
    assert all(e["route"] == "logged" and e["status"] == 200 for e in lines)
    metrics = gateway.metrics_text()
    assert 'route="logged"' in metrics and 'code="200"' in metrics
