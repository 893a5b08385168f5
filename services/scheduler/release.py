"""The release loop (§9 Sending): one tick every ``SCHEDULER_TICK_SECONDS``.

Each tick, with the context's clock:

1. a ``scheduled`` campaign whose time has come starts ``sending`` once its category's
   window is open (until then it stays 未配信 and may still be cancelled);
2. each ``sending`` campaign, locked for this process (``FOR NO KEY UPDATE SKIP LOCKED``, so
   two replicas never release the same campaign and a halt waits for the chunk in hand):
   outside the window it pauses (``campaign.control`` pause, once); when the window opens
   again it resumes (``resume``) and rows released without a result go out again with
   attempt + 1, as do rows a sender passed without a result (a request or result a broker
   lost: services/scheduler/checkpoints.py) and rows without a result for
   ``SCHEDULER_RESULT_TIMEOUT_SECONDS`` (up to ``SCHEDULER_MAX_RELEASES`` releases, then the
   campaign is sent without them); inside the window it releases the next rows of its
   ledger at the paced rate — published directly in per-partition batches, marked released
   (with the chunk's release mark) only after the broker acknowledged them (at least once:
   the sender's ledger absorbs duplicates) — but no row to a receiving domain the complaint
   guard holds (services/scheduler/guard.py) until an operator resumes it; such rows keep
   the campaign sending. The requests name the campaign's content by id;
   the content itself goes out once, on ``campaign.content``, acknowledged before the first
   request naming it;
3. ``sent`` becomes ``aggregating``, and ``aggregating`` becomes ``aggregated`` once the
   aggregation period has passed;
4. due steps of step-mail plans go out (services/scheduler/stepmail.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from libs.common import trace
from libs.common.errors import is_transient
from libs.common.logging import get_logger
from libs.common.mail.content import BY_REFERENCE
from libs.common.metrics import (
    SCHEDULER_CAMPAIGNS,
    SCHEDULER_RELEASED,
    SCHEDULER_WINDOW_PAUSED,
)
from libs.common.topics import Topic
from services.scheduler import checkpoints, processor, requests, status, stepmail, store
from services.scheduler.contents import publish_content
from services.scheduler.context import Context
from services.scheduler.store import QUERIES
from services.scheduler.window import Window

log = get_logger(__name__)
#: refresh the campaigns-by-status gauges every this many ticks.
GAUGE_TICKS = 10


@dataclass
class Bucket:
    """A token bucket: ``rate`` releases per second, at most one second's worth saved."""

    rate: float
    tokens: float
    at: float

    def refill(self, now: float, rate: float) -> int:
        self.rate = rate
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return int(self.tokens)


async def run(ctx: Context, beat: Callable[[], None]) -> None:
    """Tick until cancelled; a tick that meets an unreachable dependency is retried next time.
    ``beat`` once a tick (a tick stuck on a hung call fails /healthz)."""
    interval = ctx.settings.tick_seconds
    while True:
        beat()
        started = time.monotonic()
        try:
            await tick(ctx)
        except Exception as exc:
            if not is_transient(exc):
                raise
            log.warning("release_tick_failed", error=repr(exc))
        ctx.ticks += 1
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


async def tick(ctx: Context) -> None:
    now = ctx.clock.now()
    await start_due(ctx, now)
    async with ctx.pool.acquire() as conn:
        sending = [r["id"] for r in await conn.fetch(QUERIES["sending-campaigns"])]
    for campaign_id in sending:
        await release_campaign(ctx, campaign_id, now)
    for gone in set(ctx.buckets) - {str(c) for c in sending}:
        del ctx.buckets[gone]
    for gone in set(ctx.overdue_checked) - {str(c) for c in sending}:
        del ctx.overdue_checked[gone]
    for gone in set(ctx.checkpoint_issued) - {str(c) for c in sending}:
        del ctx.checkpoint_issued[gone]
    await finish(ctx, now)
    await stepmail.release_due_steps(ctx, now)
    if ctx.ticks % GAUGE_TICKS == 0:
        await update_gauges(ctx)


async def start_due(ctx: Context, now: dt.datetime) -> None:
    async with ctx.pool.acquire() as conn:
        for row in await conn.fetch(QUERIES["due-campaigns"], now):
            window = Window.of(row["window_start"], row["window_end"], row["time_zone"])
            if window.contains(now):
                async with conn.transaction():
                    await store.transition(
                        conn, row["id"], "sending", now, "scheduled time reached"
                    )


