"""AccessLog: sampling, bounded backlog, lines written by the thread."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from gateway.accesslog import AccessLog, iso_time


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_lines_reach_the_file_after_flush(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    for i in range(3):
        log.record({"n": i})
    assert _lines(path) == []  # nothing written before a flush
    log.flush()
    deadline = time.monotonic() + 5
    while len(_lines(path)) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    log.close()
    assert [line["n"] for line in _lines(path)] == [0, 1, 2]


def test_sampling_zero_logs_nothing(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path), sample=0.0)
    for i in range(100):
        log.record({"n": i})
    log.close()
    assert _lines(path) == []


def test_backlog_is_bounded_and_drops_are_counted(tmp_path: Path) -> None:
    log = AccessLog(str(tmp_path / "access.log"), max_pending_lines=10)
    for i in range(25):
        log.record({"n": i})
    assert log.dropped == 15
    log.close()


def test_unwritable_path_is_reported_and_its_lines_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "missing-dir" / "access.log"
    with caplog.at_level(logging.ERROR, logger="gateway.accesslog"):
        log = AccessLog(str(path))
        log.record({"n": 1})  # the data plane never sees the error
        log.close()
    assert not log._thread.is_alive()  # the writer consumed its queue and stopped
    assert log._queued == 0  # the batch was dropped, not left pending
    assert not path.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"access log {path} cannot be opened: [Errno 2] No such file or directory: "
        f"'{path}'; lines are dropped"
    ]


def test_iso_time() -> None:
    assert iso_time(0.25) == "1970-01-01T00:00:00.250Z"


# RFC 3339 §5.6 date-time, UTC, milliseconds; consecutive calls within, across and back across
# a second must each give their own second (the formatted second is cached).
@pytest.mark.parametrize(
    ("epochs", "expected"),
    [
        (
            [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25],
            [
                "2023-11-14T22:13:20.000Z",
                "2023-11-14T22:13:20.999Z",
                "2023-11-14T22:13:21.500Z",
                "2023-11-14T22:13:20.250Z",
            ],
        ),
        ([86_399.9999, 86_400.0], ["1970-01-01T23:59:59.999Z", "1970-01-02T00:00:00.000Z"]),
        ([-0.25], ["1970-01-01T00:00:00.-250Z"]),  # before 1970: what the formula always gave
    ],
)
def test_iso_time_sequences(epochs: list[float], expected: list[str]) -> None:
    assert [iso_time(epoch) for epoch in epochs] == expected
