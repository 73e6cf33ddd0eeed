"""Tests for spendgate.windows: calendar window keys and ends in local time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from spendgate.windows import Period, window_end, window_key

NEW_YORK = ZoneInfo("America/New_York")
TOKYO = ZoneInfo("Asia/Tokyo")
BERLIN = ZoneInfo("Europe/Berlin")
ZONE_UTC = ZoneInfo("UTC")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


@pytest.mark.parametrize(
    ("at", "timezone", "day", "week", "month"),
    [
        # 2026-12-05 03:00 UTC is still Friday evening in New York.
        pytest.param(
            utc(2026, 12, 5, 3), NEW_YORK, "2026-12-04", "2026-W49", "2026-12", id="ny"
        ),
        pytest.param(
            utc(2026, 12, 5, 3), ZONE_UTC, "2026-12-05", "2026-W49", "2026-12", id="utc"
        ),
        # Sunday 23:59 and Monday 00:00 in New York: the ISO week turns over.
        pytest.param(
            utc(2026, 12, 7, 4, 59),
            NEW_YORK,
            "2026-12-06",
            "2026-W49",
            "2026-12",
            id="ny-sunday-night",
        ),
        pytest.param(
            utc(2026, 12, 7, 5),
            NEW_YORK,
            "2026-12-07",
            "2026-W50",
            "2026-12",
            id="ny-monday-midnight",
        ),
        # Month end in Berlin (UTC+1 in winter).
        pytest.param(
            utc(2026, 1, 31, 22, 59),
            BERLIN,
            "2026-01-31",
            "2026-W05",
            "2026-01",
            id="berlin-month-last-minute",
        ),
        pytest.param(
            utc(2026, 1, 31, 23),
            BERLIN,
            "2026-02-01",
            "2026-W05",
            "2026-02",
            id="berlin-month-first-minute",
        ),
        # Year end in New York: 2026 has 53 ISO weeks, and the week of
        # Thursday 2026-12-31 runs to Sunday 2027-01-03.
        pytest.param(
            utc(2027, 1, 1, 4, 59),
            NEW_YORK,
            "2026-12-31",
            "2026-W53",
            "2026-12",
            id="ny-year-last-minute",
        ),
        pytest.param(
            utc(2027, 1, 1, 5),
            NEW_YORK,
            "2027-01-01",
            "2026-W53",
            "2027-01",
            id="ny-year-first-minute",
        ),
        pytest.param(
            utc(2027, 1, 4, 5),
            NEW_YORK,
            "2027-01-04",
            "2027-W01",
            "2027-01",
            id="ny-first-iso-week",
        ),
        # Monday 2024-12-30 belongs to ISO week 1 of 2025.
        pytest.param(
            utc(2024, 12, 30, 12),
            ZONE_UTC,
            "2024-12-30",
            "2025-W01",
            "2024-12",
            id="week-one-in-december",
        ),
    ],
)
def test_window_key_periods(
    at: datetime, timezone: ZoneInfo, day: str, week: str, month: str
) -> None:
    assert window_key(Period.DAY, at, timezone) == day
    assert window_key(Period.WEEK, at, timezone) == week
    assert window_key(Period.MONTH, at, timezone) == month


def test_window_key_tokyo_midnight() -> None:
    before = datetime(2026, 12, 4, 23, 0, tzinfo=TOKYO)
    after = datetime(2026, 12, 5, 0, 1, tzinfo=TOKYO)

    first = window_key(Period.DAY, before, TOKYO)
    second = window_key(Period.DAY, after, TOKYO)

    assert first == "2026-12-04"
    assert second == "2026-12-05"
    # Both instants fall on 2026-12-04 in UTC, so the zone decides.
    assert window_key(Period.DAY, before, ZONE_UTC) == (
        window_key(Period.DAY, after, ZONE_UTC)
    )


def test_window_key_aware_input_any_zone() -> None:
    in_tokyo = datetime(2026, 12, 5, 0, 1, tzinfo=TOKYO)

    key = window_key(Period.DAY, in_tokyo, NEW_YORK)

    # 2026-12-05 00:01 in Tokyo is 2026-12-04 10:01 in New York.
    assert key == "2026-12-04"


@pytest.mark.parametrize(
    ("at", "expected"),
    [
        # Spring forward on 2026-03-08: the day has 23 hours, 05:00 to 04:00 UTC.
        pytest.param(utc(2026, 3, 8, 4, 59), "2026-03-07", id="spring-before"),
        pytest.param(utc(2026, 3, 8, 5), "2026-03-08", id="spring-start"),
        pytest.param(utc(2026, 3, 9, 3, 59), "2026-03-08", id="spring-last-minute"),
        pytest.param(utc(2026, 3, 9, 4), "2026-03-09", id="spring-next-day"),
        # Fall back on 2026-11-01: the day has 25 hours, 04:00 to 05:00 UTC.
        pytest.param(utc(2026, 11, 1, 3, 59), "2026-10-31", id="fall-before"),
        pytest.param(utc(2026, 11, 1, 4), "2026-11-01", id="fall-start"),
        pytest.param(utc(2026, 11, 1, 5, 30), "2026-11-01", id="fall-first-0130"),
        pytest.param(utc(2026, 11, 1, 6, 30), "2026-11-01", id="fall-second-0130"),
        pytest.param(utc(2026, 11, 2, 4, 59), "2026-11-01", id="fall-last-minute"),
        pytest.param(utc(2026, 11, 2, 5), "2026-11-02", id="fall-next-day"),
    ],
)
def test_window_key_new_york_dst(at: datetime, expected: str) -> None:
    assert window_key(Period.DAY, at, NEW_YORK) == expected


@pytest.mark.parametrize(
    ("period", "at", "timezone", "expected"),
    [
        pytest.param(
            Period.DAY, utc(2026, 12, 4, 15), NEW_YORK, utc(2026, 12, 5, 5), id="day"
        ),
        pytest.param(
            Period.DAY,
            utc(2026, 12, 5, 3),
            NEW_YORK,
            utc(2026, 12, 5, 5),
            id="day-utc-date-ahead",
        ),
        pytest.param(
            Period.DAY,
            utc(2027, 1, 1, 5),
            NEW_YORK,
            utc(2027, 1, 2, 5),
            id="day-at-local-midnight",
        ),
        pytest.param(
            Period.DAY,
            utc(2026, 3, 8, 12),
            NEW_YORK,
            utc(2026, 3, 9, 4),
            id="day-spring-forward",
        ),
        pytest.param(
            Period.DAY,
            utc(2026, 11, 1, 12),
            NEW_YORK,
            utc(2026, 11, 2, 5),
            id="day-fall-back",
        ),
        # 23:00 in Tokyo: the day ends an hour later, at 15:00 UTC.
        pytest.param(
            Period.DAY, utc(2026, 12, 4, 14), TOKYO, utc(2026, 12, 4, 15), id="tokyo"
        ),
        # Friday 2026-12-04: the ISO week ends on Monday 2026-12-07.
        pytest.param(
            Period.WEEK, utc(2026, 12, 4, 15), NEW_YORK, utc(2026, 12, 7, 5), id="week"
        ),
        pytest.param(
            Period.WEEK,
            utc(2026, 12, 7, 5),
            NEW_YORK,
            utc(2026, 12, 14, 5),
            id="week-at-monday-midnight",
        ),
        pytest.param(
            Period.WEEK,
            utc(2026, 3, 5, 12),
            NEW_YORK,
            utc(2026, 3, 9, 4),
            id="week-across-dst",
        ),
        pytest.param(
            Period.WEEK,
            utc(2026, 12, 31, 12),
            NEW_YORK,
            utc(2027, 1, 4, 5),
            id="week-53",
        ),
        pytest.param(
            Period.MONTH,
            utc(2026, 12, 4, 15),
            NEW_YORK,
            utc(2027, 1, 1, 5),
            id="month-december",
        ),
        pytest.param(
            Period.MONTH,
            utc(2026, 3, 1, 12),
            NEW_YORK,
            utc(2026, 4, 1, 4),
            id="month-across-dst",
        ),
        pytest.param(
            Period.MONTH,
            utc(2026, 1, 31, 22, 59),
            BERLIN,
            utc(2026, 1, 31, 23),
            id="month-last-minute",
        ),
        pytest.param(
            Period.MONTH,
            utc(2028, 2, 10),
            ZONE_UTC,
            utc(2028, 3, 1),
            id="month-leap-february",
        ),
    ],
)
def test_window_end_values(
    period: Period, at: datetime, timezone: ZoneInfo, expected: datetime
) -> None:
    end = window_end(period, at, timezone)

    assert end == expected
    assert end.tzinfo is UTC


@pytest.mark.parametrize("period", list(Period))
@pytest.mark.parametrize(
    "at",
    [
        pytest.param(utc(2026, 3, 8, 12), id="spring-forward"),
        pytest.param(utc(2026, 11, 1, 5, 30), id="fall-back"),
        pytest.param(utc(2026, 12, 31, 23), id="year-end"),
    ],
)
def test_window_end_bounds_key(period: Period, at: datetime) -> None:
    end = window_end(period, at, NEW_YORK)

    assert end > at
    assert window_key(period, end - timedelta(microseconds=1), NEW_YORK) == (
        window_key(period, at, NEW_YORK)
    )
    assert window_key(period, end, NEW_YORK) != window_key(period, at, NEW_YORK)


def test_window_key_rejects_naive() -> None:
    naive = datetime(2026, 12, 4, 12, 0)

    with pytest.raises(ValueError, match="timezone-aware"):
        window_key(Period.DAY, naive, NEW_YORK)


def test_window_end_rejects_naive() -> None:
    naive = datetime(2026, 12, 4, 12, 0)

    with pytest.raises(ValueError, match="timezone-aware"):
        window_end(Period.DAY, naive, NEW_YORK)
