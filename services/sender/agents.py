"""Kafka handlers of the sender: decode → decide → claim → deliver → record → (loop commits).

``send.requests`` and ``mail.system`` take one path (:func:`_claim_deliver_record`): the
batch's mails are claimed in the send ledger in one transaction, what to do with each is
decided by processor.py (duplicate, suppressed, deliverable), the deliverable ones go
through the relay pool, and the handler returns only when every outcome of the batch is
committed and its results acknowledged — so the consumer never commits an offset whose
work is not finished (see ledger.py for why nothing goes twice). The release checkpoints
among ``send.requests`` are answered on ``send.progress`` once everything before them is
(progress.py).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from structlog.contextvars import bound_contextvars

from libs.common.db import claim_once
from libs.common.errors import InvalidMessage, TransientError
from libs.common.kafka import Message, checked, reject, still_working
from libs.common.logging import get_logger, mask_email
from libs.common.mail.can_send import Decision
from libs.common.mail.template import CampaignTemplate
from libs.common.metrics import SENDER_DROPPED, SENDER_HELD_TOTAL, SENDER_LEDGER_RECOVERIES
from libs.common.retry import every
from libs.common.topics import Topic
from services.sender import contents, copy, holding, ledger, processor, progress
from services.sender.context import Context
from services.sender.ledger import HELD, QUERIES, Delivery
from services.sender.models import Claimed, Done, LedgerKey
from services.sender.processor import Duplicate, Suppressed
from services.sender.results import publish

log = get_logger(__name__)

#: while a batch waits for its outcomes, its consumer is told it still works this often.
KEEPALIVE_SECONDS = 10.0


@dataclass
class _Mail:
    """One mail to claim, decide and deliver: its ledger row, how to compose it, and the
    request the suppression copy is asked about (None: not checked, ``mail.system``)."""

    key: LedgerKey
    kind: str
    email: str
    request_id: str | None
    compose: Callable[[], tuple[bytes, str, str]]
    request: dict[str, Any] | None


async def handle_send_requests(ctx: Context, batch: list[Message]) -> None:
    """``send.requests``: last-moment can-send, ledger claim, SMTP, ``delivery.results``;
    then the batch's checkpoints are answered: every request before them is decided."""
    checkpoints = [m for m in batch if progress.is_checkpoint(m)]
    requests = [m for m in batch if not progress.is_checkpoint(m)] if checkpoints else batch
    if requests:
        await _claim_deliver_record(ctx, await _campaign_mails(ctx, requests))
    await progress.answer(ctx.publisher, ctx.pool, checkpoints)


async def handle_system_mail(ctx: Context, batch: list[Message]) -> None:
    """``mail.system``: operator notifications, once per (mail_id, recipient); no results."""
    mails: dict[LedgerKey, _Mail] = {}
    for message in batch:
        mail = message.value
        for index, to in enumerate(mail["to"]):
            key = processor.system_key(mail["mail_id"], index)
            if key not in mails:
                compose = functools.partial(ctx.composer.system_mail, mail, to)
                mails[key] = _Mail(key, processor.SYSTEM, to, mail["mail_id"], compose, None)
    await _claim_deliver_record(ctx, mails)


async def _campaign_mails(ctx: Context, batch: list[Message]) -> dict[LedgerKey, _Mail]:
    """Decode: the batch's requests whose campaign may send, each with its built content,
    once per ledger key. A stopped campaign's request, or one to a domain its campaign's
    mail is held for, is dropped with no result (paused: the scheduler re-releases it
    after resume; halted and cancelled: final)."""
    campaigns = sorted({m.value["campaign_id"] for m in batch if not m.value.get("test")})
    async with ctx.pool.acquire() as conn:
        stopped, held = _controls(await conn.fetch(QUERIES["control-states"], campaigns))
    named = {m.value["content_id"] for m in batch if m.value.get("content_id")}
    missing = [i for i in named if not ctx.composer.cached(i)]
    received = await contents.load(ctx.pool, missing) if missing else {}
    mails: dict[LedgerKey, _Mail] = {}
    for message in batch:
        request = message.value
        state = processor.campaign_stop(request, stopped, held)
        if state is not None:
            SENDER_DROPPED.labels(state).inc()
            log.info(
                "send_request_dropped",
                campaign_id=request["campaign_id"],
                contact_id=request["contact_id"],
                state=state,
            )
            continue
        built = _built(ctx, message, received)
        key = processor.request_key(request)
        if key not in mails:
            compose = functools.partial(ctx.composer.campaign_mail, built, request)
            kind = processor.kind_of(request)
            mails[key] = _Mail(key, kind, request["email"], request["request_id"], compose, request)
    return mails


