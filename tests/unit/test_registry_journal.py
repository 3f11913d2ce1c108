"""The registry's durable state: journal replay (torn tails, crashes mid-compaction), compaction,
locking, and where state files go by default."""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config_text
from gateway.config.model import DiscoveryConfig
from gateway.discovery.journal import JournalState, default_state_dir, read_state
from gateway.discovery.manager import registry_state_file, state_dir_of
from gateway.discovery.registry import (
    RegistrationRequest,
    Registry,
    RegistryWriteError,
    parse_registration,
)


def _request(port: int, **extra: Any) -> RegistrationRequest:
    return parse_registration({"service_name": "web", "ip": "127.0.0.1", "port": port, **extra})


def _opened(state: Path, **options: Any) -> Registry:
    registry = Registry(state, **options)
    registry.load()
    return registry


def _journal(state: Path) -> Path:
    return state.with_name(state.name + ".journal")


def test_journal_replay_ignores_a_torn_last_line(tmp_path: Path) -> None:
    state = tmp_path / "registry-web.json"
    registry = _opened(state)
    for port in (1, 2, 3):
        registry.register(_request(port))
    registry.deregister("web-127.0.0.1-2")
    registry.close()
    assert not state.exists()  # nothing compacted yet: every change is one journal line
    lines = _journal(state).read_bytes().splitlines()
    assert [json.loads(line)["op"] for line in lines] == ["put", "put", "put", "del"]

    # A crash in the middle of appending the next record leaves half a line behind.
    torn = json.dumps({"seq": 5, "op": "put", "r": {"id": "web-127.0.0.1-9"}}).encode()
    with _journal(state).open("ab") as journal:
        journal.write(torn[: len(torn) // 2])
    recovered = read_state(state)
    assert recovered.torn_tail and recovered.error is None
    assert set(recovered.instances) == {"web-127.0.0.1-1", "web-127.0.0.1-3"}

    restored = _opened(state)
    assert set(restored.entries) == {"web-127.0.0.1-1", "web-127.0.0.1-3"}
    assert restored.load_error is None
    # Opening folded the journal into the snapshot, dropping the torn tail: the next record
    # starts on a clean line and survives the next restart.
    assert _journal(state).read_bytes() == b""
    restored.register(_request(4))
    restored.close()
    assert set(_opened(state).entries) == {f"web-127.0.0.1-{p}" for p in (1, 3, 4)}


def test_a_garbled_last_line_is_torn_but_a_bad_middle_line_is_reported(tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    registration = _opened(tmp_path / "model.json").register(_request(1)).to_json()
    good = [{"seq": 1, "op": "put", "r": registration}]
    # Zero-filled tail (a crash after the size grew but before the data landed) ends in \n.
    _journal(state).write_bytes(
        b"".join(json.dumps(r).encode() + b"\n" for r in good) + b"\0\0\0\n"
    )
    recovered = read_state(state)
    assert recovered.torn_tail and recovered.error is None and len(recovered.instances) == 1

    _journal(state).write_bytes(
        json.dumps(good[0]).encode() + b"\nnot json\n" + json.dumps(good[0]).encode() + b"\n"
    )
    registry = _opened(state)
    assert registry.load_error is not None and "line 2 unreadable" in registry.load_error
    assert set(registry.entries) == {"web-127.0.0.1-1"}  # what came before the bad line
    (aside,) = tmp_path.glob("s.json.journal.corrupt-*")
    assert b"not json" in aside.read_bytes()


def test_replay_after_a_crash_between_snapshot_rename_and_journal_truncate(
    tmp_path: Path,
) -> None:
    state = tmp_path / "s.json"
    registry = _opened(state)
    registry.register(_request(1))
    registry.register(_request(2))
    journal_before = _journal(state).read_bytes()
    registry.deregister("web-127.0.0.1-1")
    registry.close()
    # Simulate: the snapshot at seq 3 was renamed into place, the journal still holds seq 1-2
    # (replayed again: they are <= the snapshot's seq and skipped) plus a later record.
    snapshot = read_state(state)
    items = list(snapshot.instances.values())
    state.write_text(json.dumps({"version": 2, "seq": snapshot.seq, "instances": items}))
    later = {"seq": snapshot.seq + 1, "op": "hb", "id": "web-127.0.0.1-2", "expires": 1e12}
    _journal(state).write_bytes(journal_before + json.dumps(later).encode() + b"\n")
    restored = _opened(state)
    assert set(restored.entries) == {"web-127.0.0.1-2"}  # the replayed put of 1 stays deleted
    assert restored.entries["web-127.0.0.1-2"].expires == 1e12


def test_version_1_state_files_are_still_read(tmp_path: Path) -> None:
    state = tmp_path / "old.json"
    item = _opened(tmp_path / "model.json").register(_request(7)).to_json()
    state.write_text(json.dumps({"version": 1, "instances": [item]}))
    assert set(_opened(state).entries) == {"web-127.0.0.1-7"}


def test_compaction_bounds_the_journal(tmp_path: Path) -> None:
    state = tmp_path / "s.json"
    registry = _opened(state, compact_min_bytes=4 * 1024)
    for port in range(1, 101):
        registry.register(_request(port, ttl="1h"))
        registry.heartbeat(f"web-127.0.0.1-{port}")
    assert registry.persistence()["compactions"] >= 2
    # The journal stays within the compaction bound instead of growing with every change.
    limit = max(4 * 1024, 2 * state.stat().st_size)
    assert _journal(state).stat().st_size <= limit + 1024
    registry.close()
    restored = _opened(state)
    assert len(restored.entries) == 100
    assert restored.next_expiry() is not None


def test_an_unused_registry_writes_nothing_and_a_second_opener_is_refused(
    tmp_path: Path,
) -> None:
    state = tmp_path / "deep" / "s.json"
    first = _opened(state)
    assert not (tmp_path / "deep").exists()  # created at the first change, not at start
    first.register(_request(1))
    second = _opened(state)
    assert second.load_error is not None and "locked by another process" in second.load_error
    with pytest.raises(RegistryWriteError, match="give each its own state_dir"):
        second.register(_request(2))
    assert set(read_state(state).instances) == {"web-127.0.0.1-1"}


def test_expiry_uses_the_deadline_heap(tmp_path: Path) -> None:
    now = [1000.0]
    registry = Registry(None, clock=lambda: now[0])
    registry.load()
    for port in range(1, 101):
        registry.register(_request(port, ttl=port))
    now[0] += 4
    registry.heartbeat("web-127.0.0.1-5")  # expires at 1004 + 5 now, not 1005
    now[0] += 4
    gone = {r.port for r in registry.expire()}
    assert gone == set(range(1, 9)) - {5}
    assert registry.next_expiry() == 1009
    now[0] += 0.5
    assert registry.expire() == [] and len(registry.entries) == 93


# --- group commit -----------------------------------------------------------------------------


async def test_group_commit_acknowledges_only_durable_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "s.json"
    registry = _opened(state)
    fsyncs: list[int] = []
    real_sync = JournalState.sync

    def counting_sync(self: JournalState) -> None:
        fsyncs.append(self.journal_bytes)
        real_sync(self)

    monkeypatch.setattr(JournalState, "sync", counting_sync)

    async def register(port: int) -> bool:
        registration = registry.register(_request(port))
        await registry.durable()
        # Acknowledged: the change is in the file already (fsync'd before durable returned).
        return registration.id in read_state(state).instances

    assert all(await asyncio.gather(*(register(port) for port in range(1, 201))))
    assert 1 <= len(fsyncs) < 200  # changes made during one fsync share the next one
    await registry.flush()
    registry.close()
    assert len(_opened(state).entries) == 200


async def test_a_failed_write_is_refused_and_the_journal_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "s.json"
    registry = _opened(state)
    registry.register(_request(1))
    await registry.durable()
    real_sync = JournalState.sync

    def full_disk(self: JournalState) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(JournalState, "sync", full_disk)
    registry.register(_request(2))
    with pytest.raises(RegistryWriteError, match="No space left"):
        await registry.durable()
    assert registry.persistence()["write_error"] is not None
    monkeypatch.setattr(JournalState, "sync", real_sync)
    registry.register(_request(3))
    await registry.durable()  # the next write rewrites the snapshot (no partial line kept)
    assert registry.persistence()["write_error"] is None
    assert registry.persistence()["compactions"] == 1
    await registry.flush()
    registry.close()
    # 2 was refused (the caller retries) but stayed in memory, so the rewrite kept it too.
    assert set(_opened(state).entries) == {f"web-127.0.0.1-{p}" for p in (1, 2, 3)}


# --- where state files go -----------------------------------------------------------------


def test_default_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "pygateway"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")  # the XDG spec: must be absolute
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "pygateway"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "pygateway"
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_state_dir() == Path("/var/lib/pygateway")


@pytest.mark.parametrize(
    ("state_dir", "state_file", "expected"),
    [
        (None, None, "{default}/registry-reg.json"),  # one file per backend, never conf/
        ("state", None, "{conf}/state/registry-reg.json"),  # relative to the config file
        ("/abs/st", None, "/abs/st/registry-reg.json"),
        ("/abs/st", "mine.json", "/abs/st/mine.json"),  # relative to state_dir
        (None, "/elsewhere/x.json", "/elsewhere/x.json"),
    ],
)
def test_registry_state_file(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    state_dir: str | None,
    state_file: str | None,
    expected: str,
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    conf = tmp_path / "conf"
    text = "discovery:\n  reg: {type: registry}\n"
    if state_dir is not None:
        text += f"state_dir: {state_dir}\n"
    config = load_config_text(text, str(conf / "gateway.yaml"))
    backend = DiscoveryConfig(name="reg", type="registry", state_file=state_file)
    path = registry_state_file(config, backend)
    default = tmp_path / "xdg" / "pygateway"
    assert path == Path(expected.format(default=default, conf=conf))
    assert state_dir_of(config) is not None


def test_a_config_from_text_without_state_dir_keeps_state_in_memory() -> None:
    config = load_config_text("discovery:\n  reg: {type: registry}\n")
    assert registry_state_file(config, config.discovery["reg"]) is None
