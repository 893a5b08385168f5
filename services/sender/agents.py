"""Kafka handlers of the sender: decode → decide → claim → deliver → record → (loop commits).

``send.requests`` and ``mail.system`` batches are claimed in the send ledger in one
transaction, delivered through the relay pool, and the handler returns only when every
outcome of the batch is committed — so the consumer never commits an offset whose work is
not finished (see ledger.py for why nothing goes twice). The release checkpoints among
``send.requests`` are answered on ``send.progress`` once everything before them is
(progress.py).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

from structlog.contextvars import bound_contextvars

from libs.common.db import claim_once
from libs.common.errors import InvalidMessage, TransientError
from libs.common.kafka import Message, checked, reject, still_working
from libs.common.logging import get_logger, mask_email
from libs.common.metrics import SENDER_DROPPED, SENDER_LEDGER_RECOVERIES
from services.sender import contents, copy, ledger, progress
from services.sender.compose import CampaignMail
from services.sender.context import Context
from services.sender.ledger import (
    QUERIES,
    Claimed,
    Delivery,
    Done,
    LedgerKey,
    Outcome,
    delivery_result,
)
from services.sender.results import publish

log = get_logger(__name__)

#: while a batch waits for its outcomes, its consumer is told it still works this often.
KEEPALIVE_SECONDS = 10.0
CONTROL_STATES = {"halt": "halted", "cancel": "cancelled", "pause": "paused", "resume": "active"}


def request_key(request: dict[str, Any]) -> LedgerKey:
    return LedgerKey(request["campaign_id"], request.get("step_id") or "", request["contact_id"])


async def handle_send_requests(ctx: Context, batch: list[Message]) -> None:
    """``send.requests``: last-moment can-send, ledger claim, SMTP, ``delivery.results``;
    then the batch's checkpoints are answered: every request before them is decided."""
    checkpoints = [m for m in batch if progress.is_checkpoint(m)]
    requests = [m for m in batch if not progress.is_checkpoint(m)] if checkpoints else batch
    if requests:
        await _send(ctx, requests)
    await progress.answer(ctx.publisher, checkpoints)


async def _send(ctx: Context, batch: list[Message]) -> None:
    await ctx.owner.wait_held(KEEPALIVE_SECONDS)
    campaigns = sorted({m.value["campaign_id"] for m in batch if not m.value.get("test")})
    async with ctx.pool.acquire() as conn:
        stopped = {
            r["campaign_id"]: r["state"]
            for r in await conn.fetch(QUERIES["control-states"], campaigns)
        }
    named = {m.value["content_id"] for m in batch if m.value.get("content_id")}
    missing = [i for i in named if not ctx.composer.cached(i)]
    received = await contents.load(ctx.pool, missing) if missing else {}
    requests: dict[LedgerKey, tuple[dict[str, Any], CampaignMail]] = {}
    for message in batch:
        request = message.value
        state = None if request.get("test") else stopped.get(request["campaign_id"])
        if state is not None:
            # Paused: the scheduler re-releases it (attempt + 1) after resume. Halted and
            # cancelled: final. Either way no result: nothing happened to the recipient.
            SENDER_DROPPED.labels(state).inc()
            log.info(
                "send_request_dropped",
                campaign_id=request["campaign_id"],
                contact_id=request["contact_id"],
                state=state,
            )
            continue
        content_id = request.get("content_id")
        # A content named by id is built with its own campaign (a cached one already is).
        owner, content = received.get(
            content_id or "", (request["campaign_id"], request["content"])
        )
        try:
            built = ctx.composer.campaign_message(
                owner, content, test=bool(request.get("test")), content_id=content_id
            )
        except InvalidMessage as exc:
            raise reject(message, exc.reason, exc.field) from None
        if built.campaign_id != request["campaign_id"]:
            raise reject(message, "content_id names another campaign's content", "content_id")
        requests.setdefault(request_key(request), (request, built))
    if not requests:
        return

    deliveries: list[Delivery] = []
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = [(key, _kind(r), r["email"], r["request_id"]) for key, (r, _) in requests.items()]
        claimed, busy = await ledger.claim(conn, rows, ctx.owner)
        undecided = [c for c in claimed if c.fresh or c.status != "done"]
        decisions = await copy.decide(conn, [requests[c.key][0] for c in undecided])
        verdicts = dict(zip([c.key for c in undecided], decisions, strict=True))
        finished: list[Done] = []
        again: list[dict[str, Any]] = []
        for c in claimed:
            request, built = requests[c.key]
            kind = _kind(request)
            if not c.fresh and c.status == "done":
                SENDER_LEDGER_RECOVERIES.labels("republished").inc()
                if c.result is not None:
                    again.append(c.result)
                continue
            if not c.fresh:
                # Its relay may have kept a first copy; the resend carries the same
                # Message-ID (ledger.py: nothing lost, a duplicate is recognisable).
                SENDER_LEDGER_RECOVERIES.labels("resent").inc()
                log.info(
                    "resending_unfinished",
                    campaign_id=c.key.campaign_id,
                    contact_id=c.key.contact_id,
                )
            decision = verdicts[c.key]
            if not decision:
                log.info(
                    "send_suppressed",
                    campaign_id=c.key.campaign_id,
                    contact_id=c.key.contact_id,
                    email=mask_email(request["email"]),
                    reason=decision.reason,
                )
                outcome = Outcome("suppressed", suppressed_reason=decision.reason)
                finished.append(_done(c, kind, request, outcome))
                continue
            deliveries.append(
                Delivery(
                    c.key,
                    kind,
                    request["email"],
                    functools.partial(ctx.composer.campaign_mail, built, request),
                )
            )
        results = await ledger.finish(conn, finished) + again
    # Committed: the batch's known results go now, the others as their cycles commit.
    early = asyncio.ensure_future(publish(ctx.publisher, results))
    try:
        await _deliver(ctx, deliveries)
        await ctx.ledger.flush()
    finally:
        await asyncio.gather(early, return_exceptions=True)
    early.result()
    await _published(deliveries)
    await _wait_for_other_senders(ctx, busy)