def _built(
    ctx: Context, message: Message, received: Mapping[str, tuple[str, dict[str, Any]]]
) -> CampaignTemplate:
    """The request's campaign mail, built once per content; a content that cannot be
    built, or names another campaign's content, sends the record to the dead letters."""
    request = message.value
    content_id = request.get("content_id")
    # A content named by id is built with its own campaign (a cached one already is).
    owner, content = received.get(content_id or "", (request["campaign_id"], request["content"]))
    try:
        built = ctx.composer.campaign_message(
            owner, content, test=bool(request.get("test")), content_id=content_id
        )
    except InvalidMessage as exc:
        raise reject(message, exc.reason, exc.field) from None
    if built.campaign_id != request["campaign_id"]:
        raise reject(message, "content_id names another campaign's content", "content_id")
    return built


async def _claim_deliver_record(ctx: Context, mails: Mapping[LedgerKey, _Mail]) -> None:
    """Claim → decide → deliver → record, for campaign and system mail alike.

    One transaction claims the mails in the ledger and records the outcomes decided
    without SMTP (suppressed); after it the known results (those, and the ones the ledger
    held) are published while the deliverable mails go to the relays. Returns once every
    outcome is committed and durable and every result acknowledged by the broker."""
    if not mails:
        return
    await ctx.owner.wait_held(KEEPALIVE_SECONDS)
    async with ctx.pool.acquire() as conn, conn.transaction():
        rows = [(m.key, m.kind, m.email, m.request_id) for m in mails.values()]
        claimed, busy = await ledger.claim(conn, rows, ctx.owner)
        verdicts = await _verdicts(conn, mails, claimed)
        finished, again, deliveries = _act(claimed, mails, verdicts)
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


def _act(
    claimed: Sequence[Claimed],
    mails: Mapping[LedgerKey, _Mail],
    verdicts: Mapping[LedgerKey, Decision],
) -> tuple[list[Done], list[dict[str, Any]], list[Delivery]]:
    """What processor.after_claim decided for each claimed mail, as (outcomes to record
    now, stored results to publish again, deliveries for the relays)."""
    now = datetime.now(UTC)
    finished: list[Done] = []
    again: list[dict[str, Any]] = []
    deliveries: list[Delivery] = []
    for c in claimed:
        mail = mails[c.key]
        action = processor.after_claim(c, verdicts.get(c.key))
        if isinstance(action, Duplicate):
            SENDER_LEDGER_RECOVERIES.labels("republished").inc()
            if action.result is not None:
                again.append(action.result)
            continue
        if action.resend:
            # Its relay may have kept a first copy; the resend carries the same
            # Message-ID (ledger.py: nothing lost, a duplicate is recognisable).
            SENDER_LEDGER_RECOVERIES.labels("resent").inc()
            log.info(
                "resending_unfinished", campaign_id=c.key.campaign_id, contact_id=c.key.contact_id
            )
        if isinstance(action, Suppressed):
            log.info(
                "send_suppressed",
                campaign_id=c.key.campaign_id,
                contact_id=c.key.contact_id,
                email=mask_email(mail.email),
                reason=action.reason,
            )
            outcome = processor.suppressed(action.reason)
            finished.append(processor.ledger_row(c.key, mail.kind, mail.email, outcome, now))
        else:
            deliveries.append(
                Delivery(c.key, mail.kind, mail.email, mail.compose, request=mail.request)
            )
    return finished, again, deliveries


async def _verdicts(
    conn: asyncpg.Connection, mails: Mapping[LedgerKey, _Mail], claimed: Sequence[Claimed]
) -> dict[LedgerKey, Decision]:
    """The suppression copy's can-send verdict of each claimed request not yet decided
    (none for ``mail.system``, which is not checked)."""
    asked = [
        (c.key, request)
        for c in claimed
        if processor.needs_check(c) and (request := mails[c.key].request) is not None
    ]
    decisions = await copy.decide(conn, [request for _, request in asked])
    return {key: decision for (key, _), decision in zip(asked, decisions, strict=True)}


