"""Step mail at run time (F-29): enrolments from ``suppression.changes``, the release of due
steps on ``send.requests``, and their results and feedback.

- **Enrolments** come only from events: each ``suppression.changes`` membership record is
  kept (newest version per group and contact); deliverable in a plan with a schedule starts
  an enrolment at the change's ``changed_at`` (the join time contacts gave it), any other
  state — unsubscribed, banned, left — ends it, so the remaining steps never go out. The
  scheduler never reads contacts' tables.
- **Release**: each tick, for each step whose plan's category window is open, the running
  enrolments it is due for (``steps.due_range``) and without a delivery of it are claimed —
  a ``step_delivery`` row per (step, enrolment), written in the transaction that publishes
  the requests and committed only after the broker acknowledged them. A step is therefore
  released once per enrolment, also across restarts (a crash before the commit releases it
  again, and the sender's ledger, keyed by step and enrolment, absorbs the repeat). Merge
  values are read from contacts' API at that moment, so they are current at send time; a
  contact deleted meanwhile is skipped. The send path is the campaigns' one: content on
  ``campaign.content``, the sender's can-send rule at the last moment, its ledger and relays.
- **Results and feedback** of a step (its id is the campaign id on the topics) are counted
  per step: the first result of each (step, enrolment), opens and clicks like a campaign's.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import asyncpg

from libs.common.db import columns
from libs.common.errors import TransientError
from libs.common.logging import get_logger
from libs.common.mail.content import BY_REFERENCE
from libs.common.mail.states import MembershipState
from libs.common.metrics import PLAN_ENROLMENTS, STEP_RESULTS, STEPS_RELEASED
from libs.common.topics import Topic
from services.scheduler import plans, processor, steps
from services.scheduler.contents import publish_content
from services.scheduler.context import Context
from services.scheduler.store import QUERIES
from services.scheduler.window import Window, parse_hhmm

log = get_logger(__name__)
#: most (step, enrolment) pairs released per step and tick (≤ the contacts search page).
STEP_CHUNK = 500


# Enrolments ---------------------------------------------------------------------------------


async def apply_memberships(
    conn: asyncpg.Connection, changes: Sequence[plans.MembershipChange]
) -> None:
    """Keep the newest membership changes and start or end plan enrolments from them."""
    if not changes:
        return
    applied = await conn.fetch(
        QUERIES["apply-memberships"],
        *columns(changes, "group_id", "contact_id", "state", "changed_at", "version"),
    )
    starts = [r for r in applied if r["state"] == MembershipState.DELIVERABLE]
    ends = [r for r in applied if r["state"] != MembershipState.DELIVERABLE]
    if starts:
        started = await conn.fetch(
            QUERIES["start-enrolments"],
            *columns(starts, "group_id", "contact_id", "changed_at"),
        )
        PLAN_ENROLMENTS.labels("started").inc(len(started))
    if ends:
        ended = await conn.fetch(
            QUERIES["end-enrolments"],
            *columns(ends, "group_id", "contact_id", "changed_at", "state"),
        )
        PLAN_ENROLMENTS.labels("ended").inc(len(ended))


# Release --------------------------------------------------------------------------------------


def timing_of(step: asyncpg.Record) -> steps.StepTiming:
    return steps.StepTiming(
        step["day_offset"], parse_hhmm(step["send_time"], "send_time"), step["timed_since"]
    )


async def release_due_steps(ctx: Context, now: dt.datetime) -> int:
    """One tick of step mail: every step's due enrolments, inside its window; how many
    requests went out. A contacts service that does not answer delays, never drops."""
    async with ctx.pool.acquire() as conn:
        active = await conn.fetch(QUERIES["active-steps"])
    total = 0
    for step in active:
        window = Window.of(step["window_start"], step["window_end"], step["time_zone"])
        if not window.contains(now):
            continue
        try:
            total += await release_step(ctx, step, window, now)
        except TransientError as exc:
            log.warning("step_release_delayed", step_id=str(step["id"]), error=str(exc))
    return total


async def release_step(ctx: Context, step: asyncpg.Record, window: Window, now: dt.datetime) -> int:
    due_range = steps.due_range(timing_of(step), now, window.zone)
    async with ctx.pool.acquire() as conn:
        due = await conn.fetch(
            QUERIES["due-enrolments"],
            step["plan_id"],
            step["id"],
            due_range.since,
            due_range.before,
            now,
            STEP_CHUNK,
        )
    if not due:
        return 0
    people = await ctx.contacts.contacts_by_id(sorted({r["contact_id"] for r in due}))
    content_id = await publish_content(ctx, {**step, "id": step["id"]})
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(QUERIES["lock-step"], step["id"]) is None:
            return 0  # another replica releases it, or it was removed meanwhile
        claimed = await conn.fetch(
            QUERIES["claim-step-deliveries"],
            step["id"],
            now,
            *columns(due, "id", "contact_id"),
            [None if r["contact_id"] in people else "contact deleted" for r in due],
        )
        ids = {r["enrolment_id"] for r in claimed}
        records = [
            (r["contact_id"], send_request(step, r, people[r["contact_id"]], content_id, now))
            for r in due
            if r["id"] in ids and r["contact_id"] in people
        ]
        if records:
            await asyncio.gather(*await ctx.publisher.send_keyed(Topic.SEND_REQUESTS, records))
        skipped = len(ids) - len(records)
        await conn.execute(QUERIES["add-step-released"], step["id"], len(records), skipped)
    STEPS_RELEASED.labels("released").inc(len(records))
    STEPS_RELEASED.labels("skipped").inc(skipped)
    log.info(
        "step_released",
        plan_id=step["plan_id"],
        step_id=str(step["id"]),
        released=len(records),
        skipped=skipped,
    )
    return len(records)


def send_request(
    step: Any, enrolment: Any, contact: dict[str, Any], content_id: str, now: dt.datetime
) -> dict[str, Any]:
    """The send request of one step for one enrolment, with the contact's current values."""
    return {
        "request_id": str(uuid.uuid4()),
        "campaign_id": str(step["id"]),
        "step_id": plans.step_key(step["plan_id"], enrolment["id"]),
        "contact_id": enrolment["contact_id"],
        "email": contact["email"],
        "group_id": step["plan_id"],
        "include_unsubscribed": False,
        "merge_values": processor.merge_values_of_contact(contact),
        "content": BY_REFERENCE,
        "content_id": content_id,
        "attempt": 1,
        "released_at": now,
        "test": False,
    }


