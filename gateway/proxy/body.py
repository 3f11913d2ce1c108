"""A request body on its way upstream: what waits to be sent, and what was sent (for a replay).

The body bytes of one exchange, framed as they go upstream (chunked framing re-encoded), are
either written at once, or kept as *pending* while there is no upstream connection yet (or the
read's chunked framing is still being checked). Bytes sent are kept as *replay* up to a limit,
so that a try that failed before answering can be repeated on another connection; beyond the
limit the body is no longer replayable and retries that need it are refused.

A request without body bytes never gets a ``RequestBody`` (the lifecycle creates one on its
first body byte), so a GET pays nothing here.
"""

from __future__ import annotations

# Request body kept to replay once on a fresh connection if a pooled one was stale (or, with a
# retry policy, up to its max_body_bytes if larger).
REPLAY_LIMIT = 64 * 1024
# Body buffered before the upstream is ready; beyond, the client is no longer read.
PENDING_BODY_LIMIT = 256 * 1024


class RequestBody:
    __slots__ = ("pending", "pending_bytes", "replay", "replay_limit", "sent")

    def __init__(self, replay_limit: int = REPLAY_LIMIT) -> None:
        self.pending: list[bytes] | None = None  # framed bytes waiting for the upstream
        self.pending_bytes = 0
        self.replay: list[bytes] | None = []  # framed bytes sent; None: no longer replayable
        self.replay_limit = replay_limit
        self.sent = False  # a body byte went to some upstream

    def hold(self, framed: bytes) -> bool:
        """Keep ``framed`` until the upstream can take it. True: over PENDING_BODY_LIMIT (the
        client should no longer be read)."""
        pending = self.pending
        if pending is None:
            self.pending = [framed]
        else:
            pending.append(framed)
        self.pending_bytes += len(framed)
        return self.pending_bytes > PENDING_BODY_LIMIT

    def sent_now(self, framed: bytes, total: int) -> None:
        """``framed`` was written upstream directly; ``total``: the body bytes received so far."""
        self.sent = True
        replay = self.replay
        if replay is not None:
            if total <= self.replay_limit:
                replay.append(framed)
            else:
                self.replay = None

    def take_pending(self, total: int) -> list[bytes] | None:
        """The pending bytes, to be written upstream now (they are kept for a replay)."""
        pending = self.pending
        if not pending:
            return None
        self.pending = None
        self.pending_bytes = 0
        self.sent = True
        replay = self.replay
        if replay is not None:
            if total <= self.replay_limit:
                replay.extend(pending)
            else:
                self.replay = None
        return pending

    def rewind(self) -> None:
        """Another try: what was sent goes out again first, then what still waited."""
        replay = self.replay or []
        pending = self.pending or []
        self.pending = replay + pending if replay or pending else None
        self.pending_bytes = sum(len(chunk) for chunk in self.pending) if self.pending else 0
        if self.replay is not None:
            self.replay = []

    @property
    def replayable(self) -> bool:
        """Another try can send the same body: it all fits the replay, or none was sent."""
        return self.replay is not None or not self.sent
