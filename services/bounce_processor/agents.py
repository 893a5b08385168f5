"""The bounce processor's handlers and loops: read → decide (processor, rules) → write.

- ``delivery.results`` (Kafka): synchronous SMTP outcomes; one transaction per partition
  batch, result ids claimed in it (a redelivered result counts once).
- ``suppression.changes`` (Kafka): an operator clearing a bounced address resets its
  contacts' soft count and bounce status.
- inbound mail: stored by the SMTP listener (:mod:`.inbound`) and read here, a batch of
  pending rows per transaction (``FOR UPDATE SKIP LOCKED``, so replicas share the work):
  each is a bounce applied to the rules, or not a bounce, or kept with its reason.
- tracking hits: written by the HTTP views through a group commit (:func:`store_hits`).

Every effect leaves through the outbox of the transaction that made it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import asyncpg
from structlog.contextvars import bound_contextvars

from libs.common.aio import woken
from libs.common.db import claim_once
from libs.common.kafka import Message
from libs.common.logging import get_logger, mask_email
from libs.common.metrics import BOUNCE_INBOUND_BACKLOG, BOUNCE_INBOUND_MAIL
from libs.common.retry import FOREVER, retry
from services.bounce_processor import processor, rules, store
from services.bounce_processor.context import Context
from services.bounce_processor.inbound import InboundMail
from services.bounce_processor.processor import ReadMail
from services.bounce_processor.store import QUERIES, ContactEvent, Failure, Hit

log = get_logger(__name__)
#: how long the mail loop sleeps when nothing woke it (mail stored by another replica).
POLL_SECONDS = 1.0


async def handle_delivery_results(ctx: Context, batch: list[Message]) -> None:
    """Sent → delivery status ok (F-32); failures → classified and counted (F-30, F-31)."""
    threshold = ctx.settings.soft_threshold
    async with ctx.pool.acquire() as conn, conn.transaction():
        results = await claim_once(conn, [m.value for m in batch], lambda r: r["result_id"])
        delivered = [
            ContactEvent(
                r["contact_id"], rules.Delivered(), r["occurred_at"], r["email"], r["campaign_id"]
            )
            for r in results
            if r["outcome"] == "sent"
        ]
        await store.apply_events(conn, delivered, soft_threshold=threshold)
        failures = [f for f in map(processor.result_failure, results) if f is not None]
        await store.record_failures(conn, failures, soft_threshold=threshold)


async def handle_suppression_changes(ctx: Context, batch: list[Message]) -> None:
    """An operator cleared a bounced address (``suppression.changes``: kind address, state
    cleared): its contacts start again from a clean slate (rules.Cleared), and the new
    status goes out on bounce.events so contacts and suppression show it."""
    cleared = [
        m.value for m in batch if m.value["kind"] == "address" and m.value["state"] == "cleared"
    ]
    if not cleared:
        return
    async with ctx.pool.acquire() as conn, conn.transaction():
        changes = await claim_once(conn, cleared, lambda c: c["change_id"])
        if not changes:
            return
        when = {c["email"].lower(): c["changed_at"] for c in changes if c["email"]}
        rows = await conn.fetch(
            QUERIES["contacts-of-addresses"],
            [c["contact_id"] for c in changes if c["contact_id"] is not None],
            list(when),
        )
        events = [
            ContactEvent(
                r["contact_id"],
                rules.Cleared(),
                when.get((r["email"] or "").lower(), changes[-1]["changed_at"]),
                r["email"],
            )
            for r in rows
        ]
        await store.apply_events(conn, events, soft_threshold=ctx.settings.soft_threshold)
        log.info("bounces_cleared", addresses=len(changes), contacts=len(events))


async def store_inbound(
    pool: asyncpg.Pool, arrived: asyncio.Event, mails: list[InboundMail]
) -> None:
    """The GroupWriter flush of the SMTP listener: every gathered mail in one INSERT."""
    await pool.execute(
        QUERIES["store-inbound"],
        [m.mail_from for m in mails],
        ["\n".join(m.rcpt_to) for m in mails],
        [len(m.raw) for m in mails],
        [m.raw for m in mails],
    )
    arrived.set()


async def store_hits(pool: asyncpg.Pool, soft_threshold: int, hits: list[Hit]) -> None:
    """The GroupWriter flush of the tracking views."""
    async with pool.acquire() as conn, conn.transaction():
        await store.record_hits(conn, hits, soft_threshold=soft_threshold)


async def process_inbound(ctx: Context) -> int:
    """Read and apply one batch of stored mail; returns how many rows it took."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(QUERIES["pending-inbound"], ctx.settings.batch)
        if not rows:
            BOUNCE_INBOUND_BACKLOG.set(0)
            return 0
        read = {
            r["id"]: processor.read_mail(ctx.verp, bytes(r["raw"]), r["rcpt_to"].split("\n"))
            for r in rows
        }
        contacts = [m.target.contact_id for m in read.values() if m.target is not None]
        known = {s["contact_id"]: s["email"] for s in await conn.fetch(QUERIES["states"], contacts)}
        failures: list[Failure] = []
        outcomes: dict[int, ReadMail] = {}
        for row in rows:
            mail, failure = _decide(read[row["id"]], known, row)
            outcomes[row["id"]] = mail
            if failure is not None:
                failures.append(failure)
        await store.record_failures(conn, failures, soft_threshold=ctx.settings.soft_threshold)
        kept = {i: m for i, m in outcomes.items() if m.outcome in ("unattributed", "unreadable")}
        await conn.execute(QUERIES["forget-inbound"], [i for i in outcomes if i not in kept])
        await conn.execute(
            QUERIES["reject-inbound"],
            list(kept),
            [m.reason for m in kept.values()],
            ctx.settings.keep_bytes,
        )
    for outcome, count in Counter(m.outcome for m in outcomes.values()).items():
        BOUNCE_INBOUND_MAIL.labels(outcome).inc(count)
    if len(rows) < ctx.settings.batch:
        BOUNCE_INBOUND_BACKLOG.set(0)  # a short batch took everything there was
    else:  # a full one: count what waits (only then, it costs a scan of the pending index)
        BOUNCE_INBOUND_BACKLOG.set(await ctx.pool.fetchval(QUERIES["pending-count"]))
    return len(rows)