# Results and feedback -------------------------------------------------------------------------


async def record_results(conn: asyncpg.Connection, results: Sequence[dict[str, Any]]) -> None:
    """``delivery.results`` of step sends: the first result of each
    (step, enrolment) decides; the step's counters move."""
    first: dict[tuple[uuid.UUID, int], dict[str, Any]] = {}
    for result in results:
        key = plans.parse_step_key(result.get("step_id"))
        if key is None:
            continue
        try:
            step_id = uuid.UUID(str(result["campaign_id"]))
        except ValueError:
            continue
        first.setdefault((step_id, key[1]), result)
    if not first:
        return
    await conn.fetch(QUERIES["lock-steps"], sorted({s for s, _ in first}))
    recorded = await conn.fetch(
        QUERIES["record-step-outcomes"],
        [s for s, _ in first],
        [e for _, e in first],
        [processor.OUTCOMES.get(r["outcome"], "error") for r in first.values()],
        [r["result_id"] for r in first.values()],
        [r["occurred_at"] for r in first.values()],
    )
    tallies: dict[uuid.UUID, Counter[str]] = defaultdict(Counter)
    for row in recorded:
        tallies[row["step_id"]][row["outcome"]] += 1
        STEP_RESULTS.labels(row["outcome"]).inc()
    for step_id, tally in tallies.items():
        await conn.execute(
            QUERIES["add-step-counts"],
            step_id,
            tally["success"],
            tally["error"],
            tally["suppressed"],
        )


async def record_feedback(
    conn: asyncpg.Connection, tallies: Sequence[processor.FeedbackTally]
) -> None:
    """Opens and clicks of step sends (their campaign id is the step's id)."""
    await conn.fetch(QUERIES["lock-steps"], sorted({t.campaign_id for t in tallies}))
    await conn.execute(QUERIES["record-feedback"], *processor.feedback_columns(tallies), "step")
