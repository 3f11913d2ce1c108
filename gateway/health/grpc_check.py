"""The ``grpc`` active health check: one ``grpc.health.v1.Health/Check`` call (control plane).

The probe opens a fresh HTTP/2 connection (h2c, or h2 over TLS by ALPN) with the data plane's
client (``gateway.proxy.h2.client``), sends one unary call and closes the connection, so a
probe exercises what a new client would, as the HTTP probe does. It passes when the server
answers ``grpc-status: 0`` with ``status: SERVING``; NOT_SERVING, an unknown service
(``grpc-status: 5``, NOT_FOUND), any other status, a refused connection or a timeout fail.

The two messages are tiny, so they are encoded here by hand (protobuf wire format: field 1,
length-delimited string in the request; field 1, varint enum in the response) instead of
importing grpcio into the gateway:

    message HealthCheckRequest { string service = 1; }
    message HealthCheckResponse {
      enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
      ServingStatus status = 1;
    }
"""

from __future__ import annotations

import asyncio
import ssl
import struct

from gateway.proxy.grpc import GrpcStatus, decode_grpc_message
from gateway.proxy.h2.client import H2InstancePool, H2Stream, Headers, request_headers

HEALTH_CHECK_PATH = b"/grpc.health.v1.Health/Check"
SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
SERVING = 1
MAX_RESPONSE_BYTES = 64 * 1024  # a HealthCheckResponse is a few bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_request(service: str) -> bytes:
    """A length-prefixed HealthCheckRequest (5-byte gRPC message header + protobuf)."""
    name = service.encode("utf-8")
    message = b"\x0a" + _varint(len(name)) + name if name else b""  # field 1, wire type 2
    return b"\x00" + struct.pack(">I", len(message)) + message


def decode_serving_status(body: bytes) -> int:
    """The ``status`` of the one HealthCheckResponse in ``body`` (0 when absent, as proto3
    omits a default). Raises ValueError on a body that is not one uncompressed message."""
    if len(body) < 5:
        raise ValueError("the response carries no gRPC message")
    if body[0] != 0:
        raise ValueError("the response message is compressed (none was offered)")
    (length,) = struct.unpack(">I", body[1:5])
    message = body[5:]
    if len(message) != length:
        raise ValueError("the response is not exactly one gRPC message")
    status = 0
    i = 0
    while i < len(message):
        key, i = _read_varint(message, i)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, i = _read_varint(message, i)
            if field == 1:
                status = value
        elif wire_type == 2:
            size, i = _read_varint(message, i)
            i += size
        elif wire_type == 1:
            i += 8
        elif wire_type == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        if i > len(message):
            raise ValueError("truncated HealthCheckResponse")
    return status


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated or oversized varint in HealthCheckResponse")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


class _Call:
    """The StreamListener of one probe; ``done`` resolves to (ok, http status, error)."""

    def __init__(self) -> None:
        self.done: asyncio.Future[tuple[bool, int | None, str | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self.stream: H2Stream | None = None
        self.status: int | None = None
        self.fields: dict[bytes, bytes] = {}
        self.body = bytearray()

    def _finish(self, ok: bool, error: str | None) -> None:
        if not self.done.done():
            self.done.set_result((ok, self.status, error))

    def on_response_headers(self, status: int, headers: Headers) -> None:
        self.status = status
        self.fields.update(headers)

    def on_data(self, chunk: bytes) -> None:
        self.body += chunk
        if self.stream is not None:
            self.stream.acknowledge(len(chunk))
        if len(self.body) > MAX_RESPONSE_BYTES:
            if self.stream is not None:
                self.stream.reset()
            self._finish(False, "response larger than a HealthCheckResponse can be")

    def on_trailers(self, headers: Headers) -> None:
        self.fields.update(headers)

    def on_end(self) -> None:
        ok, error = self._verdict()
        self._finish(ok, error)

    def on_reset(self, error_code: int, never_processed: bool) -> None:
        self._finish(False, f"stream reset (HTTP/2 error {error_code})")

    def on_connect_error(self, error: BaseException) -> None:
        self._finish(False, f"{type(error).__name__}: {error}")

    def on_send_paused(self) -> None:
        pass

    def on_send_resumed(self) -> None:
        pass

    def _verdict(self) -> tuple[bool, str | None]:
        if self.status != 200:
            return False, f"HTTP status {self.status}"
        raw_status = self.fields.get(b"grpc-status")
        if raw_status is None:
            return False, "no grpc-status"
        try:
            code = int(raw_status)
        except ValueError:
            return False, f"invalid grpc-status {raw_status!r}"
        if code != GrpcStatus.OK:
            name = GrpcStatus(code).name if code in GrpcStatus._value2member_map_ else "?"
            message = decode_grpc_message(self.fields.get(b"grpc-message", b""))
            detail = f": {message}" if message else ""
            return False, f"grpc-status {code} ({name}){detail}"
        try:
            serving = decode_serving_status(bytes(self.body))
        except ValueError as exc:
            return False, str(exc)
        if serving != SERVING:
            return False, f"status {SERVING_STATUS.get(serving, str(serving))}"
        return True, None


async def probe_grpc(
    host: str,
    port: int,
    service: str,
    time_limit: float,
    *,
    authority: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[bool, int | None, str | None]:
    """One Health/Check call: (serving, HTTP status or None, error text or None).
    ``ssl_context`` must offer ALPN h2 (``gateway.tls.upstream.upstream_tls(alpn=H2_ALPN)``)."""
    pool = H2InstancePool(
        host,
        port,
        max_idle=0,  # the connection closes once the call is done
        idle_timeout=time_limit,
        connect_timeout=time_limit,
        ssl_context=ssl_context,
        server_hostname=server_hostname,
        max_connections=1,
        stream_window=MAX_RESPONSE_BYTES,
        connection_window=MAX_RESPONSE_BYTES,
    )
    call = _Call()
    if authority is None:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = request_headers(
        b"POST",
        b"https" if ssl_context is not None else b"http",
        authority.encode("ascii", "replace"),
        HEALTH_CHECK_PATH,
        [(b"content-type", b"application/grpc"), (b"te", b"trailers")],
    )
    call.stream = pool.open_stream(headers, False, call)
    call.stream.send_data(encode_request(service), end=True)
    try:
        async with asyncio.timeout(time_limit):
            return await asyncio.shield(call.done)
    except TimeoutError:
        call.stream.reset()
        return False, call.status, "timeout"
    finally:
        pool.close_all()
        for conn in [*pool.connections, *pool.draining]:
            conn.close()