async def release_campaign(ctx: Context, campaign_id: uuid.UUID, now: dt.datetime) -> int:
    """One tick of one sending campaign, in the trace of the request that reserved it;
    returns how many requests it released."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        campaign = await conn.fetchrow(QUERIES["lock-sending-campaign"], campaign_id)
        if campaign is None:
            return 0  # another replica holds it, or it stopped sending meanwhile
        with trace.bound(campaign["traceparent"]):
            return await _release(ctx, conn, campaign, now)


async def _release(
    ctx: Context, conn: asyncpg.Connection, campaign: asyncpg.Record, now: dt.datetime
) -> int:
    campaign_id = campaign["id"]
    window = Window.of(campaign["window_start"], campaign["window_end"], campaign["time_zone"])
    key = str(campaign_id)
    if not window.contains(now):
        if not campaign["paused"]:
            reason = f"outside sending window {window.describe()}"
            await conn.execute(QUERIES["set-paused"], campaign_id, True)
            await store.publish_control(conn, campaign_id, "pause", reason, now)
            log.info("campaign_paused", campaign_id=key, reason=reason)
        ctx.buckets.pop(key, None)
        return 0
    if campaign["paused"]:
        await conn.execute(QUERIES["set-paused"], campaign_id, False)
        await store.publish_control(
            conn, campaign_id, "resume", f"sending window {window.describe()} open", now
        )
        again = await conn.execute(QUERIES["unrelease-pending"], campaign_id)
        log.info("campaign_resumed", campaign_id=key, released_again=again)
    elif await overdue(ctx, conn, campaign, now):
        return 0
    else:
        await checkpoints.tend(ctx, conn, campaign, now)
    bucket = ctx.buckets.get(key)
    clock = time.monotonic()
    if bucket is None:
        rate = ctx.release_rate
        bucket = ctx.buckets[key] = Bucket(rate, rate * ctx.settings.tick_seconds, clock)
    budget = min(bucket.refill(clock, ctx.release_rate), ctx.settings.release_chunk)
    if budget <= 0:
        return 0
    # Rows to a domain the complaint guard holds wait (services/scheduler/guard.py).
    rows = await conn.fetch(QUERIES["unreleased"], campaign_id, budget, list(campaign["held"]))
    if not rows:
        return 0
    content_id = await publish_content(ctx, campaign)
    records = requests.chunk_records(
        campaign_id=key,
        include_unsubscribed=campaign["include_unsubscribed"],
        content=BY_REFERENCE,
        content_id=content_id,
        released_at=now,
        recipients=rows,
    )
    traced = trace.headers()
    if traced:  # the chunk's records share one header list
        shared = records[0][2] + traced
        records = [(contact, data, shared) for contact, data, _ in records]
    await asyncio.gather(*await ctx.publisher.send_encoded(Topic.SEND_REQUESTS, records))
    first = sum(1 for r in rows if r["attempt"] == 0)
    mark = await conn.fetchval(QUERIES["add-released"], campaign_id, first, len(rows) - first)
    await conn.execute(QUERIES["mark-released"], campaign_id, now, [r["seq"] for r in rows], mark)
    bucket.tokens -= len(rows)
    SCHEDULER_RELEASED.labels("first").inc(first)
    SCHEDULER_RELEASED.labels("again").inc(len(rows) - first)
    return len(rows)


async def overdue(
    ctx: Context, conn: asyncpg.Connection, campaign: asyncpg.Record, now: dt.datetime
) -> bool:
    """Rows released ``SCHEDULER_RESULT_TIMEOUT_SECONDS`` ago without a result (a request
    dead-lettered or lost, with no checkpoint answered to tell sooner) go out again, up to
    ``SCHEDULER_MAX_RELEASES`` releases; once no row is worth waiting for — each at its last
    release, and that release timed out or a confirmed checkpoint covers it — the campaign is
    ``sent`` with those rows unsent (a late result still counts). Neither while the newest
    checkpoint answer says senders hold some of its mail for its domains' pace
    (processor.senders_hold): that mail is on its way. True when it was sent. Looked
    for at most every minute (it reads every row of the campaign without a result), with the
    context's clock."""
    s = ctx.settings
    campaign_id = campaign["id"]
    key = str(campaign_id)
    timeout = dt.timedelta(seconds=s.result_timeout_seconds)
    checked = ctx.overdue_checked.get(key)
    if checked is not None and now - checked < min(timeout / 4, dt.timedelta(minutes=1)):
        return False
    ctx.overdue_checked[key] = now
    cutoff = now - timeout
    if processor.senders_hold(campaign["sender_held"], campaign["sender_held_at"], cutoff):
        return False  # held for its domains' pace: not lost, not to be given up
    again = await conn.fetchval(QUERIES["unrelease-overdue"], campaign_id, cutoff, s.max_releases)
    if again:
        log.warning("results_overdue_released_again", campaign_id=key, rows=again)
        return False
    row = await conn.fetchrow(
        QUERIES["unanswered"], campaign_id, cutoff, s.max_releases, campaign["confirmed_mark"]
    )
    if row["unanswered"] == 0 or row["waiting"] > 0:
        return False
    reason = f"{row['unanswered']} recipient(s) without a result after {s.max_releases} releases"
    if await store.transition(conn, campaign_id, "sent", now, reason):
        log.warning("campaign_given_up_waiting", campaign_id=key, unanswered=row["unanswered"])
    return True


async def finish(ctx: Context, now: dt.datetime) -> None:
    """sent → aggregating at once; aggregating → aggregated after the aggregation period."""
    period = dt.timedelta(seconds=ctx.settings.aggregation_seconds)
    async with ctx.pool.acquire() as conn:
        for row in await conn.fetch(QUERIES["finished-sending"]):
            async with conn.transaction():
                await store.transition(conn, row["id"], "aggregating", now, "counting feedback")
                await conn.execute(QUERIES["forget-campaign-checkpoints"], row["id"])
        for row in await conn.fetch(QUERIES["aggregation-due"], now - period):
            async with conn.transaction():
                await store.transition(
                    conn, row["id"], "aggregated", now, "aggregation period over"
                )


async def update_gauges(ctx: Context) -> None:
    counts = {s: 0 for s in status.STATUSES}
    paused = 0
    async with ctx.pool.acquire() as conn:
        for row in await conn.fetch(QUERIES["status-counts"]):
            counts[row["status"]] = row["n"]
            if row["status"] == "sending":
                paused = row["paused"]
    for name, n in counts.items():
        SCHEDULER_CAMPAIGNS.labels(name).set(n)
    SCHEDULER_WINDOW_PAUSED.set(paused)
