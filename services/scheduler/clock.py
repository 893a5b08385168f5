"""The scheduler's notion of now, injectable so tests move time instead of waiting.

Every decision that depends on time — is ``scheduled_at`` due, is the category's window
open, is the aggregation period over, is a new ``scheduled_at`` far enough ahead — asks
``context.clock.now()``. A test replaces the clock of a running service::

    from services.scheduler.clock import FakeClock
    from services.scheduler.context import context_of

    clock = FakeClock(dt.datetime(2026, 11, 26, 3, 0, tzinfo=dt.UTC))
    context_of(service.runtime).clock = clock
    clock.advance(minutes=10)      # or clock.set(...)
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """The current time, timezone-aware."""
        ...


class SystemClock:
    """The wall clock, in UTC."""

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC)


class FakeClock:
    """A clock that stands still until told to move (tests)."""

    def __init__(self, at: dt.datetime) -> None:
        self.set(at)

    def set(self, at: dt.datetime) -> None:
        if at.tzinfo is None:
            raise ValueError("FakeClock needs an aware datetime")
        self._now = at

    def advance(self, **delta: float) -> dt.datetime:
        """Move forward by ``timedelta(**delta)``; returns the new now."""
        self._now += dt.timedelta(**delta)
        return self._now

    def now(self) -> dt.datetime:
        return self._now
