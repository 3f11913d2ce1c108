"""Durations and sizes as users write them, and agreement with the JSON Schema patterns."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import parse_duration, parse_size
from gateway.config.durations import DURATION_PATTERN, SIZE_PATTERN


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0.5m", 30.0),
        ("100us", 0.0001),
        ("0s", 0.0),
        ("10", None),
        ("5.", None),
        (".5s", None),
        ("5 s", None),
        ("-1s", None),
        ("5S", None),
        ("5sec", None),
        ("1m30s", None),
        ("", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    if seconds is None:
        with pytest.raises(ValueError):
            parse_duration(text)
    else:
        assert parse_duration(text) == pytest.approx(seconds)


def test_bare_number_says_what_is_expected() -> None:
    with pytest.raises(ValueError, match=r"'30' has no unit: expected a number followed by"):
        parse_duration("30")


def test_duration_rejects_non_strings() -> None:
    with pytest.raises(ValueError, match="expected a duration string"):
        parse_duration(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("64KiB", 64 * 1024),
        ("1MiB", 1024**2),
        ("1GiB", 1024**3),
        ("2TiB", 2 * 1024**4),
        ("512", 512),
        (512, 512),
        (0, 0),
        ("10KB", 10_000),
        ("3MB", 3_000_000),
        ("1GB", 10**9),
        ("7B", 7),
        ("1.5KiB", 1536),
        ("0.5B", None),
        ("1.1KB", 1100),
        ("10kb", None),
        ("10 KiB", None),
        ("-1", None),
        (-1, None),
        (True, None),
        (1.5, None),
        ("", None),
        ("KiB", None),
    ],
)
def test_parse_size(value: object, size: int | None) -> None:
    if size is None:
        with pytest.raises(ValueError):
            parse_size(value)  # type: ignore[arg-type]
    else:
        assert parse_size(value) == size  # type: ignore[arg-type]


_ALPHABET = "0123456789.smhuKMGTBi -"


@given(st.text(alphabet=_ALPHABET, max_size=8))
def test_duration_parser_agrees_with_schema_pattern(text: str) -> None:
    accepted_by_pattern = re.fullmatch(DURATION_PATTERN, text) is not None
    try:
        parse_duration(text)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == accepted_by_pattern


@given(st.text(alphabet=_ALPHABET, max_size=8))
def test_size_parser_agrees_with_schema_pattern(text: str) -> None:
    matches = re.fullmatch(SIZE_PATTERN, text) is not None
    try:
        parse_size(text)
        accepted = True
    except ValueError as exc:
        # The only thing a pattern cannot see: fractions of a byte ("0.5B").
        accepted = "whole number" in str(exc)
    assert accepted == matches
