"""Days of a window in a time zone (libs/common/http/daily) and the keyset cursor
(libs/common/http/keyset): pure functions behind the stats and history routes (issue 20)."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from pydantic import ValidationError

from libs.common.errors import InvalidMessage
from libs.common.http import daily, keyset


def test_window_counts_days_in_japan_time() -> None:
    # 2026-12-04 23:30 UTC is already 12-05 08:30 in Tokyo.
    now = dt.datetime(2026, 12, 4, 23, 30, tzinfo=dt.UTC)
    start, dates = daily.window(7, "Asia/Tokyo", now)
    assert dates[-1] == dt.date(2026, 12, 5)
    assert dates[0] == dt.date(2026, 11, 29)
    assert len(dates) == 7
    assert start == dt.datetime(2026, 11, 28, 15, 0, tzinfo=dt.UTC)
    utc_start, utc_dates = daily.window(1, "UTC", now)
    assert utc_dates == [dt.date(2026, 12, 4)]
    assert utc_start == dt.datetime(2026, 12, 4, tzinfo=dt.UTC)


def test_series_fills_missing_days_and_drops_outside_rows() -> None:
    dates = [dt.date(2026, 12, 3), dt.date(2026, 12, 4), dt.date(2026, 12, 5)]
    rows = [
        {"day": dt.date(2026, 12, 4), "sent": 5, "errors": 1},
        {"day": dt.date(2026, 12, 6), "sent": 9, "errors": 9},
    ]
    body = daily.answer(rows, "Asia/Tokyo", dates, ("sent", "errors"))
    assert body["days"] == [
        {"date": "2026-12-03", "sent": 0, "errors": 0},
        {"date": "2026-12-04", "sent": 5, "errors": 1},
        {"date": "2026-12-05", "sent": 0, "errors": 0},
    ]
    assert body["totals"] == {"sent": 5, "errors": 1}


@pytest.mark.parametrize(
    "query", [{"days": "0"}, {"days": "93"}, {"days": "+7"}, {"tz": "Mars/Olympus"}, {"x": "1"}]
)
def test_daily_query_refuses(query: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        daily.DailyQuery.model_validate(query)


def test_daily_query_defaults() -> None:
    query = daily.DailyQuery.model_validate({})
    assert (query.days, query.tz) == (7, "Asia/Tokyo")


def test_cursor_round_trip() -> None:
    at = dt.datetime(2026, 12, 5, 1, 2, 3, 456789, tzinfo=dt.UTC)
    assert keyset.decode(keyset.encode(at, "spam|c-1|x")) == (at, "spam|c-1|x")


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "AAAA",
        "!!",
        _b64("2026-12-05T00:00:00|k"),  # no offset
        _b64("nonsense|k"),
        _b64("2026-12-05T00:00:00+00:00"),  # no key
        _b64("2026-12-05T00:00:00+00:00|a\x00b"),
        _b64("0001-01-01T00:00:00+00:00|k"),
    ],
)
def test_cursor_refuses_what_it_did_not_make(cursor: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        keyset.decode(cursor)
    assert caught.value.field == "cursor"


def test_past_days_are_counted_once_and_today_always() -> None:
    past = daily.PastDays()
    now = dt.datetime(2026, 12, 5, 3, 0, tzinfo=dt.UTC)  # 12:00 in Tokyo
    start, dates = daily.window(3, "Asia/Tokyo", now)
    assert past.since("Asia/Tokyo", dates, start) == start
    counted = [
        {"day": dt.date(2026, 12, 3), "sent": 7},
        {"day": dt.date(2026, 12, 5), "sent": 2},
    ]
    rows = past.rows("Asia/Tokyo", dates, counted, ("sent",), now)
    assert [r["sent"] for r in rows] == [7, 0, 2]
    # the earlier days are kept: the next read counts from today's midnight in Tokyo
    today = past.since("Asia/Tokyo", dates, start)
    assert today == dt.datetime(2026, 12, 4, 15, 0, tzinfo=dt.UTC)
    rows = past.rows("Asia/Tokyo", dates, [{"day": dates[-1], "sent": 3}], ("sent",), now)
    assert [r["sent"] for r in rows] == [7, 0, 3]
    # another zone's days are its own
    utc_start, utc_dates = daily.window(3, "UTC", now)
    assert past.since("UTC", utc_dates, utc_start) == utc_start


def test_a_day_just_over_is_not_kept_yet() -> None:
    past = daily.PastDays()
    now = dt.datetime(2026, 12, 4, 15, 30, tzinfo=dt.UTC)  # 00:30 in Tokyo
    start, dates = daily.window(2, "Asia/Tokyo", now)
    past.rows("Asia/Tokyo", dates, [{"day": dates[0], "sent": 1}], ("sent",), now)
    assert past.since("Asia/Tokyo", dates, start) == start  # yesterday may still change
    later = now + daily.SETTLED_AFTER
    past.rows("Asia/Tokyo", dates, [{"day": dates[0], "sent": 2}], ("sent",), later)
    assert past.since("Asia/Tokyo", dates, start) > start
