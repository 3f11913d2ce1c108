"""gRPC pure helpers: grpc-timeout, HTTP → grpc-status, Trailers-Only responses."""

from __future__ import annotations

import pytest

from gateway.proxy import grpc


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        # gRPC PROTOCOL-HTTP2: Timeout → TimeoutValue TimeoutUnit (H M S m u n).
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"100m", 0.1),
        (b"250u", 0.00025),
        (b"99999999n", 0.099999999),
        (b" 5S ", 5.0),
    ],
)
def test_parse_timeout(value: bytes, seconds: float) -> None:
    assert grpc.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        b"",  # no value
        b"S",  # no digits
        b"10",  # no unit
        b"123456789S",  # TimeoutValue is at most 8 digits
        b"10s",  # units are case-sensitive: s is not a unit
        b"-1S",
        b"1.5S",
        b"10 S",
        b"1SS",
    ],
)
def test_parse_timeout_rejects(value: bytes) -> None:
    with pytest.raises(grpc.InvalidTimeout):
        grpc.parse_timeout(value)


def test_deadline_is_capped_by_the_route_timeout() -> None:
    assert grpc.deadline(b"30S", 15.0) == 15.0
    assert grpc.deadline(b"100m", 15.0) == pytest.approx(0.1)
    assert grpc.deadline(None, 15.0) == 15.0
    assert grpc.deadline(b"2S", None) == 2.0
    assert grpc.deadline(None, None) is None


@pytest.mark.parametrize(
    ("http", "status"),
    [
        (404, grpc.UNIMPLEMENTED),  # no route
        (429, grpc.RESOURCE_EXHAUSTED),
        (503, grpc.UNAVAILABLE),
        (504, grpc.DEADLINE_EXCEEDED),
        (502, grpc.UNAVAILABLE),
        (401, grpc.UNAUTHENTICATED),
        (403, grpc.PERMISSION_DENIED),
        (400, grpc.INTERNAL),
        (200, grpc.OK),
        (418, grpc.UNKNOWN),
    ],
)
def test_status_for_http(http: int, status: int) -> None:
    assert grpc.status_for_http(http) == status


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"application/grpc;charset=utf-8", True),
        (b"Application/GRPC", True),
        (b"application/grpc-web", False),
        (b"application/grpc-web-text", False),
        (b"application/json", False),
        (None, False),
    ],
)
def test_is_grpc(content_type: bytes | None, expected: bool) -> None:
    assert grpc.is_grpc(content_type) is expected


def test_trailers_only_response() -> None:
    assert grpc.error_response(503, "no healthy instance: 100% down") == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"14"),
        (b"grpc-message", b"no healthy instance: 100%25 down"),
    ]
    assert grpc.trailers_only(grpc.OK) == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"0"),
    ]


def test_grpc_message_percent_encodes_non_ascii_and_controls() -> None:
    assert grpc.encode_message("café\n") == b"caf%C3%A9%0A"
