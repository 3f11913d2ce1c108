"""Durable state of one embedded registry: a snapshot file plus an append-only journal.

Files, for a snapshot ``STATE`` (e.g. ``registry-web.json``)::

    STATE           {"version": 2, "seq": S, "instances": [...]}     rewritten by compaction
    STATE.journal   one JSON object per line: {"seq": N, "op": "put"|"del"|"hb", ...}

Every change gets the next sequence number and one journal line; a change is acknowledged only
after its line is fsync'd. Replay applies the lines with ``seq > S`` on top of the snapshot, so
replaying a line twice (a crash between a compaction's rename and its truncate) is harmless.
Compaction writes the snapshot to a temp file, fsyncs it, renames it over ``STATE``, fsyncs the
directory, then truncates the journal. A last line that was torn by a crash (no newline, or not
JSON) is ignored on load; a bad line anywhere else is reported.

This module does the file IO only; ``Registry`` decides what the records mean.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "JournalState",
    "Recovered",
    "StateLocked",
    "default_state_dir",
    "read_state",
    "record_line",
    "snapshot_document",
]

log = logging.getLogger("gateway.discovery.registry")

SNAPSHOT_VERSIONS = (1, 2)  # 1: the whole-file format before the journal (no seq)
SNAPSHOT_VERSION = 2


def default_state_dir() -> Path:
    """Where state files go unless ``state_dir`` says otherwise.

    root: ``/var/lib/pygateway`` (what a system service's StateDirectory= would be); anyone
    else: ``$XDG_STATE_HOME/pygateway``, or ``~/.local/state/pygateway`` (XDG base directories).
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/pygateway")
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):  # the spec says relative values are to be ignored
        return Path(xdg) / "pygateway"
    return Path.home() / ".local" / "state" / "pygateway"


class StateLocked(OSError):
    """Another process holds the journal's lock (two gateways sharing one state file)."""


@dataclass
class Recovered:
    """What ``read_state`` found: instance objects by id, the last seq, and any problems."""

    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    seq: int = 0
    journal_records: int = 0
    torn_tail: bool = False  # the last journal line was incomplete and was ignored
    good_journal_bytes: int = 0  # length of the journal up to the last good line
    error: str | None = None  # a bad snapshot or a bad line before the last one


def _parse_snapshot(data: bytes) -> tuple[int, list[dict[str, Any]]]:
    document = orjson.loads(data)
    if not isinstance(document, dict) or document.get("version") not in SNAPSHOT_VERSIONS:
        raise ValueError(f"expected a version {SNAPSHOT_VERSION} registry state object")
    items = document.get("instances")
    if not isinstance(items, list):
        raise ValueError("'instances' is not a list")
    seq = document.get("seq", 0)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError("'seq' is not a non-negative integer")
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ValueError("an instance entry is not an object with an id")
    return seq, items


def _apply(instances: dict[str, dict[str, Any]], record: Any) -> None:
    if not isinstance(record, dict):
        raise ValueError("a journal record is not an object")
    op = record.get("op")
    if op == "put":
        item = record.get("r")
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ValueError("a put record without an instance")
        instances[item["id"]] = item
    elif op == "del":
        instances.pop(str(record.get("id")), None)
    elif op == "hb":
        item = instances.get(str(record.get("id")))
        if item is not None:
            item["expires"] = record.get("expires")
    else:
        raise ValueError(f"unknown journal op {op!r}")


