"""TLS end to end: listeners (SNI, 421, resumption, versions, handshake errors), client
certificates (mTLS and x-forwarded-client-cert), TLS to upstreams, with real clients (Python
ssl, curl, openssl s_client). Certificates are made per run with trustme."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.backends import AppBackend
from tests.integration.conftest import GatewayProcess, free_ports
from tests.integration.test_reload import metric
from tests.integration.tls_support import CertFiles, TLSBackend, peer_names, s_client, tls_get
from tests.metrics_text import samples


class Setup:
    def __init__(self, directory: Path) -> None:
        self.certs = CertFiles(directory)
        self.api = self.certs.issue("api", "api.test")
        self.wild = self.certs.issue("wild", "*.wild.test")
        self.client = self.certs.issue("client", "client.test")
        self.other = CertFiles(directory, "other-ca")  # a CA nobody configured
        self.rogue_client = self.other.issue("rogue", "rogue.test")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_backend(setup: Setup) -> Iterator[TLSBackend]:
    backend = TLSBackend(setup.certs, ("backend.internal",), client_ca=setup.certs.ca_path)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def impostor(setup: Setup) -> Iterator[TLSBackend]:
    """A TLS instance whose certificate (same CA) names another host."""
    backend = TLSBackend(setup.certs, ("impostor.internal",))
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    names = ("https", "mtls", "optional", "strict", "redirect")
    return dict(zip(names, free_ports(len(names)), strict=True))


@pytest.fixture(scope="module")
def tls_gateway(
    setup: Setup,
    ports: dict[str, int],
    app_backend: AppBackend,
    app_backend_2: AppBackend,
    tls_backend: TLSBackend,
    impostor: TLSBackend,
    start_gateway: Any,
) -> GatewayProcess:
    certs = setup.certs
    pair = {"cert": str(setup.api[0]), "key": str(setup.api[1])}
    client_auth = {"ca": str(certs.ca_path)}
    plain_port = free_ports(1)[0]
    backend = f"127.0.0.1:{tls_backend.port}"
    config = {
        "listen": [
            f"127.0.0.1:{plain_port}",
            {
                "address": f"127.0.0.1:{ports['redirect']}",
                "redirect_to": f"https://{{host}}:{ports['https']}",
            },
            {
                "address": f"127.0.0.1:{ports['https']}",
                "name": "https",
                "tls": {
                    "certificates": [
                        pair,
                        {"cert": str(setup.wild[0]), "key": str(setup.wild[1])},
                    ],
                    "min_version": "1.2",
                },
            },
            {
                "address": f"127.0.0.1:{ports['mtls']}",
                "name": "mtls",
                "tls": {
                    "certificates": [pair],
                    "client_auth": {**client_auth, "mode": "require"},
                    "forward_client_cert": True,
                },
            },
            {
                "address": f"127.0.0.1:{ports['optional']}",
                "name": "optional",
                "tls": {
                    "certificates": [pair],
                    "client_auth": {**client_auth, "mode": "optional"},
                    "forward_client_cert": True,
                },
            },
            {
                "address": f"127.0.0.1:{ports['strict']}",
                "name": "strict",
                "tls": {"certificates": [pair], "min_version": "1.3", "handshake_timeout": "300ms"},
            },
        ],
        "upstreams": {
            "app": {"instances": [f"127.0.0.1:{app_backend.port}"]},
            "app2": {"instances": [f"127.0.0.1:{app_backend_2.port}"]},
            "secure": {
                "instances": [backend],
                "tls": {
                    "sni": "backend.internal",
                    "ca": str(certs.ca_path),
                    "cert": str(setup.client[0]),
                    "key": str(setup.client[1]),
                },
                "retry": {"attempts": 1},
                "outlier": {"enabled": False},
            },
            "wrong-ca": {
                "instances": [backend],
                "tls": {"sni": "backend.internal", "ca": str(setup.other.ca_path)},
                "retry": {"attempts": 1},
                "outlier": {"enabled": False},
            },
            "mixed": {
                # round robin over a good instance and one whose certificate names another
                # host: its handshake fails the hostname check, a connect failure, retried
                "instances": [f"127.0.0.1:{impostor.port}", backend],
                "tls": {"sni": "backend.internal", "ca": str(certs.ca_path)},
                "retry": {"attempts": 2},
                "outlier": {"consecutive_failures": 2, "base_ejection_time": "30s"},
            },
            "unverified": {
                "instances": [backend],
                "tls": {"sni": "backend.internal", "ca": str(setup.other.ca_path), "verify": False},
                "outlier": {"enabled": False},
            },
        },
        "routes": [
            {"name": "secure", "match": {"path": {"prefix": "/secure"}}, "upstream": "secure"},
            {
                "name": "wrong-ca",
                "match": {"path": {"prefix": "/wrong-ca"}},
                "upstream": "wrong-ca",
            },
            {"name": "mixed", "match": {"path": {"prefix": "/mixed"}}, "upstream": "mixed"},
            {
                "name": "unverified",
                "match": {"path": {"prefix": "/unverified"}},
                "upstream": "unverified",
            },
            {"name": "wild", "match": {"sni": "*.wild.test"}, "upstream": "app2"},
            {"name": "default", "upstream": "app"},
        ],
    }
    gateway = start_gateway(config)
    gateway.plain_port = plain_port  # type: ignore[attr-defined]
    return gateway


def echo_headers(body: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in json.loads(body)["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


# --- SNI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_name", "host", "expected_name", "backend"),
    [
        ("api.test", "api.test", "api.test", "app-1"),  # exact name
        ("a.wild.test", "a.wild.test", "*.wild.test", "app-2"),  # wildcard; match.sni routes
        (None, "api.test", "api.test", "app-1"),  # no SNI: the default (first) certificate
        ("unknown.test", "unknown.test", "api.test", "app-1"),  # no match: the default
    ],
)
def test_sni_selects_the_certificate(
    setup: Setup,
    tls_gateway: GatewayProcess,
    ports: dict[str, int],
    server_name: str | None,
    host: str,
    expected_name: str,
    backend: str,
) -> None:
    context = setup.certs.client_context()
    context.check_hostname = False  # we look at which certificate came, not whether it fits
    status, body, facts = tls_get(ports["https"], server_name, context, host=host)
    assert peer_names(facts["peer"]) == [expected_name]
    assert facts["alpn"] == "http/1.1"
    if server_name == "unknown.test":
        assert status == 421  # SNI named a host the chosen certificate does not cover
        return
    assert status == 200, body
    assert json.loads(body)["backend"] == backend


@pytest.mark.parametrize(
    ("server_name", "host", "status"),
    [
        # RFC 9110 §15.5.20: the connection's certificate must cover the request's Host.
        ("a.wild.test", "api.test", 421),
        ("a.wild.test", "b.wild.test", 200),  # another name the wildcard covers
        ("api.test", "API.test:443", 200),  # case and port do not matter
        ("api.test", "a.wild.test", 421),
        (None, "anything.test", 200),  # without SNI nothing is claimed: no 421
    ],
)
def test_host_not_covered_by_the_sni_certificate_is_misdirected(
    setup: Setup,
    tls_gateway: GatewayProcess,
    ports: dict[str, int],
    server_name: str | None,
    host: str,
    status: int,
) -> None:
    context = setup.certs.client_context()
    context.check_hostname = False
    got, body, _ = tls_get(ports["https"], server_name, context, host=host)
    assert got == status, body
    if status == 421:
        assert json.loads(body)["error"] == "misdirected_request"


def test_curl_with_sni_and_the_ca(
    setup: Setup, tls_gateway: GatewayProcess, ports: dict[str, int]
) -> None:
    port = ports["https"]
    result = subprocess.run(
        [
            "curl", "-sS", "--cacert", str(setup.certs.ca_path),
            "--resolve", f"x.wild.test:{port}:127.0.0.1",
            f"https://x.wild.test:{port}/echo",
        ],
        capture_output=True,
        timeout=20,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["backend"] == "app-2"
    headers = echo_headers(result.stdout)
    assert headers["x-forwarded-proto"] == ["https"]
    assert "proto=https" in headers["forwarded"][0]


def test_forwarded_proto_is_http_on_the_plaintext_listener(tls_gateway: GatewayProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", tls_gateway.plain_port), timeout=10)  # type: ignore[attr-defined]
    with sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: api.test\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    headers = echo_headers(data.partition(b"\r\n\r\n")[2])
    assert headers["x-forwarded-proto"] == ["http"]
    assert "proto=http;" in headers["forwarded"][0]


def test_pipelined_requests_over_tls(
    setup: Setup, tls_gateway: GatewayProcess, ports: dict[str, int]
) -> None:
    context = setup.certs.client_context()
    raw = socket.create_connection(("127.0.0.1", ports["https"]), timeout=10)
    with context.wrap_socket(raw, server_hostname="api.test") as sock:
        sock.sendall(
            b"GET /echo/1 HTTP/1.1\r\nHost: api.test\r\n\r\n"
            b"GET /echo/2 HTTP/1.1\r\nHost: api.test\r\nconnection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 ") == 2
    assert data.index(b'"/echo/1"') < data.index(b'"/echo/2"')


@pytest.mark.parametrize(
    ("host", "target", "status", "location"),
    [
        # RFC 9110 §15.4.9: 308 keeps the method; the request target is appended as sent.
        (b"api.test", b"/echo?x=1", 308, b"https://api.test:{port}/echo?x=1"),
        (b"api.test:80", b"/", 308, b"https://api.test:{port}/"),
        (b"[::1]:80", b"/a", 308, b"https://[::1]:{port}/a"),
        (b"bad host!", b"/", 400, None),
    ],
)
def test_plaintext_listener_redirects_to_https(
    tls_gateway: GatewayProcess,
    ports: dict[str, int],
    host: bytes,
    target: bytes,
    status: int,
    location: bytes | None,
) -> None:
    with socket.create_connection(("127.0.0.1", ports["redirect"]), timeout=10) as sock:
        sock.sendall(
            b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nconnection: close\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 %d " % status), data
    if location is not None:
        expected = location.replace(b"{port}", str(ports["https"]).encode())
        assert b"\r\nlocation: " + expected + b"\r\n" in data


# --- versions, resumption, handshake errors ----------------------------------------------------


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_session_resumption_with_openssl(
    setup: Setup, tls_gateway: GatewayProcess, ports: dict[str, int], version: str, tmp_path: Path
) -> None:
    session = tmp_path / "session.pem"
    common = ["-servername", "api.test", "-CAfile", str(setup.certs.ca_path), version]
    request = b"GET /echo HTTP/1.1\r\nHost: api.test\r\nconnection: close\r\n\r\n"
    first = s_client(ports["https"], *common, "-sess_out", str(session), request=request)
    assert "HTTP/1.1 200 " in first
    assert "Verify return code: 0 (ok)" in first, first
    assert "New, TLSv1." in first
    second = s_client(ports["https"], *common, "-sess_in", str(session), request=request)
    assert "Reused, TLSv1." in second, second


def test_min_version_refuses_older_clients_and_counts_it(
    setup: Setup, tls_gateway: GatewayProcess, ports: dict[str, int]
) -> None:
    before = metric(tls_gateway, "gateway_tls_handshake_errors_total", listener="strict")
    out = s_client(ports["strict"], "-servername", "api.test", "-tls1_2")
    assert "Cipher is (NONE)" in out or "alert protocol version" in out, out
    out13 = s_client(ports["strict"], "-servername", "api.test", "-tls1_3")
    assert "TLSv1.3" in out13
    deadline = time.monotonic() + 5
    while (
        metric(tls_gateway, "gateway_tls_handshake_errors_total", listener="strict",
               reason="protocol_version") < 1
    ):  # fmt: skip
        assert time.monotonic() < deadline, tls_gateway.metrics_text()
        time.sleep(0.05)
    assert metric(tls_gateway, "gateway_tls_handshake_errors_total", listener="strict") > before


def test_bad_handshakes_are_counted_and_do_not_disturb_others(
    setup: Setup, tls_gateway: GatewayProcess, ports: dict[str, int]
) -> None:
    context = setup.certs.client_context()
    # A connection that is kept open while bad handshakes happen next to it.
    raw = socket.create_connection(("127.0.0.1", ports["strict"]), timeout=10)
    good = context.wrap_socket(raw, server_hostname="api.test")
    silent = socket.create_connection(("127.0.0.1", ports["strict"]))  # never says hello
    plain = socket.create_connection(("127.0.0.1", ports["strict"]))
    plain.sendall(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")  # HTTP to a TLS port
    deadline = time.monotonic() + 5
    while not (
        metric(tls_gateway, "gateway_tls_handshake_errors_total", listener="strict",
               reason="timeout") >= 1
        and metric(tls_gateway, "gateway_tls_handshake_errors_total", listener="strict",
                   reason="http_on_https") >= 1
    ):  # fmt: skip
        assert time.monotonic() < deadline, tls_gateway.metrics_text()
        time.sleep(0.05)
    silent.settimeout(5)
    assert silent.recv(1) == b""  # the slow handshake was cut at handshake_timeout
    with good:
        good.sendall(b"GET /echo HTTP/1.1\r\nHost: api.test\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := good.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200 ")
    silent.close()
    plain.close()


# --- client certificates -----------------------------------------------------------------------


def test_client_certificate_required(
    setup: Setup, tls_gateway: GatewayProcess, ports: dict[str, int]
) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        # TLS 1.3: the refusal arrives after the client's Finished, with the first read.
        tls_get(ports["mtls"], "api.test", setup.certs.client_context())
    with pytest.raises((ssl.SSLError, ConnectionError)):
        tls_get(ports["mtls"], "api.test", setup.certs.client_context(setup.rogue_client))
    status, body, _ = tls_get(
        ports["mtls"],
        "api.test",
        setup.certs.client_context(setup.client),
        extra=b'x-forwarded-client-cert: Hash=forged;Subject="CN=admin"\r\n',
    )
    assert status == 200, body
    (xfcc,) = echo_headers(body)["x-forwarded-client-cert"]  # the forged one is gone
    assert xfcc.startswith("Hash=") and "forged" not in xfcc
    assert 'Subject="' in xfcc
    assert "DNS=client.test" in xfcc
    assert metric(
        tls_gateway, "gateway_tls_handshake_errors_total", listener="mtls",
        reason="client_certificate",
    ) >= 1  # fmt: skip


def test_client_certificate_optional(
    setup: Setup, tls_gateway: GatewayProcess, ports: dict[str, int]
) -> None:
    status, body, _ = tls_get(
        ports["optional"],
        "api.test",
        setup.certs.client_context(),
        extra=b"x-forwarded-client-cert: Hash=forged\r\n",
    )
    assert status == 200
    assert "x-forwarded-client-cert" not in echo_headers(body)  # absent, and not injectable
    status, body, _ = tls_get(
        ports["optional"], "api.test", setup.certs.client_context(setup.client)
    )
    assert status == 200
    assert "DNS=client.test" in echo_headers(body)["x-forwarded-client-cert"][0]


def test_forwarded_client_cert_from_a_plain_listener_is_stripped(
    tls_gateway: GatewayProcess,
) -> None:
    sock = socket.create_connection(("127.0.0.1", tls_gateway.plain_port), timeout=10)  # type: ignore[attr-defined]
    with sock:
        sock.sendall(
            b"GET /echo HTTP/1.1\r\nHost: api.test\r\nconnection: close\r\n"
            b"X-Forwarded-Client-Cert: Hash=forged\r\n\r\n"
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert "x-forwarded-client-cert" not in echo_headers(data.partition(b"\r\n\r\n")[2])


# --- upstream TLS ------------------------------------------------------------------------------


def plain_get(gateway: GatewayProcess, path: str) -> tuple[int, dict[str, Any]]:
    sock = socket.create_connection(("127.0.0.1", gateway.plain_port), timeout=10)  # type: ignore[attr-defined]
    with sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: api.test\r\nconnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_upstream_tls_verified_with_sni_and_client_certificate(
    tls_gateway: GatewayProcess, tls_backend: TLSBackend
) -> None:
    tls_backend.handshakes.clear()
    status, body = plain_get(tls_gateway, "/secure/x")
    assert status == 200, body
    assert body["path"] == "/secure/x"
    assert ("backend.internal", None) in tls_backend.handshakes  # SNI was passed
    assert "client.test" in body["client_san"]  # the gateway's client certificate (mTLS)


def test_upstream_with_the_wrong_ca_is_a_clear_502(tls_gateway: GatewayProcess) -> None:
    status, body = plain_get(tls_gateway, "/wrong-ca")
    assert status == 502
    assert body["error"] == "upstream_connect_failure"
    assert "TLS handshake with backend.internal failed" in body["message"]
    assert "certificate" in body["message"].split("failed: ", 1)[1]  # OpenSSL's verify reason


def test_upstream_tls_failure_is_a_connect_failure_retried_and_ejected(
    tls_gateway: GatewayProcess,
) -> None:
    statuses = [plain_get(tls_gateway, f"/mixed/{i}")[0] for i in range(8)]
    assert statuses == [200] * 8  # every failed handshake was retried on the good instance
    assert metric(tls_gateway, "gateway_retries_total", upstream="mixed") >= 1
    deadline = time.monotonic() + 5
    while metric(tls_gateway, "gateway_upstream_instances", upstream="mixed", state="ejected") < 1:
        assert time.monotonic() < deadline, tls_gateway.metrics_text()
        time.sleep(0.05)


def test_upstream_verify_false_accepts_any_certificate(tls_gateway: GatewayProcess) -> None:
    status, body = plain_get(tls_gateway, "/unverified/y")
    assert status == 200, body
    assert body["client_cert"] is None  # no client certificate configured there
    assert "tls.verify is false" in tls_gateway.log()  # logged at start


def test_certificate_expiry_metric(tls_gateway: GatewayProcess) -> None:
    found = samples(
        tls_gateway.metrics_text(),
        "gateway_tls_certificate_expiry_timestamp_seconds",
        listener="https",
        name="*.wild.test",
    )
    assert len(found) == 1, found
    expiry = found[0].value
    assert expiry > time.time() + 86400  # trustme certificates are valid for a long time