async def _published(deliveries: Sequence[Delivery]) -> None:
    """Wait until every delivery's result is acknowledged by the broker: only then may the
    batch's offsets be committed (ledger.py). A failed publication fails the handler, which
    is retried: its claim finds the rows done and publishes their stored results again."""
    pending = {d.published for d in deliveries if d.published is not None}
    if pending:
        await asyncio.wait(pending)  # not gather: a cycle's publication may be shared
        for sent in pending:
            sent.result()


async def _wait_for_other_senders(ctx: Context, busy: Sequence[Claimed]) -> None:
    """Rows another live sender is sending: its results are its own to publish; wait until
    it is done with them, so this batch's offsets are not committed over unfinished work."""
    if not busy:
        return
    log.warning("ledger_rows_owned_elsewhere", rows=len(busy))
    if not await ledger.wait_for_owners(ctx.pool, ctx.owner, busy):
        raise TransientError("a sender that owned rows of this batch is gone: handle it again")


def _kind(request: dict[str, Any]) -> str:
    return "test" if request.get("test") else "campaign"


def _done(c: Claimed, kind: str, request: dict[str, Any], outcome: Outcome) -> Done:
    result = delivery_result(c.key, request["email"], outcome) if kind == "campaign" else None
    return c.key, kind, outcome, result


async def _deliver(ctx: Context, deliveries: Sequence[Delivery]) -> None:
    """Queue every delivery and wait until each outcome is committed. The wait may be long
    (every relay down: nothing is committed meanwhile, so nothing is lost); it tells the
    consumer it is still working, so /healthz does not have a waiting sender restarted."""
    for delivery in deliveries:
        ctx.relays.submit(delivery)
    try:
        waiting = {d.done for d in deliveries}
        while waiting:
            done, waiting = await asyncio.wait(
                waiting, timeout=KEEPALIVE_SECONDS, return_when=asyncio.FIRST_EXCEPTION
            )
            for future in done:
                future.result()  # the first failure propagates, as gather did
            still_working()
    finally:
        for delivery in deliveries:  # cancelled (stopping): workers skip what is left
            if not delivery.done.done():
                delivery.done.cancel()


async def handle_control(ctx: Context, batch: list[Message]) -> None:
    """``campaign.control``: halt and cancel are final, pause holds until resume."""
    changed: dict[str, str] = {}
    async with ctx.pool.acquire() as conn, conn.transaction():
        for message in await claim_once(conn, batch, lambda m: m.value["command_id"]):
            command = message.value
            with bound_contextvars(campaign_id=command["campaign_id"]):
                state = CONTROL_STATES[command["action"]]
                row = await conn.fetchrow(
                    QUERIES["apply-control"],
                    command["campaign_id"],
                    state,
                    command.get("reason"),
                    command["issued_at"],
                )
                if row is None:
                    log.info("campaign_control_ignored", action=command["action"])
                    continue
                changed[command["campaign_id"]] = row["state"]
                log.info("campaign_control", action=command["action"], reason=command.get("reason"))
    for campaign_id, state in changed.items():
        if state == "active":
            ctx.stopped.pop(campaign_id, None)
        else:
            ctx.stopped[campaign_id] = state


async def handle_suppression_changes(ctx: Context, batch: list[Message]) -> None:
    """``suppression.changes``: the last-mile copy (highest version per entity wins)."""
    changes = checked(batch, copy.check)
    async with ctx.pool.acquire() as conn, conn.transaction():
        await copy.apply(conn, changes)


async def handle_system_mail(ctx: Context, batch: list[Message]) -> None:
    """``mail.system``: operator notifications, once per (mail_id, recipient); no results."""
    await ctx.owner.wait_held(KEEPALIVE_SECONDS)
    mails: dict[LedgerKey, tuple[dict[str, Any], str]] = {}
    for message in batch:
        mail = message.value
        for index, to in enumerate(mail["to"]):
            mails.setdefault(LedgerKey(f"mail:{mail['mail_id']}", "", index), (mail, to))
    if not mails:
        return
    deliveries: list[Delivery] = []
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = [(key, "system", to, mail["mail_id"]) for key, (mail, to) in mails.items()]
        claimed, busy = await ledger.claim(conn, rows, ctx.owner)
        for c in claimed:
            mail, to = mails[c.key]
            if c.status == "done" and not c.fresh:
                continue
            if not c.fresh:
                SENDER_LEDGER_RECOVERIES.labels("resent").inc()
            compose = functools.partial(ctx.composer.system_mail, mail, to)
            deliveries.append(Delivery(c.key, "system", to, compose))
    await _deliver(ctx, deliveries)
    await ctx.ledger.flush()
    await _wait_for_other_senders(ctx, busy)


async def load_stopped(ctx: Context) -> None:
    """At start: the campaigns that must not send (abandons queued deliveries of them)."""
    async with ctx.pool.acquire() as conn:
        for row in await conn.fetch(QUERIES["stopped-campaigns"]):
            ctx.stopped[row["campaign_id"]] = row["state"]


async def handle_contents(ctx: Context, batch: list[Message]) -> None:
    """``campaign.content``: each content once, by its id (send.requests v4 names it)."""
    records = checked(batch, contents.check)
    async with ctx.pool.acquire() as conn:
        await contents.store(conn, records)
