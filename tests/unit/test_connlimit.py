"""limits.max_connections counted gateway-wide: the shared per-worker slot table."""

from __future__ import annotations

import pytest

from gateway.proxy.connlimit import LocalConnectionCount, SharedConnectionCount


def test_local_count_refuses_at_the_limit_and_frees_on_close() -> None:
    count = LocalConnectionCount()
    assert [count.try_open(2) for _ in range(3)] == [True, True, False]
    count.close()
    assert count.try_open(2)
    assert count.total() == 2


def test_two_workers_share_one_limit() -> None:
    table = SharedConnectionCount.create(2)
    try:
        first = SharedConnectionCount.attach(table.spec(), 0)
        second = SharedConnectionCount.attach(table.spec(), 1)
        assert first.try_open(3) and first.try_open(3)
        assert second.try_open(3)
        # Per worker both would have room; gateway-wide the limit is reached.
        assert not second.try_open(3)
        assert not first.try_open(3)
        assert table.total() == 3
        first.close()
        assert second.try_open(3)
        assert (first.open, second.open, table.total()) == (1, 2, 3)
    finally:
        table.release()


def test_a_dead_workers_slot_is_zeroed_by_the_supervisor_and_by_its_successor() -> None:
    table = SharedConnectionCount.create(2)
    try:
        dead = SharedConnectionCount.attach(table.spec(), 1)
        assert dead.try_open(10) and dead.try_open(10)
        table.reset(1)  # the supervisor reaped it
        assert table.total() == 0
        assert dead.try_open(10)
        restarted = SharedConnectionCount.attach(table.spec(), 1)  # same index, new process
        assert restarted.open == 0 and table.total() == 0
    finally:
        table.release()


@pytest.mark.parametrize(("workers", "index"), [(0, -1), (513, -1), (2, 2)])
def test_bad_dimensions_are_refused(workers: int, index: int) -> None:
    table = SharedConnectionCount.create(2)
    try:
        with pytest.raises(ValueError):
            SharedConnectionCount(table.fd, workers, index, owner=False)
    finally:
        table.release()