def read_state(snapshot: Path) -> Recovered:
    """Snapshot + journal replay, without taking the lock (for tools and tests).

    Raises ``ValueError`` for an unreadable snapshot; journal problems go to ``error``.
    """
    out = Recovered()
    if snapshot.exists():
        out.seq, items = _parse_snapshot(snapshot.read_bytes())
        out.instances = {item["id"]: item for item in items}
    journal = snapshot.with_name(snapshot.name + ".journal")
    try:
        data = journal.read_bytes()
    except FileNotFoundError:
        return out
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty, or a torn write
    offset = 0
    for index, line in enumerate(lines):
        is_last = index == len(lines) - 1 and not tail
        try:
            record = orjson.loads(line)
            seq = record["seq"] if isinstance(record, dict) else None
            if isinstance(seq, bool) or not isinstance(seq, int):
                raise ValueError("a journal record without an integer seq")
            if seq > out.seq:
                _apply(out.instances, record)
                out.seq = seq
                out.journal_records += 1
        except (ValueError, KeyError, TypeError) as exc:
            if is_last:  # a crash can leave the last line garbled (e.g. zero-filled)
                out.torn_tail = True
                break
            out.error = f"{journal}: line {index + 1} unreadable ({exc}); later lines dropped"
            break
        offset += len(line) + 1
    if tail:
        out.torn_tail = True
    out.good_journal_bytes = offset
    return out


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class JournalState:
    """The open journal of one registry (exclusive ``flock``) and its snapshot file."""

    def __init__(self, snapshot: Path) -> None:
        self.snapshot = snapshot
        self.journal = snapshot.with_name(snapshot.name + ".journal")
        self.fd: int | None = None
        self.journal_bytes = 0
        self.snapshot_bytes = 0
        self.compactions = 0

    def open(self) -> Recovered:
        """Lock the journal, then read the state. Problems with the files are moved aside
        (``NAME.corrupt-UNIXTIME``) and reported in ``Recovered.error``; lock or permission
        failures raise ``OSError``."""
        self.snapshot.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.journal, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateLocked(
                f"{self.journal} is locked by another process (two gateways cannot share a"
                " registry state file: give each its own state_dir)"
            ) from None
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        try:
            recovered = read_state(self.snapshot)
        except (OSError, ValueError) as exc:
            stamp = int(time.time())
            aside = self.snapshot.with_name(f"{self.snapshot.name}.corrupt-{stamp}")
            with contextlib.suppress(OSError):
                os.replace(self.snapshot, aside)
            # The journal only means something on top of its snapshot: set it aside too.
            with contextlib.suppress(OSError):
                self._copy_journal_aside(stamp)
            os.ftruncate(fd, 0)
            recovered = Recovered(
                error=f"registry state {self.snapshot} unreadable ({exc}); moved to {aside}"
            )
            return recovered
        if recovered.error is not None:
            with contextlib.suppress(OSError):
                self._copy_journal_aside(int(time.time()))
        if self.snapshot.exists():
            self.snapshot_bytes = self.snapshot.stat().st_size
        self.journal_bytes = os.fstat(fd).st_size
        return recovered

    def _copy_journal_aside(self, stamp: int) -> None:
        assert self.fd is not None
        size = os.fstat(self.fd).st_size
        if size:
            aside = self.journal.with_name(f"{self.journal.name}.corrupt-{stamp}")
            aside.write_bytes(os.pread(self.fd, size, 0))

    def _open_fd(self) -> int:
        if self.fd is None:
            raise OSError(errno.EBADF, f"{self.journal} is closed")
        return self.fd

    def append(self, data: bytes) -> None:
        """Write records (complete lines); durable only after ``sync``."""
        _write_all(self._open_fd(), data)
        self.journal_bytes += len(data)

    def sync(self) -> None:
        os.fsync(self._open_fd())

    def write_snapshot(self, data: bytes) -> None:
        """Replace the snapshot atomically: temp file, fsync, rename, fsync the directory.
        Safe to run in a thread (touches no journal state)."""
        directory = self.snapshot.parent
        tmp = directory / f".{self.snapshot.name}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.snapshot)
        _fsync_dir(directory)

    def truncate(self) -> None:
        """Empty the journal after a snapshot made its records redundant."""
        fd = self._open_fd()
        os.ftruncate(fd, 0)
        os.fsync(fd)
        self.journal_bytes = 0

    def compacted(self, snapshot_bytes: int) -> None:
        self.snapshot_bytes = snapshot_bytes
        self.compactions += 1

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock
            self.fd = None


def snapshot_document(seq: int, instances: list[dict[str, Any]]) -> bytes:
    return orjson.dumps({"version": SNAPSHOT_VERSION, "seq": seq, "instances": instances})


def record_line(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record) + b"\n"
