"""Access log: one JSON line per request, written by a thread so the event loop never blocks.

The data plane calls ``AccessLog.record(...)``, which samples, renders the line with orjson and
appends it to an in-memory batch (a list append: no IO). The proxy's periodic sweep calls
``flush()``, which hands the batch to a writer thread through a queue; the thread does the
possibly blocking ``write`` to stdout or a file. If the writer falls behind by more than
``max_pending_lines`` lines, new lines are dropped and counted instead of growing memory.
"""

from __future__ import annotations

import logging
import queue
import random
import sys
import threading
import time
from typing import IO, Any

import orjson

log = logging.getLogger("gateway.accesslog")

_STOP = object()


class AccessLog:
    def __init__(
        self, path: str = "-", sample: float = 1.0, *, max_pending_lines: int = 100_000
    ) -> None:
        self.path = path
        self.sample = sample
        self.max_pending_lines = max_pending_lines
        self.dropped = 0
        self._batch: list[bytes] = []
        self._queued = 0  # lines handed to the thread and not yet written (approximate)
        self._rng = random.Random()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stream: IO[bytes] | None = None
        self._thread = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self._thread.start()

    def record(self, entry: dict[str, Any]) -> None:
        """Queue one request's line (hot path: sampling, one orjson call, one list append)."""
        if self.sample < 1.0 and self._rng.random() >= self.sample:
            return
        if self._queued + len(self._batch) >= self.max_pending_lines:
            self.dropped += 1
            return
        self._batch.append(orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE))

    def flush(self) -> None:
        """Hand the lines gathered so far to the writer thread (called off the hot path)."""
        batch = self._batch
        if batch:
            self._batch = []
            self._queued += len(batch)
            self._queue.put(batch)

    def close(self) -> None:
        self.flush()
        self._queue.put(_STOP)
        self._thread.join(timeout=5)

    def _open(self) -> IO[bytes]:
        if self.path in ("-", "stdout"):
            return sys.stdout.buffer
        return open(self.path, "ab")  # the writer thread owns it for its lifetime

    def _write_loop(self) -> None:
        try:
            stream = self._open()
        except OSError as error:
            log.error("access log %s cannot be opened: %s; lines are dropped", self.path, error)
            stream = None
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if stream is not None:
                try:
                    stream.write(b"".join(item))
                    stream.flush()
                except OSError as error:  # full disk, closed pipe: report, keep serving
                    log.error("access log write failed: %s", error)
            self._queued -= len(item)
        if stream is not None and stream is not sys.stdout.buffer:
            stream.close()


def iso_time(epoch: float) -> str:
    """RFC 3339 UTC timestamp with milliseconds.

    One call per logged request: the formatted second is kept until the second changes
    (strftime and gmtime cost ~12k instructions; the cached path a few hundred).
    """
    global _last_second
    seconds = int(epoch)
    millis = int((epoch - seconds) * 1000)
    cached = _last_second  # one read and one store of a tuple: safe from any thread
    if cached[0] != seconds:
        cached = _last_second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
    if 0 <= millis < 1000:
        return cached[1] + _MILLIS[millis]
    return cached[1] + f".{millis:03d}Z"  # before 1970: as the formula gives it


# (second, its "%Y-%m-%dT%H:%M:%S") of the last call.
_last_second: tuple[int | None, str] = (None, "")
_MILLIS = tuple(f".{millis:03d}Z" for millis in range(1000))
