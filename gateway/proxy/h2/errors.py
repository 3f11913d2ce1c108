"""``gateway_http2_errors_total``: the RST_STREAM and GOAWAY frames the gateway sends and
receives, on client connections (``downstream``) and upstream connections (``upstream``), by
error code (docs/http2.md "Metrics and logs").

Counted where frames enter and leave ``h2``: ``CountingH2Connection`` sees every frame h2 is
asked to send (our resets, h2's own for frames on closed streams, the GOAWAY of a connection
error) and the RST_STREAM and GOAWAY frames it receives; the raw GOAWAY frames the server
writes itself (``send_goaway``) are counted there. A GOAWAY with NO_ERROR is a graceful close
(drain, an idle connection), not counted; a RST_STREAM is counted whatever its code (NO_ERROR
there ends a request body the response no longer needs, RFC 9113 §8.1; CANCEL is a call given
up). Every label value comes from a fixed set: at most 2 * 2 * 2 * 15 series.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h2.connection
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, GoAwayFrame, RstStreamFrame

if TYPE_CHECKING:
    from h2.events import Event

    from gateway.metrics import GatewayMetrics

DOWNSTREAM = "downstream"
UPSTREAM = "upstream"
SENT = "sent"
RECEIVED = "received"
RST_STREAM = "RST_STREAM"
GOAWAY = "GOAWAY"
UNKNOWN_CODE = "UNKNOWN"  # a code RFC 9113 §7 does not define (the peer may send any)

_CODE_NAMES: dict[int, str] = {int(code): code.name for code in ErrorCodes}
CODE_LABELS: tuple[str, ...] = (*_CODE_NAMES.values(), UNKNOWN_CODE)


def code_label(code: int) -> str:
    """RFC 9113 §7's name of an error code, ``UNKNOWN`` for any other value."""
    return _CODE_NAMES.get(int(code), UNKNOWN_CODE)


class ErrorCounter:
    """Where one side's frames are counted; ``metrics`` is bound once known (an upstream
    pool learns it from its first stream)."""

    __slots__ = ("metrics", "side")

    def __init__(self, side: str, metrics: GatewayMetrics | None = None) -> None:
        self.side = side
        self.metrics = metrics

    def count(self, direction: str, frame: str, code: int) -> None:
        metrics = self.metrics
        if metrics is not None:
            metrics.http2_error(self.side, direction, frame, code_label(code))


class CountingH2Connection(h2.connection.H2Connection):
    """h2's connection, counting the RST_STREAM and GOAWAY frames through it."""

    error_counter: ErrorCounter | None = None

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        counter = self.error_counter
        if counter is not None:
            for frame in frames:
                kind = type(frame)
                if kind is RstStreamFrame:
                    counter.count(SENT, RST_STREAM, frame.error_code)  # type: ignore[attr-defined]
                elif kind is GoAwayFrame and frame.error_code:  # type: ignore[attr-defined]
                    counter.count(SENT, GOAWAY, frame.error_code)  # type: ignore[attr-defined]
        super()._prepare_for_sending(frames)

    def _receive_rst_stream_frame(self, frame: RstStreamFrame) -> tuple[list[Frame], list[Event]]:
        if self.error_counter is not None:
            self.error_counter.count(RECEIVED, RST_STREAM, frame.error_code)
        return super()._receive_rst_stream_frame(frame)

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Frame], list[Event]]:
        if self.error_counter is not None and frame.error_code:
            self.error_counter.count(RECEIVED, GOAWAY, frame.error_code)
        return super()._receive_goaway_frame(frame)
