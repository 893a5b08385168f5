"""When a step of a step-mail plan is due (F-29), without I/O.

A step says "day N after enrolment, at HH:MM" in the plan's category time zone. For an
enrolment at ``E`` its nominal moment is ``(local date of E) + N days`` at ``HH:MM`` local
time, and it goes out at::

    due = max(nominal, E)

so a day-0 step whose time has already passed at enrolment (day 0 at 10:00, enrolled at
11:00) goes out at the next possible moment — the welcome mail is the one a new reader
expects at once — rather than being skipped. The seeds say nothing about this case; a
skipped day-0 step would mean a reader who joins after 10:00 never gets the first mail.
Outside the category's sending window a due step waits until the window opens, like a
campaign.

A step is never due for a moment before its timing was set (``timed_since``: when the step
was added, or its day or time changed): adding a day-0 step to a plan with a year of
enrolments, or moving a step earlier, must not send at once to everyone whose moment for
it has already passed. Such enrolments skip that step.

The release loop asks, per step, which enrolment times are due now: :func:`due_range`
turns the rule into a half-open range of enrolment times (an index range scan), because
``nominal <= now`` depends only on the local date of ``E``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class StepTiming:
    day_offset: int
    send_time: dt.time
    #: when the step's day/time were set; never due for a moment before it.
    timed_since: dt.datetime


def _local_midnight(day: dt.date, zone: ZoneInfo) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(0, 0), tzinfo=zone)


def nominal(step: StepTiming, enrolled_at: dt.datetime, zone: ZoneInfo) -> dt.datetime:
    """The step's moment for an enrolment: enrolment's local date + offset, at send_time."""
    day = enrolled_at.astimezone(zone).date() + dt.timedelta(days=step.day_offset)
    return dt.datetime.combine(day, step.send_time, tzinfo=zone)


def due_at(step: StepTiming, enrolled_at: dt.datetime, zone: ZoneInfo) -> dt.datetime | None:
    """When the step goes out for this enrolment, or None when it skips it (its moment had
    passed before the step's timing was set)."""
    moment = max(nominal(step, enrolled_at, zone), enrolled_at)
    return moment if moment >= step.timed_since else None


@dataclass(frozen=True)
class DueRange:
    """Enrolments with ``since <= enrolled_at < before`` and ``enrolled_at <= now``
    are due for the step now (those without a delivery of it yet)."""

    since: dt.datetime
    before: dt.datetime


def _first_date_at_or_after(moment: dt.datetime, step: StepTiming, zone: ZoneInfo) -> dt.date:
    """The earliest enrolment local date whose nominal moment is at or after ``moment``."""
    local = moment.astimezone(zone)
    candidate = local.date() - dt.timedelta(days=step.day_offset)
    if nominal(step, _local_midnight(candidate, zone), zone) < moment:
        candidate += dt.timedelta(days=1)
    return candidate


def due_range(step: StepTiming, now: dt.datetime, zone: ZoneInfo) -> DueRange:
    """The enrolment times for which the step is due at ``now``.

    ``nominal <= now`` holds exactly for enrolment dates up to the last date whose nominal
    moment has come; ``max(nominal, E) >= timed_since`` holds for ``E >= timed_since`` or
    a nominal moment at or after it, i.e. from the first date whose nominal moment is.
    """
    last_date = _first_date_at_or_after(now, step, zone)
    if nominal(step, _local_midnight(last_date, zone), zone) > now:
        last_date -= dt.timedelta(days=1)
    before = _local_midnight(last_date + dt.timedelta(days=1), zone)
    first_date = _first_date_at_or_after(step.timed_since, step, zone)
    since = min(step.timed_since, _local_midnight(first_date, zone))
    return DueRange(since=since, before=before)


def is_due(step: StepTiming, enrolled_at: dt.datetime, now: dt.datetime, zone: ZoneInfo) -> bool:
    """Whether the step is due at ``now`` for an enrolment at ``enrolled_at`` (the rule that
    :func:`due_range` answers for many enrolments at once)."""
    moment = due_at(step, enrolled_at, zone)
    return moment is not None and moment <= now
