"""RequestBody (gateway/proxy/body.py): the pending and replay buffers of a request body."""

from __future__ import annotations

import pytest

from gateway.proxy.body import PENDING_BODY_LIMIT, RequestBody


def test_held_bytes_go_out_once_and_are_kept_for_a_replay() -> None:
    body = RequestBody(replay_limit=100)
    assert body.hold(b"abc") is False
    assert body.hold(b"de") is False
    assert body.pending_bytes == 5 and not body.sent
    assert body.take_pending(5) == [b"abc", b"de"]
    assert body.take_pending(5) is None  # nothing left
    assert body.sent and body.replay == [b"abc", b"de"] and body.pending_bytes == 0


def test_hold_reports_when_the_pending_limit_is_passed() -> None:
    body = RequestBody()
    assert body.hold(b"x" * PENDING_BODY_LIMIT) is False
    assert body.hold(b"x") is True


# (name, steps, replay afterwards, replayable)
# steps: ("hold", bytes, total) | ("take", total) | ("send", bytes, total)
CASES: list[tuple[str, list[tuple[object, ...]], list[bytes] | None, bool]] = [
    ("nothing sent", [("hold", b"abc", 3)], [], True),
    ("sent within limit", [("send", b"abc", 3), ("send", b"def", 6)], [b"abc", b"def"], True),
    ("sent beyond limit", [("send", b"abc", 3), ("send", b"x" * 8, 11)], None, False),
    ("taken beyond limit", [("hold", b"x" * 11, 11), ("take", 11)], None, False),
    ("held beyond limit, not sent", [("hold", b"x" * 11, 11)], [], True),
]


@pytest.mark.parametrize(
    ("steps", "replay", "replayable"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_replay_limit(
    steps: list[tuple[object, ...]], replay: list[bytes] | None, replayable: bool
) -> None:
    body = RequestBody(replay_limit=10)
    for step in steps:
        if step[0] == "hold":
            body.hold(step[1])  # type: ignore[arg-type]
        elif step[0] == "send":
            body.sent_now(step[1], step[2])  # type: ignore[arg-type]
        else:
            body.take_pending(step[1])  # type: ignore[arg-type]
    assert body.replay == replay
    assert body.replayable is replayable


def test_rewind_puts_what_was_sent_before_what_still_waits() -> None:
    body = RequestBody(replay_limit=100)
    body.sent_now(b"sent1", 5)
    body.sent_now(b"sent2", 10)
    body.hold(b"later")
    body.rewind()
    assert body.pending == [b"sent1", b"sent2", b"later"] and body.pending_bytes == 15
    assert body.replay == []  # refilled as the next try sends
    assert body.take_pending(15) == [b"sent1", b"sent2", b"later"]
    assert body.replay == [b"sent1", b"sent2", b"later"]


def test_rewind_of_an_unreplayable_body_stays_unreplayable() -> None:
    body = RequestBody(replay_limit=2)
    body.sent_now(b"abc", 3)
    body.rewind()
    assert body.replay is None and body.pending is None and not body.replayable
