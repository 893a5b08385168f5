"""Sending windows (配信可能時間帯): local "HH:MM" start and end in an IANA time zone.

A window with start < end is one stretch of the day (08:00–21:00); a window with
start > end crosses midnight (22:00–06:00 means from 22:00 to 06:00 the next morning);
start == end means the whole day. Start is inclusive and end exclusive.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from libs.common.errors import InvalidMessage

_HHMM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")


def parse_hhmm(value: object, field: str) -> dt.time:
    """A local time of day from ``"HH:MM"`` (00:00–23:59)."""
    match = _HHMM.match(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidMessage(f"{field} must be a time of day as HH:MM (00:00-23:59)", field=field)
    return dt.time(int(match.group(1)), int(match.group(2)))


def parse_zone(value: object, field: str = "time_zone") -> ZoneInfo:
    """An IANA time zone such as ``Asia/Tokyo``."""
    if not isinstance(value, str) or not value or value.startswith(("/", ".")):
        raise InvalidMessage(f"{field} must be an IANA time zone such as Asia/Tokyo", field=field)
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidMessage(f"unknown time zone {value!r}", field=field) from None


@dataclass(frozen=True)
class Window:
    start: dt.time
    end: dt.time
    zone: ZoneInfo

    @classmethod
    def of(cls, start: str, end: str, zone: str) -> Window:
        return cls(
            parse_hhmm(start, "window_start"), parse_hhmm(end, "window_end"), parse_zone(zone)
        )

    @property
    def crosses_midnight(self) -> bool:
        return self.start > self.end

    def contains(self, moment: dt.datetime) -> bool:
        """Whether ``moment`` (aware) falls inside the window, read in the window's zone."""
        if moment.tzinfo is None:
            raise ValueError("an aware datetime is needed")
        local = moment.astimezone(self.zone).time().replace(tzinfo=None)
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end

    def describe(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} {self.zone.key}"
