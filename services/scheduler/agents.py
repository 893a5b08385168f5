"""Kafka handlers of the scheduler: decode → process → write → (the loop commits).

- ``campaign.recipients``: the answer to a reservation's snapshot request becomes the
  campaign's recipient ledger (one row per seq; rows of other requests are ignored); the
  end marker decides between scheduled (planned = total) and failed.
- ``delivery.results``: the first result of a recipient decides its ledger row and is
  counted (a repeated result, same id or not, changes nothing); counters move the status
  (sent) or halt the campaign (F-26).
- ``send.progress``: the partitions in which a sender reached a release checkpoint.
- ``feedback.events``: opens and clicks of a campaign's recipients, each event id counted
  once in the totals, the first of each kind per recipient in the unique counts (F-34).
- ``suppression.changes``: memberships, whose changes start and end step-mail enrolments
  (F-29); results and feedback of step sends are counted per step (services/scheduler/
  stepmail.py).
- ``campaign.guard``: the complaint guard held a campaign's mail to some receiving domains
  (services/scheduler/guard.py); each guard_id has one effect.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter, defaultdict
from typing import Any

import asyncpg

from libs.common.db import claim_once, columns
from libs.common.kafka import Message, checked
from libs.common.logging import get_logger
from libs.common.metrics import SCHEDULER_GUARD_DOMAINS, SCHEDULER_HALTS, SCHEDULER_RESULTS
from services.scheduler import guard, plans, processor, stepmail, store
from services.scheduler.context import Context
from services.scheduler.store import QUERIES

log = get_logger(__name__)


def _uuid(raw: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(raw))
    except ValueError:
        return None


async def handle_recipients(ctx: Context, batch: list[Message]) -> None:
    """``campaign.recipients`` → the recipient ledger; idempotent per (request_id, seq)."""
    by_campaign: dict[uuid.UUID, list[dict[str, Any]]] = defaultdict(list)
    for message in batch:
        campaign_id = _uuid(message.value["campaign_id"])
        if campaign_id is not None:
            by_campaign[campaign_id].append(message.value)
    if not by_campaign:
        return
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        campaigns = await conn.fetch(QUERIES["reserving-campaigns"], list(by_campaign))
        for campaign in campaigns:
            if campaign["status"] != "reserving" or campaign["request_id"] is None:
                continue  # cancelled meanwhile, or an answer to a finished reservation
            request_id = str(campaign["request_id"])
            mine = [r for r in by_campaign[campaign["id"]] if r["request_id"] == request_id]
            await _apply_answer(conn, campaign["id"], mine, now)


async def _apply_answer(
    conn: asyncpg.Connection, campaign_id: uuid.UUID, records: list[dict[str, Any]], now: Any
) -> None:
    recipients = [r for r in records if r["kind"] == "recipient" and r["contact_id"] is not None]
    if recipients:
        await conn.execute(
            QUERIES["insert-recipients"],
            campaign_id,
            *columns(recipients, "seq", "contact_id"),
            [r["email"] or "" for r in recipients],
            *columns(recipients, "group_id", "membership_state"),
            [json.dumps(r["merge_values"] or {}, ensure_ascii=False) for r in recipients],
        )
    end = next((r for r in records if r["kind"] == "end"), None)
    if end is None:
        return
    if end["error"]:
        await store.transition(conn, campaign_id, "failed", now, f"snapshot failed: {end['error']}")
        return
    total = end["total"] or 0
    if total == 0:
        await store.transition(conn, campaign_id, "failed", now, "no recipients (配信対象なし)")
        return
    # One key, one partition: every recipient came before its end marker.
    size = await conn.fetchval(QUERIES["ledger-size"], campaign_id)
    if size != total:
        await store.transition(
            conn, campaign_id, "failed", now, f"recipient list incomplete: {size} of {total}"
        )
        return
    await conn.execute(QUERIES["set-planned"], campaign_id, total)
    await store.transition(conn, campaign_id, "scheduled", now, f"{total} recipients")


async def handle_results(ctx: Context, batch: list[Message]) -> None:
    """``delivery.results`` → ledger outcomes, counters, sent or halted.

    Not claimed by result id in ``processed_event``: the first result of a recipient (or of a
    step's enrolment) decides its row and only rows decided here are counted, so a repeated
    result changes nothing — and a campaign's results cost no row each in processed_event."""
    s = ctx.settings
    async with ctx.pool.acquire() as conn, conn.transaction():
        first: dict[tuple[uuid.UUID, int], dict[str, Any]] = {}
        step_results: list[dict[str, Any]] = []
        for message in batch:
            result = message.value
            if (result.get("step_id") or "").startswith(processor.TEST_STEP_PREFIX):
                continue  # test sends are never counted (F-23)
            if plans.parse_step_key(result.get("step_id")) is not None:
                step_results.append(result)
                continue
            campaign_id = _uuid(result["campaign_id"])
            if campaign_id is not None:
                first.setdefault((campaign_id, result["contact_id"]), result)
        await stepmail.record_results(conn, step_results)
        if not first:
            return
        campaign_ids = sorted({c for c, _ in first})
        # Campaign rows first, as the release loop does: no lock-order inversion with it.
        locked = {r["id"] for r in await conn.fetch(QUERIES["lock-campaigns"], campaign_ids)}
        items = [(k, r) for k, r in first.items() if k[0] in locked]
        if not items:
            return
        recorded = await conn.fetch(
            QUERIES["record-outcomes"],
            [c for (c, _), _ in items],
            [contact for (_, contact), _ in items],
            [processor.OUTCOMES.get(r["outcome"], "error") for _, r in items],
            [r["result_id"] for _, r in items],
            [r["occurred_at"] for _, r in items],
        )
        tallies: dict[uuid.UUID, Counter[str]] = defaultdict(Counter)
        for row in recorded:
            tallies[row["campaign_id"]][row["outcome"]] += 1
            SCHEDULER_RESULTS.labels(row["outcome"]).inc()
        now = ctx.clock.now()
        for campaign_id, tally in tallies.items():
            row = await conn.fetchrow(
                QUERIES["add-counts"],
                campaign_id,
                tally["success"],
                tally["error"],
                tally["suppressed"],
            )
            if row["status"] != "sending":
                continue
            counters = store.counters(row)
            if processor.should_halt(
                counters, min_attempts=s.halt_min_attempts, threshold=s.halt_error_rate
            ):
                reason = processor.halt_reason(counters, s.halt_error_rate)
                if await store.transition(conn, campaign_id, "halted", now, reason):
                    await store.publish_control(conn, campaign_id, "halt", reason, now)
                    SCHEDULER_HALTS.inc()
                    log.warning("campaign_halted", campaign_id=str(campaign_id), reason=reason)
            elif counters.outstanding == 0:
                await store.transition(
                    conn, campaign_id, "sent", now, "every recipient has a result"
                )


async def handle_progress(ctx: Context, batch: list[Message]) -> None:
    """``send.progress``: a sender reached a checkpoint in a partition of send.requests
    (idempotent: one row per checkpoint and partition), and how many of the campaign's
    deliveries senders held then (v2): the newest answer's count is the campaign's, received
    now (by the senders' reached_at: two senders' answers may land in either order)."""
    reached = [
        (checkpoint_id, m.value["partition"], m.value["reached_at"], m.value.get("held", 0))
        for m in batch
        if (checkpoint_id := _uuid(m.value["checkpoint_id"])) is not None
    ]
    if not reached:
        return
    newest = processor.newest_held(
        (campaign_id, m.value["reached_at"], m.value.get("held", 0))
        for m in batch
        if (campaign_id := _uuid(m.value["campaign_id"])) is not None
    )
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn:
        await conn.execute(
            QUERIES["record-reached"], *(list(column) for column in zip(*reached, strict=True))
        )
        # One campaign row a statement, in id order: never two locks held at once.
        for campaign_id in sorted(newest):
            counted, held = newest[campaign_id]
            await conn.execute(QUERIES["set-sender-held"], campaign_id, held, now, counted)


async def handle_feedback(ctx: Context, batch: list[Message]) -> None:
    """``feedback.events`` → campaign statistics (opens, clicks, unique opens and clicks)."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        fresh = await claim_once(conn, batch, lambda m: m.value["event_id"])
        tallies = processor.feedback_tallies(m.value for m in fresh)
        if not tallies:
            return
        # Campaign rows first, in id order, as the results handler locks them.
        await conn.fetch(QUERIES["lock-campaigns"], sorted({t.campaign_id for t in tallies}))
        await conn.execute(
            QUERIES["record-feedback"], *processor.feedback_columns(tallies), "campaign"
        )
        await stepmail.record_feedback(conn, tallies)


async def handle_memberships(ctx: Context, batch: list[Message]) -> None:
    """``suppression.changes`` → the membership copy and step-mail enrolments (F-29)."""
    changes = plans.membership_changes(m.value for m in batch)
    if not changes:
        return
    async with ctx.pool.acquire() as conn, conn.transaction():
        await stepmail.apply_memberships(conn, changes)


async def handle_guard(ctx: Context, batch: list[Message]) -> None:
    """``campaign.guard`` → the held domains of a campaign; newly held ones of a campaign
    that may still send are paused on ``campaign.control`` (pause with those domains), and
    its rows to them released without a result wait unreleased (services/scheduler/guard.py).
    A record naming a campaign this scheduler does not have is dropped with a warning."""
    records = checked(batch, guard.parse)
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        fresh = await claim_once(conn, records, lambda r: r.guard_id)
        if not fresh:
            return
        # Campaign rows first, in id order, as the other handlers and the releaser lock them:
        # a record waits for the chunk a releaser has in hand.
        campaigns = {
            row["id"]: row
            for row in await conn.fetch(
                QUERIES["lock-guarded-campaigns"], sorted({r.campaign_id for r in fresh})
            )
        }
        held: dict[uuid.UUID, set[str]] = {c: set(row["held"]) for c, row in campaigns.items()}
        for record in fresh:
            campaign = campaigns.get(record.campaign_id)
            if campaign is None:
                log.warning("campaign_guard_unknown_campaign", campaign_id=str(record.campaign_id))
                continue
            new = guard.newly_held(record.domains, held[record.campaign_id], campaign["resumed"])
            await conn.execute(
                QUERIES["record-guard"],
                record.campaign_id,
                record.guard_id,
                new,
                record.reason,
                record.delivered,
                record.complaints,
                record.decided_at,
                now,
            )
            held[record.campaign_id].update(new)
            if not new or not guard.may_send(campaign["status"]):
                log.info(
                    "campaign_guard_recorded",
                    campaign_id=str(record.campaign_id),
                    guard_id=record.guard_id,
                    held=new,
                    status=campaign["status"],
                )
                continue
            rows = await conn.fetchval(QUERIES["hold-rows"], record.campaign_id, new)
            await store.publish_control(
                conn, record.campaign_id, "pause", record.reason, now, domains=new
            )
            SCHEDULER_GUARD_DOMAINS.labels("held").inc(len(new))
            log.warning(
                "campaign_guard_held",
                campaign_id=str(record.campaign_id),
                guard_id=record.guard_id,
                domains=new,
                reason=record.reason,
                rows=rows,
            )
