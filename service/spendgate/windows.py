"""Calendar budget windows in the organisation's timezone.

A window is named by its calendar period, so no reset job exists: a new day,
ISO week or month is a new ledger row that starts empty.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo


class Period(enum.StrEnum):
    """Length of a budget window."""

    DAY = "day"
    WEEK = "week"
    MONTH = "month"


def window_key(period: Period, at: datetime, timezone: ZoneInfo) -> str:
    """Name the window of `period` that contains the instant `at`.

    Days read 2026-12-04, ISO weeks (starting on Monday) 2026-W49, months
    2026-12. `at` must be timezone-aware.
    """
    if at.tzinfo is None:
        raise ValueError("window_key needs a timezone-aware datetime")
    local = at.astimezone(timezone)
    if period is Period.DAY:
        return local.strftime("%Y-%m-%d")
    if period is Period.WEEK:
        year, week, _ = local.isocalendar()
        return f"{year}-W{week:02d}"
    return local.strftime("%Y-%m")


def window_end(period: Period, at: datetime, timezone: ZoneInfo) -> datetime:
    """Return the UTC instant at which the window containing `at` ends."""
    if at.tzinfo is None:
        raise ValueError("window_end needs a timezone-aware datetime")
    local = at.astimezone(timezone)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    if period is Period.DAY:
        end = midnight + timedelta(days=1)
    elif period is Period.WEEK:
        end = midnight + timedelta(days=7 - local.weekday())
    elif local.month == 12:
        end = midnight.replace(year=local.year + 1, month=1, day=1)
    else:
        end = midnight.replace(month=local.month + 1, day=1)
    return end.replace(tzinfo=timezone).astimezone(UTC)