async def _published(deliveries: Sequence[Delivery]) -> None:
    """Wait until every delivery's result is acknowledged by the broker: only then may the
    batch's offsets be committed (ledger.py). A failed publication fails the handler, which
    is retried: its claim finds the rows done and publishes their stored results again."""
    # A held delivery's result is not the batch's to wait for (holding.py).
    pending = {d.published for d in deliveries if d.published is not None and d.hold != HELD}
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


async def _deliver(ctx: Context, deliveries: Sequence[Delivery]) -> None:
    """Queue every delivery and wait until each outcome is committed, or the delivery is
    held (its row written: holding.py). The wait may be long (every relay down: nothing is
    committed meanwhile, so nothing is lost); it tells the consumer it is still working, so
    /healthz does not have a waiting sender restarted."""
    for delivery in deliveries:
        ctx.relays.submit(delivery)
    # The futures as they are now: a held delivery's ``done`` is replaced by its outcome's.
    futures = [d.done for d in deliveries]
    try:
        waiting = set(futures)
        while waiting:
            done, waiting = await asyncio.wait(
                waiting, timeout=KEEPALIVE_SECONDS, return_when=asyncio.FIRST_EXCEPTION
            )
            for future in done:
                future.result()  # the first failure propagates, as gather did
            still_working()
    finally:
        for future in futures:  # cancelled (stopping): workers skip what is left, not held
            if not future.done():
                future.cancel()


def _controls(
    rows: Sequence[asyncpg.Record],
) -> tuple[dict[str, str], dict[str, frozenset[str]]]:
    """control-states rows as (campaign → state, campaign → held domains)."""
    stopped = {r["campaign_id"]: r["state"] for r in rows if r["state"] is not None}
    held = {r["campaign_id"]: frozenset(r["domains"]) for r in rows if r["domains"]}
    return stopped, held


async def handle_control(ctx: Context, batch: list[Message]) -> None:
    """``campaign.control``: halt and cancel are final, pause holds until resume; a pause
    or resume with ``domains`` holds or lets go the campaign's mail to those domains only
    (processor.control_change)."""
    states: dict[str, str] = {}
    held: dict[str, frozenset[str]] = {}
    async with ctx.pool.acquire() as conn, conn.transaction():
        for message in await claim_once(conn, batch, lambda m: m.value["command_id"]):
            command = message.value
            campaign_id = command["campaign_id"]
            with bound_contextvars(campaign_id=campaign_id):
                change = processor.control_change(command)
                if isinstance(change, processor.DomainChange):
                    changed = await conn.fetch(
                        QUERIES["apply-domain-control"],
                        campaign_id,
                        change.held,
                        list(change.domains),
                        command.get("reason"),
                        command["issued_at"],
                    )
                    if not changed:
                        log.info(
                            "campaign_control_ignored",
                            action=command["action"],
                            domains=list(change.domains),
                        )
                        continue
                    rows = await conn.fetch(QUERIES["held-domains"], campaign_id)
                    held[campaign_id] = frozenset(r["domain"] for r in rows)
                    log.info(
                        "campaign_control",
                        action=command["action"],
                        domains=[r["domain"] for r in changed],
                        held=sorted(held[campaign_id]),
                        reason=command.get("reason"),
                    )
                    continue
                row = await conn.fetchrow(
                    QUERIES["apply-control"],
                    campaign_id,
                    change.state,
                    command.get("reason"),
                    command["issued_at"],
                )
                if row is None:
                    log.info("campaign_control_ignored", action=command["action"])
                    continue
                states[campaign_id] = row["state"]
                log.info("campaign_control", action=command["action"], reason=command.get("reason"))
    # Committed: deliveries still queued see the change (Context.still_wanted).
    for campaign_id, state in states.items():
        if state == "active":
            ctx.stopped.pop(campaign_id, None)
        else:
            ctx.stopped[campaign_id] = state
    for campaign_id, domains in held.items():
        if domains:
            ctx.held[campaign_id] = domains
        else:
            ctx.held.pop(campaign_id, None)


async def handle_suppression_changes(ctx: Context, batch: list[Message]) -> None:
    """``suppression.changes``: the last-mile copy (highest version per entity wins)."""
    changes = checked(batch, copy.check)
    async with ctx.pool.acquire() as conn, conn.transaction():
        await copy.apply(conn, changes)


async def load_stopped(ctx: Context) -> None:
    """At start: the campaigns that must not send, and the domains each campaign's mail is
    held for (abandons queued deliveries of them)."""
    async with ctx.pool.acquire() as conn:
        stopped, held = _controls(await conn.fetch(QUERIES["stopped-campaigns"]))
    ctx.stopped.update(stopped)
    ctx.held.update(held)