def _decide(
    mail: ReadMail, known: dict[int, str | None], row: asyncpg.Record
) -> tuple[ReadMail, Failure | None]:
    """The outcome of one read mail, with the failure to apply if it is a bounce."""
    if mail.outcome is not None or mail.target is None:
        log.info(
            "inbound_mail_kept", inbound_id=row["id"], outcome=mail.outcome, reason=mail.reason
        )
        return mail, None
    failure = processor.failure_of(mail, known.get(mail.target.contact_id), row["received_at"])
    if failure is None:
        return ReadMail("not_a_bounce", None, mail.report, mail.target), None
    if not failure.email:
        kept = ReadMail("unreadable", "the report names no recipient address", mail.report)
        return kept, None
    with bound_contextvars(campaign_id=failure.campaign_id, contact_id=failure.contact_id):
        log.info(
            "bounce_received",
            classification=failure.classification,
            source=failure.source,
            email=mask_email(failure.email),
        )
    return ReadMail("bounce", None, mail.report, mail.target), failure


async def inbound_loop(ctx: Context, beat: Callable[[], None]) -> None:
    """Read stored mail until cancelled: woken by the listener, polling for other replicas;
    ``beat`` once a round (a loop stuck on a hung call fails /healthz), and before each wait
    while the database is away (waiting out an outage is what it should do then; /readyz
    says the database is missing)."""
    while True:
        beat()
        ctx.mail_arrived.clear()
        taken = await retry(
            lambda: process_inbound(ctx),
            name="process_inbound",
            service=ctx.settings.service,
            strategy=FOREVER,
            waiting=beat,
        )
        if taken < ctx.settings.batch:
            await woken(ctx.mail_arrived, POLL_SECONDS)
