"""Sending windows (配信可能時間帯): local times in a zone, windows crossing midnight."""

from __future__ import annotations

import datetime as dt

import pytest

from libs.common.errors import InvalidMessage
from services.scheduler.clock import FakeClock
from services.scheduler.window import Window, parse_hhmm

UTC = dt.UTC


def at(hour: int, minute: int = 0, day: int = 26) -> dt.datetime:
    return dt.datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def test_a_day_window_in_tokyo() -> None:
    w = Window.of("08:00", "21:00", "Asia/Tokyo")  # UTC 23:00 (day before) .. 12:00
    assert not w.crosses_midnight
    assert w.contains(at(3))  # 12:00 JST
    assert w.contains(at(23, 0, day=25))  # 08:00 JST: start is inclusive
    assert not w.contains(at(22, 59, day=25))  # 07:59 JST
    assert w.contains(at(11, 59))  # 20:59 JST
    assert not w.contains(at(12))  # 21:00 JST: end is exclusive
    # The same instant written in another zone is the same answer.
    assert w.contains(at(3).astimezone(dt.timezone(dt.timedelta(hours=-5))))


def test_a_window_crossing_midnight() -> None:
    w = Window.of("22:00", "06:00", "Asia/Tokyo")
    assert w.crosses_midnight
    assert w.contains(at(13))  # 22:00 JST
    assert w.contains(at(15))  # 00:00 JST
    assert w.contains(at(20, 59))  # 05:59 JST
    assert not w.contains(at(21))  # 06:00 JST
    assert not w.contains(at(3))  # 12:00 JST


def test_daylight_saving_time_is_the_zone_business() -> None:
    w = Window.of("09:00", "17:00", "Europe/Berlin")
    assert w.contains(dt.datetime(2026, 7, 1, 7, 0, tzinfo=UTC))  # 09:00 CEST (UTC+2)
    assert not w.contains(dt.datetime(2026, 1, 15, 7, 0, tzinfo=UTC))  # 08:00 CET (UTC+1)
    assert w.contains(dt.datetime(2026, 1, 15, 8, 0, tzinfo=UTC))  # 09:00 CET


def test_equal_start_and_end_is_the_whole_day() -> None:
    w = Window.of("00:00", "00:00", "UTC")
    assert all(w.contains(at(h)) for h in range(24))


@pytest.mark.parametrize("raw", ["8:00", "24:00", "12:60", "noon", "", None, "12:00:00"])
def test_bad_times_of_day(raw: object) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_hhmm(raw, "window_start")
    assert caught.value.field == "window_start"


@pytest.mark.parametrize("zone", ["Mars/Olympus", "", "/etc/localtime", "../x", None])
def test_bad_zones(zone: object) -> None:
    with pytest.raises(InvalidMessage) as caught:
        Window.of("08:00", "21:00", zone)  # type: ignore[arg-type]
    assert caught.value.field == "time_zone"


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError):
        Window.of("08:00", "21:00", "UTC").contains(dt.datetime(2026, 1, 1, 12))
    with pytest.raises(ValueError):
        FakeClock(dt.datetime(2026, 1, 1, 12))


def test_the_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(at(3))
    assert clock.now() == clock.now() == at(3)
    assert clock.advance(minutes=90) == at(4, 30)
    clock.set(at(0))
    assert clock.now() == at(0)
