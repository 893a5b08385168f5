"""Kafka handlers of the contacts service: decode → process → write → (loop commits).

Each handler runs one transaction per partition batch, claims the batch's event ids
first (so a redelivered batch has no second effect), and queues what it publishes in the
outbox of that same transaction.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import asyncpg
from structlog.contextvars import bound_contextvars

from libs.common import checks
from libs.common.db import claim_once, columns
from libs.common.errors import InvalidMessage, NotFound, TransientError
from libs.common.kafka import Message, reject
from libs.common.logging import get_logger
from libs.common.mail.states import MEMBERSHIP_CHANGE_STATES, ChangeMethod
from libs.common.metrics import CONTACT_EVENTS
from services.contacts import store, targets
from services.contacts.context import Context
from services.contacts.models import FieldDefinition
from services.contacts.processor import UpstreamEvent, membership_writes, upstream_event
from services.contacts.store import QUERIES

log = get_logger(__name__)


async def handle_contact_events(ctx: Context, batch: list[Message]) -> None:
    """F-03: ContactUpserted / ContactDeleted / MembershipRequested, idempotent per event id."""
    async with ctx.pool.acquire() as conn:
        fields = await ctx.fields.get(conn)
        try:
            async with conn.transaction():
                # The batch's ids are claimed while Python validates it: PostgreSQL and
                # Python work at the same time. A rejected event rolls the claim back.
                claiming = await store.started(claim_once(conn, _event_ids(batch), str))
                try:
                    events = await _validated(ctx, conn, batch, fields, claiming)
                finally:
                    claimed = await claiming
                await _apply_batch(conn, events, claimed)
        except asyncpg.UniqueViolationError as exc:
            # Another writer (the API, another replica) took an address between our
            # lock and our insert: the batch is rolled back and retried, then sees it.
            raise TransientError(f"concurrent write: {exc}") from exc


def _event_ids(batch: list[Message]) -> list[str]:
    """The ids a batch may claim; an event without a usable id is rejected by validation
    (one with a NUL would fail the claim, and with it the batch, naming no event)."""
    ids = []
    for message in batch:
        event_id = message.value.get("event_id") if isinstance(message.value, dict) else None
        if isinstance(event_id, str) and event_id.strip() and checks.is_plain(event_id):
            ids.append(event_id)
    return ids


async def _validated(
    ctx: Context,
    conn: asyncpg.Connection,
    batch: list[Message],
    fields: dict[str, FieldDefinition],
    claiming: asyncio.Future[list[str]],
) -> list[tuple[Message, UpstreamEvent]]:
    """Every event validated, in order; the first bad one is rejected (dead-lettered)."""
    events: list[tuple[Message, UpstreamEvent]] = []
    for message in batch:
        try:
            events.append((message, upstream_event(message.value, fields)))
        except InvalidMessage as exc:
            if exc.field and "custom_fields." in exc.field:  # defined since the cache was read?
                await claiming  # the connection is free again
                fields = await ctx.fields.get(conn, fresh=True)
                try:
                    events.append((message, upstream_event(message.value, fields)))
                    continue
                except InvalidMessage as again:
                    exc = again
            raise reject(message, exc.reason, exc.field) from None
        except (KeyError, ValueError, TypeError) as exc:
            raise reject(message, f"malformed event: {exc!r}") from None
    return events


async def _apply_batch(
    conn: asyncpg.Connection, events: list[tuple[Message, UpstreamEvent]], claimed: list[str]
) -> None:
    """The events whose id was claimed now (each id once), in order, in the caller's
    transaction."""
    unclaimed = set(claimed)
    fresh = []
    for message, event in events:
        if event.event_id in unclaimed:
            unclaimed.discard(event.event_id)
            fresh.append((message, event))
    repeated = Counter(e.type for _, e in events) - Counter(e.type for _, e in fresh)
    for event_type, count in repeated.items():
        CONTACT_EVENTS.labels(event_type, "duplicate").inc(count)
    upserts: list[tuple[Message, UpstreamEvent]] = []
    for message, event in fresh:
        if event.type == "ContactUpserted":
            upserts.append((message, event))
            continue
        await _upsert_all(conn, upserts)  # keep the order of events per key
        upserts = []
        try:
            effect = await _apply(conn, event)
        except InvalidMessage as exc:
            raise reject(message, exc.reason, exc.field) from None
        CONTACT_EVENTS.labels(event.type, effect).inc()
    await _upsert_all(conn, upserts)


async def _upsert_all(
    conn: asyncpg.Connection, upserts: list[tuple[Message, UpstreamEvent]]
) -> None:
    """ContactUpserted events in bulk: one statement per kind for each run of distinct keys."""
    for run in store.batch_runs([event.patch for _, event in upserts]):
        events = [upserts[i] for i in run]
        outcomes = await store.upsert_run(
            conn,
            [e.patch for _, e in events],
            keys=["external_id" if e.external_id else "email" for _, e in events],
        )
        for (message, _), outcome in zip(events, outcomes, strict=True):
            if isinstance(outcome, InvalidMessage):
                raise reject(message, outcome.reason, outcome.field)
        for outcome in outcomes:
            CONTACT_EVENTS.labels("ContactUpserted", outcome[0]).inc()  # type: ignore[index]


async def _apply(conn: asyncpg.Connection, event: UpstreamEvent) -> str:
    """ContactDeleted and MembershipRequested, one at a time."""
    contact_id = await store.find_id(conn, external_id=event.external_id, email=event.email)
    if event.type == "ContactDeleted":
        if contact_id is None:
            return "absent"
        await store.delete(conn, [contact_id])
        return "deleted"
    patch = event.patch
    carries_data = (
        set(patch.columns) - {"email", "external_id"} or patch.custom_set or patch.custom_clear
    )
    if contact_id is None or carries_data:
        _, row = await store.upsert(
            conn, patch, key="external_id" if event.external_id else "email"
        )
        contact_id = row["id"] if row is not None else None
    if contact_id is None:
        raise InvalidMessage("MembershipRequested for an unknown contact", field="email")
    try:
        joined = await store.join(
            conn,
            contact_id,
            event.group_id or 0,
            auto_stop=event.auto_stop,
            method="upstream",
            actor="upstream",
        )
    except NotFound as exc:
        raise InvalidMessage(str(exc), field="membership.group_id") from None
    return "joined" if joined is not None else "already_member"


async def handle_suppression_changes(ctx: Context, batch: list[Message]) -> None:
    """Keep the membership projection current (newer change wins; stale ones do nothing;
    "left" removes). The batch is reduced to one write per membership in Python
    (:func:`membership_writes`) and applied in at most two statements, each of which fires
    the membership_flags trigger once per row it changes."""
    changes = []
    async with ctx.pool.acquire() as conn, conn.transaction():
        for message in await claim_once(conn, batch, lambda m: m.value["change_id"]):
            change = message.value
            if change["kind"] != "membership":
                continue
            if change["contact_id"] is None or change["group_id"] is None:
                raise reject(message, "a membership change needs contact_id and group_id")
            if change["state"] not in MEMBERSHIP_CHANGE_STATES:
                raise reject(message, f"unknown membership state {change['state']!r}", "state")
            changes.append(change)
        left, applied = membership_writes(changes)
        if left:
            await conn.execute(
                QUERIES["leave-memberships"], [c for c, _ in left], [g for _, g in left]
            )
        if applied:
            await conn.execute(
                QUERIES["apply-membership-changes"],
                *columns(applied, "contact_id", "group_id", "state"),
                [c["method"] or ChangeMethod.SYSTEM.value for c in applied],
                *columns(applied, "changed_at"),
            )


_OUTCOME_KIND = {
    "sent": "received",
    "permanent_error": "errored",
    "temporary_error": "errored",
    "policy_error": "errored",
}


async def handle_delivery_results(ctx: Context, batch: list[Message]) -> None:
    """Delivery history for search (received / errored) from ``delivery.results``: one
    statement per batch, which claims the result ids and records what they newly tell."""
    rows = [m.value for m in batch if m.value["outcome"] in _OUTCOME_KIND]
    if not rows:
        return
    async with ctx.pool.acquire() as conn:
        await conn.execute(
            QUERIES["record-history-once"],
            *columns(rows, "contact_id", "campaign_id"),
            [_OUTCOME_KIND[r["outcome"]] for r in rows],
            *columns(rows, "occurred_at", "result_id"),
        )


async def handle_feedback(ctx: Context, batch: list[Message]) -> None:
    """Opens and clicks: history (F-05) and the score (F-08), once per event id (claimed in
    the statement that records them)."""
    points = {"open": ctx.settings.score_open_points, "click": ctx.settings.score_click_points}
    history_kind = {"open": "opened", "click": "clicked"}
    events = [m.value for m in batch]
    async with ctx.pool.acquire() as conn, conn.transaction():
        scored = await conn.fetch(
            QUERIES["record-feedback"],
            *columns(events, "event_id", "contact_id", "campaign_id", "type"),
            [history_kind[e["type"]] for e in events],
            [points[e["type"]] for e in events],
            *columns(events, "occurred_at"),
        )
        contact_ids = sorted({r["contact_id"] for r in scored})
        if contact_ids:
            rows = await conn.fetch(QUERIES["refresh-scores"], contact_ids)
            await store.publish_contacts(conn, rows)


async def handle_bounce_events(ctx: Context, batch: list[Message]) -> None:
    """Delivery status per contact (F-32) as the bounce processor decides it."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        for message in await claim_once(conn, batch, lambda m: m.value["event_id"]):
            event = message.value
            status = event.get("delivery_status")
            if not status or event["contact_id"] is None:
                continue
            row = await conn.fetchrow(QUERIES["set-delivery-status"], event["contact_id"], status)
            if row is not None:
                await store.publish_contact(conn, row)


async def handle_snapshot_requests(ctx: Context, batch: list[Message]) -> None:
    """SPEC §9: evaluate a campaign's target once and stream its recipients, then an end marker.

    A request is remembered once its answer is complete, so a redelivered request is answered
    again only when the first answer was cut short (and (request_id, seq) makes that harmless).
    """
    for message in batch:
        request = message.value
        with bound_contextvars(campaign_id=request["campaign_id"]):
            done = await ctx.pool.fetchval(
                "SELECT 1 FROM processed_event WHERE event_id = $1",
                f"snapshot:{request['request_id']}",
            )
            if done:
                log.info("snapshot_already_answered", request_id=request["request_id"])
                continue
            await targets.stream_snapshot(ctx, request)
            async with ctx.pool.acquire() as conn:
                await claim_once(conn, [f"snapshot:{request['request_id']}"], str)
