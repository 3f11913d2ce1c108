"""The hand-encoded grpc.health.v1 messages of the grpc health check, checked byte for byte
against protobuf's own encoder (grpcio-health-checking's generated messages, tests only), and
the config keys health.type / health.service."""

from __future__ import annotations

import textwrap

import pytest
from grpc_health.v1 import health_pb2

from gateway.config import ConfigInvalid, load_config_text
from gateway.health.grpc_check import decode_serving_status, encode_request


def framed(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


@pytest.mark.parametrize(
    "service",
    ["", "pkg.Service", "grpc.health.v1.Health", "x" * 200, "caf\u00e9.Service"],
)
def test_request_encoding_matches_protobuf(service: str) -> None:
    expected = framed(health_pb2.HealthCheckRequest(service=service).SerializeToString())
    assert encode_request(service) == expected


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"", 0),  # proto3: UNKNOWN (0) is not written
        (b"\x08\x01", 1),  # field 1 varint SERVING
        (b"\x08\x02", 2),  # NOT_SERVING
        (b"\x08\x03", 3),  # SERVICE_UNKNOWN
        (b"\x12\x03abc\x08\x01", 1),  # an unknown length-delimited field is skipped
        (b"\x08\x02\x08\x01", 1),  # the last value of a repeated scalar wins
        (b"\x18\x96\x01\x08\x01", 1),  # an unknown varint field (150) is skipped
    ],
)
def test_response_decoding(raw: bytes, status: int) -> None:
    assert decode_serving_status(framed(raw)) == status


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_response_decoding_reads_protobuf_output(status: int) -> None:
    message = health_pb2.HealthCheckResponse(status=status).SerializeToString()  # type: ignore[arg-type]
    assert decode_serving_status(framed(message)) == status


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "no gRPC message"),
        (b"\x01\x00\x00\x00\x02\x08\x01", "compressed"),
        (b"\x00\x00\x00\x00\x05\x08\x01", "not exactly one"),  # length says 5, 2 follow
        (framed(b"\x08"), "truncated"),  # a key with no value
        (framed(b"\x12\x09ab"), "truncated"),  # a string longer than the message
        (framed(b"\x0b"), "wire type 3"),  # start-group: not used by proto3
    ],
)
def test_response_decoding_rejects_malformed(body: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        decode_serving_status(body)


BASE = "upstreams:\n  a:\n    instances: [127.0.0.1:9001]\n    health: {HEALTH}\nroutes: []\n"


def test_health_type_and_service_are_read() -> None:
    cfg = load_config_text(BASE.replace("{HEALTH}", "{type: grpc, service: pkg.Users}"))
    health = cfg.upstreams["a"].health
    assert health is not None and (health.type, health.service) == ("grpc", "pkg.Users")
    default = load_config_text(BASE.replace("{HEALTH}", "{}")).upstreams["a"].health
    assert default is not None and (default.type, default.service) == ("http", "")
    whole_server = load_config_text(BASE.replace("{HEALTH}", "{type: grpc}")).upstreams["a"]
    assert whole_server.health is not None and whole_server.health.service == ""


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        (
            "{service: pkg.Users}",
            "gateway.yaml:4: upstreams.a.health.service: only meaningful with type: grpc",
        ),
        (
            "{type: thrift}",
            "gateway.yaml:4: upstreams.a.health.type: 'thrift' is not one of http, grpc",
        ),
    ],
)
def test_health_type_errors_name_file_line_key(health: str, expected: str) -> None:
    with pytest.raises(ConfigInvalid) as info:
        load_config_text(textwrap.dedent(BASE.replace("{HEALTH}", health)), "gateway.yaml")
    assert expected in [str(e) for e in info.value.errors]
