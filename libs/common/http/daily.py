"""Figures per calendar day (``GET /v1/stats/daily`` of several services, issue 20's ホーム).

A day is a calendar day in the caller's time zone (``tz``, an IANA name, default
Asia/Tokyo: the seeds' products count days in Japan time), so a send at 23:30 UTC counts on
the next Japanese day. The window is the ``days`` last days, today included, oldest first;
every day of it is in the answer, a day with nothing counted as zeros.

The SQL of each service takes the window's start (an instant) and the zone name, and groups
by ``(<time column> AT TIME ZONE $tz)::date`` over the rows at or after the start: with an
index led by the time column that reads only the window's rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from pydantic import Field

from libs.common.http.contract import DIGITS, Model, TimeZoneName

#: the longest window a caller may ask for (each day is a row of the answer).
MAX_DAYS = 92
DEFAULT_ZONE = "Asia/Tokyo"
#: a day's figures are final this long after it ended (what was in flight at midnight has
#: finished): only then does :class:`PastDays` keep them.
SETTLED_AFTER = dt.timedelta(hours=1)


class DailyQuery(Model):
    """``?days=7&tz=Asia/Tokyo``."""

    days: Annotated[int, Field(ge=1, le=MAX_DAYS), DIGITS] = Field(
        7, title="日数", description="the last N calendar days, today included"
    )
    tz: TimeZoneName = Field(DEFAULT_ZONE, title="タイムゾーン")


def window(days: int, tz: str, now: dt.datetime) -> tuple[dt.datetime, list[dt.date]]:
    """The instant the window starts (midnight of its first day in ``tz``) and its days,
    oldest first; the last is today in ``tz``."""
    zone = ZoneInfo(tz)
    today = now.astimezone(zone).date()
    dates = [today - dt.timedelta(days=days - 1 - i) for i in range(days)]
    start = dt.datetime.combine(dates[0], dt.time(), tzinfo=zone)
    return start, dates


def series(
    rows: Iterable[Mapping[str, Any]], dates: Sequence[dt.date], figures: Sequence[str]
) -> list[dict[str, Any]]:
    """One entry per day of ``dates`` (``{"date": …, <figure>: n, …}``) from rows that carry
    a ``day`` and the figures; days without a row are zeros, rows outside the days are left
    out (a row written at the window's edge while the query ran)."""
    by_day = {row["day"]: row for row in rows}
    out = []
    for day in dates:
        row = by_day.get(day)
        out.append(
            {"date": day.isoformat(), **{f: int(row[f] or 0) if row else 0 for f in figures}}
        )
    return out


def answer(
    rows: Iterable[Mapping[str, Any]], tz: str, dates: Sequence[dt.date], figures: Sequence[str]
) -> dict[str, Any]:
    """The answer body: the zone, the days, and each figure's total over them."""
    days = series(rows, dates, figures)
    totals = {f: sum(day[f] for day in days) for f in figures}
    return {"tz": tz, "days": days, "totals": totals}


class PastDays:
    """Figures of days that are over, kept once counted (per process), so a window reads
    only today's rows once its earlier days were counted.

    Only for a time column set when the row is written and never later (the sender's
    ``claimed_at``): a row cannot then join a day that is over. A day is kept once it ended
    :data:`SETTLED_AFTER` ago; days older than :data:`MAX_DAYS` are let go."""

    def __init__(self) -> None:
        self._days: dict[tuple[str, dt.date], dict[str, Any]] = {}

    def since(self, tz: str, dates: Sequence[dt.date], start: dt.datetime) -> dt.datetime:
        """The instant to count from: the window's start, or today's midnight in ``tz``
        when every earlier day of the window is kept."""
        if all((tz, day) in self._days for day in dates[:-1]):
            return dt.datetime.combine(dates[-1], dt.time(), tzinfo=ZoneInfo(tz))
        return start

    def rows(
        self,
        tz: str,
        dates: Sequence[dt.date],
        counted: Iterable[Mapping[str, Any]],
        figures: Sequence[str],
        now: dt.datetime,
    ) -> list[dict[str, Any]]:
        """The window's rows: those just counted, and the kept ones of the days they do not
        cover; keeps the settled days just counted."""
        fresh = {row["day"]: {f: row[f] for f in figures} for row in counted}
        zone = ZoneInfo(tz)
        out = []
        for day in dates:
            key = (tz, day)
            if key in self._days and day not in fresh:
                out.append({"day": day, **self._days[key]})
                continue
            values = fresh.get(day, dict.fromkeys(figures, 0))
            out.append({"day": day, **values})
            ended = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=zone)
            if now >= ended + SETTLED_AFTER:
                self._days[key] = values
        oldest = dates[-1] - dt.timedelta(days=MAX_DAYS + 1)
        for key in [k for k in self._days if k[1] < oldest]:
            del self._days[key]
        return out
