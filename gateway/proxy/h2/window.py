"""Sending DATA toward an HTTP/2 peer within its windows (RFC 9113 §6.9), shared by the bridge
(``bridge.StreamBridge``) and native streams (``native_output``)."""

from __future__ import annotations

from h2.connection import H2Connection
from h2.exceptions import ProtocolError, StreamClosedError


def send_within_window(conn: H2Connection, stream_id: int, data: bytes) -> int:
    """Queue as much of ``data`` on ``stream_id`` as the stream and connection windows allow,
    in frames of at most the peer's SETTINGS_MAX_FRAME_SIZE; return how many bytes went.

    A stream that is already gone counts as all sent: nothing is owed to it any more.
    """
    try:
        window = conn.local_flow_control_window(stream_id)
    except (StreamClosedError, ProtocolError):
        return len(data)
    if window <= 0:
        return 0
    size = len(data)
    frame = conn.max_outbound_frame_size
    if size <= window and size <= frame:
        conn.send_data(stream_id, data)
        return size
    size = min(size, window)
    view = memoryview(data)
    offset = 0
    while offset < size:
        end = min(offset + frame, size)
        conn.send_data(stream_id, bytes(view[offset:end]))
        offset = end
    return size