async def handle_contents(ctx: Context, batch: list[Message]) -> None:
    """``campaign.content``: each content once, by its id (send.requests v4 names it)."""
    records = checked(batch, contents.check)
    async with ctx.pool.acquire() as conn:
        await contents.store(conn, records)


async def sweep_held(ctx: Context) -> None:
    """Take over the held rows no live sender looks after: those whose ledger owner is gone
    (its process stopped or crashed), and this process's own that it no longer holds in
    memory (its result's publication failed). A row whose ledger row is done has its stored
    result published again and goes; an unfinished one becomes ours (only if its owner is
    still the one found gone: two sweeps never both take it) and is decoded from its stored
    record and paced as a held delivery of this process. A row of a campaign or domain
    stopped meanwhile goes, with no result, as at the claim."""
    holder = ctx.holder
    async with ctx.pool.acquire() as conn:
        rows = [r for r in await conn.fetch(QUERIES["held-rows"]) if _key(r) not in holder.live]
        if not rows:
            return
        owners = {r["owner"] for r in rows if r["owner"] is not None}
        alive = await ctx.owner.alive(conn, owners - {ctx.owner.key})
        orphans = [_key(r) for r in rows if r["owner"] not in alive]
        if not orphans:
            return
        records = await conn.fetch(QUERIES["held-records"], *ledger.columns(orphans))
    done = [r for r in records if r["status"] not in ledger.UNFINISHED]
    if done:
        await publish(ctx.publisher, [r["result"] for r in done if r["result"] is not None])
        SENDER_HELD_TOTAL.labels("republished").inc(len(done))
        log.info("held_results_republished", rows=len(done))
    taken: list[asyncpg.Record] = []
    owner_of = {_key(r): r["owner"] for r in rows}
    async with ctx.pool.acquire() as conn:
        if done:
            await conn.execute(QUERIES["unhold"], *ledger.columns([_key(r) for r in done]))
        for r in records:
            if r["status"] in ledger.UNFINISHED and await conn.fetchval(
                QUERIES["adopt-held"], *_values(_key(r)), owner_of[_key(r)], ctx.owner.key
            ):
                taken.append(r)
    messages, decoded = [], []
    for r in taken:
        try:
            request = holding.decode_request(r["value"], r["headers"])
        except InvalidMessage as exc:  # written by a sender whose schema this one cannot read
            log.error("held_record_unreadable", campaign_id=r["campaign_id"], exc_info=exc)
            continue  # ours now, not held here: the next sweep tries again
        # As consumed: the record the held row stores.
        messages.append(Message(Topic.SEND_REQUESTS, None, request, -1, -1, 0, r["trace"]))
        decoded.append(_key(r))
    if not messages:
        return
    traces = {_key(r): r["trace"] for r in taken}
    try:
        mails = await _campaign_mails(ctx, messages)
    except InvalidMessage as exc:  # a content that cannot be built any more
        log.error("held_deliveries_not_adopted", rows=len(taken), exc_info=exc)
        return  # ours now, not held here: the next sweep tries again
    dropped = [key for key in decoded if key not in mails]
    if dropped:
        async with ctx.pool.acquire() as conn:
            await conn.execute(QUERIES["unhold"], *ledger.columns(dropped))
    for mail in mails.values():
        d = Delivery(
            mail.key,
            mail.kind,
            mail.email,
            mail.compose,
            request=mail.request,
            trace=traces.get(mail.key),
        )
        holder.adopt(d)
        ctx.relays.submit(d)
    log.info("held_deliveries_adopted", deliveries=len(mails), dropped=len(dropped))


async def sweep_held_forever(ctx: Context) -> None:
    """The sweep at start (once this process's owner lock is held), then every
    SENDER_HOLD_SWEEP_SECONDS."""
    s = ctx.settings
    await ctx.owner.wait_held(KEEPALIVE_SECONDS)
    await every(
        s.hold_sweep_seconds,
        lambda: sweep_held(ctx),
        name="held_sweep",
        service=s.service,
        first_now=True,
    )


def _key(row: asyncpg.Record) -> LedgerKey:
    return LedgerKey(row["campaign_id"], row["step_id"], row["contact_id"])


def _values(key: LedgerKey) -> tuple[str, str, int]:
    return key.campaign_id, key.step_id, key.contact_id
