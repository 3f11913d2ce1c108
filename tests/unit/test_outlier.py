"""Outlier detection: consecutive failures, growing ejection time, max percent, return."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.health.outlier import OutlierDetector


def detector(**overrides: float) -> OutlierDetector:
    options: dict[str, float] = {
        "consecutive_failures": 5,
        "consecutive_gateway_failures": 3,
        "base_ejection_time": 30.0,
        "max_ejection_time": 100.0,
        "max_ejection_percent": 50.0,
    }
    options.update(overrides)
    result = OutlierDetector(**options)  # type: ignore[arg-type]
    result.set_instances(["a", "b", "c", "d"])
    return result


def fail(d: OutlierDetector, key: str, times: int, now: float, gateway: bool = True) -> bool:
    return any([d.record(key, False, gateway, now) for _ in range(times)])


def test_consecutive_gateway_failures_eject() -> None:
    d = detector()
    assert not fail(d, "a", 2, 0.0)
    assert d.record("a", False, True, 0.0) is True
    assert d.is_ejected("a", 1.0)
    info = d.info("a")
    assert info is not None and info.ejected_until == 30.0 and info.times_ejected == 1


def test_success_resets_and_non_gateway_failure_breaks_the_gateway_run() -> None:
    d = detector()
    fail(d, "a", 2, 0.0)
    d.record("a", True, False, 0.0)
    assert not fail(d, "a", 2, 0.0)
    d.record("a", False, False, 0.0)  # a 500: not a gateway failure
    assert not fail(d, "a", 1, 0.0)  # the gateway run restarted at 1 ...
    # ... but the plain failure run went on: 2 + 1 + 1 = 4, and one more makes 5.
    assert d.record("a", False, False, 0.0) is True


def test_plain_failures_eject_at_their_threshold() -> None:
    d = detector()
    assert not fail(d, "b", 4, 0.0, gateway=False)
    assert d.record("b", False, False, 0.0) is True


def test_zero_disables_a_detector() -> None:
    d = detector(consecutive_gateway_failures=0, consecutive_failures=0)
    assert not fail(d, "a", 50, 0.0)


def test_ejection_time_grows_and_is_capped() -> None:
    d = detector()
    now = 0.0
    expected = [30.0, 60.0, 90.0, 100.0, 100.0]
    for duration in expected:
        assert fail(d, "a", 3, now)
        info = d.info("a")
        assert info is not None and info.ejected_until - now == duration
        assert d.sweep(now + duration - 0.001) == []
        assert d.sweep(now + duration) == ["a"]
        assert not d.is_ejected("a", now + duration)
        now += duration  # fails again right after returning
    assert d.info("a").total_ejections == 5  # type: ignore[union-attr]


def test_multiplier_decays_while_healthy() -> None:
    d = detector()
    assert fail(d, "a", 3, 0.0)
    assert d.sweep(30.0) == ["a"]
    assert fail(d, "a", 3, 30.0)  # second ejection: 60 s
    assert d.sweep(90.0) == ["a"]
    d.sweep(90.0 + 2 * 30.0)  # two base periods in service: multiplier 2 → 0
    assert d.info("a").times_ejected == 0  # type: ignore[union-attr]
    assert fail(d, "a", 3, 200.0)
    assert d.info("a").ejected_until == 230.0  # type: ignore[union-attr]


def test_max_ejection_percent() -> None:
    d = detector()  # 4 instances, 50 %: two may be out
    assert fail(d, "a", 3, 0.0)
    assert fail(d, "b", 3, 0.0)
    assert not fail(d, "c", 3, 0.0)
    assert d.ejections_refused >= 1
    assert d.ejected_count() == 2
    d.sweep(30.0)  # a and b return: c is ejected on its next failure
    assert d.record("c", False, True, 30.0) is True


def test_at_least_one_may_always_be_ejected() -> None:
    d = detector(max_ejection_percent=10.0)  # 10 % of 4 rounds to 0: Envoy still ejects one
    assert fail(d, "a", 3, 0.0)
    assert not fail(d, "b", 3, 0.0)
    single = OutlierDetector(consecutive_gateway_failures=1, max_ejection_percent=0.0)
    single.set_instances(["only"])
    assert single.record("only", False, True, 0.0) is True


def test_failures_while_ejected_do_not_extend_it() -> None:
    d = detector()
    fail(d, "a", 3, 0.0)
    fail(d, "a", 10, 5.0)
    assert d.info("a").ejected_until == 30.0  # type: ignore[union-attr]


def test_set_instances_keeps_known_state_and_drops_removed() -> None:
    d = detector()
    fail(d, "a", 3, 0.0)
    d.set_instances(["a", "b", "e"])
    assert d.is_ejected("a", 1.0)
    assert d.info("c") is None and d.info("e") is not None
    d.set_instances(["b"])
    assert d.ejected_count() == 0
    snapshot = d.snapshot()
    assert set(snapshot) == {"b"} and snapshot["b"]["ejected"] is False


def test_is_ejected_answers_before_the_sweep() -> None:
    d = detector()
    fail(d, "a", 3, 0.0)
    assert not d.is_ejected("a", 30.0)  # time is up even if sweep has not run yet
    assert d.sweep(31.0) == ["a"]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 9), st.booleans(), st.booleans(), st.floats(0, 5)), max_size=300
    ),
    st.floats(min_value=0, max_value=100),
)
def test_never_more_than_max_percent_ejected(
    events: list[tuple[int, bool, bool, float]], percent: float
) -> None:
    d = OutlierDetector(
        consecutive_failures=2,
        consecutive_gateway_failures=1,
        base_ejection_time=3.0,
        max_ejection_time=10.0,
        max_ejection_percent=percent,
    )
    keys = [f"i{n}" for n in range(10)]
    d.set_instances(keys)
    now = 0.0
    allowed = max(1, int(10 * percent / 100 + 1e-9))
    for index, success, gateway, step in events:
        now += step
        d.sweep(now)
        d.record(keys[index], success, gateway, now)
        assert d.ejected_count() <= allowed
        assert sum(d.is_ejected(key, now) for key in keys) <= allowed


def test_validation() -> None:
    with pytest.raises(ValueError):
        OutlierDetector(base_ejection_time=10.0, max_ejection_time=5.0)
