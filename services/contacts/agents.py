"""Kafka handlers of the contacts service: decode → process → write → (loop commits).

Each handler runs one transaction per partition batch, claims the batch's event ids
first (so a redelivered batch has no second effect), and queues what it publishes in the
outbox of that same transaction.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import asyncpg
from structlog.contextvars import bound_contextvars

from libs.common.errors import InvalidMessage, NotFound
from libs.common.kafka import Message, reject
from libs.common.logging import get_logger
from libs.common.metrics import CONTACT_EVENTS
from services.contacts import store, targets
from services.contacts.context import Context
from services.contacts.processor import UpstreamEvent, upstream_event
from services.contacts.store import QUERIES

log = get_logger(__name__)


async def _claim(conn: asyncpg.Connection, ids: Iterable[str]) -> set[str]:
    rows = await conn.fetch(QUERIES["claim-events"], list(ids))
    return {r["event_id"] for r in rows}


async def handle_contact_events(ctx: Context, batch: list[Message]) -> None:
    """F-03: ContactUpserted / ContactDeleted / MembershipRequested, idempotent per event id."""
    async with ctx.pool.acquire() as conn:
        fields = await ctx.fields.get(conn)
        events: list[tuple[Message, UpstreamEvent]] = []
        for message in batch:
            try:
                events.append((message, upstream_event(message.value, fields)))
            except InvalidMessage as exc:
                if "custom field" in exc.reason:
                    fields = await ctx.fields.get(conn, fresh=True)
                    try:
                        events.append((message, upstream_event(message.value, fields)))
                        continue
                    except InvalidMessage as again:
                        exc = again
                raise reject(message, exc.reason, exc.field) from None
            except (KeyError, ValueError, TypeError) as exc:
                raise reject(message, f"malformed event: {exc!r}") from None
        async with conn.transaction():
            fresh = await _claim(conn, {e.event_id for _, e in events})
            for message, event in events:
                if event.event_id not in fresh:
                    CONTACT_EVENTS.labels(event.type, "duplicate").inc()
                    continue
                fresh.discard(event.event_id)  # the same id twice in one batch: once
                try:
                    effect = await _apply(conn, event)
                except InvalidMessage as exc:
                    raise reject(message, exc.reason, exc.field) from None
                CONTACT_EVENTS.labels(event.type, effect).inc()


async def _apply(conn: asyncpg.Connection, event: UpstreamEvent) -> str:
    key = "external_id" if event.external_id else "email"
    if event.type == "ContactDeleted":
        contact_id = await store.find_id(conn, external_id=event.external_id, email=event.email)
        if contact_id is None:
            return "absent"
        await store.delete(conn, [contact_id])
        return "deleted"
    if event.type == "ContactUpserted" or not event.patch.is_empty() or event.group_id is None:
        effect, row = await store.upsert(conn, event.patch, key=key)
        contact_id = row["id"] if row is not None else None
    else:
        effect = "unchanged"
        contact_id = await store.find_id(conn, external_id=event.external_id, email=event.email)
    if event.type == "MembershipRequested":
        if contact_id is None:
            raise InvalidMessage("MembershipRequested for an unknown contact", field="email")
        try:
            joined = await store.join(conn, contact_id, event.group_id or 0,
                                      auto_stop=event.auto_stop, method="upstream", actor="upstream")
        except NotFound as exc:
            raise InvalidMessage(str(exc), field="membership.group_id") from None
        return "joined" if joined is not None else "already_member"
    return effect


async def handle_suppression_changes(ctx: Context, batch: list[Message]) -> None:
    """Keep the membership projection current (newer change wins; stale ones do nothing)."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        fresh = await _claim(conn, (m.value["change_id"] for m in batch))
        for message in batch:
            change = message.value
            if change["change_id"] not in fresh or change["kind"] != "membership":
                continue
            if change["contact_id"] is None or change["group_id"] is None:
                raise reject(message, "a membership change needs contact_id and group_id")
            if change["state"] == "left":
                await conn.execute(QUERIES["leave-membership"], change["contact_id"], change["group_id"])
                continue
            if change["state"] not in ("deliverable", "unsubscribed", "banned"):
                raise reject(message, f"unknown membership state {change['state']!r}", "state")
            await conn.execute(
                QUERIES["apply-membership-change"], change["contact_id"], change["group_id"],
                change["state"], change["method"] or "system", change["changed_at"],
            )


_OUTCOME_KIND = {"sent": "received", "permanent_error": "errored", "temporary_error": "errored",
                 "policy_error": "errored"}


async def handle_delivery_results(ctx: Context, batch: list[Message]) -> None:
    """Delivery history for search (received / errored) from ``delivery.results``."""
    rows = [
        (m.value["contact_id"], m.value["campaign_id"], _OUTCOME_KIND[m.value["outcome"]],
         m.value["occurred_at"], m.value["result_id"])
        for m in batch if m.value["outcome"] in _OUTCOME_KIND
    ]
    await _record_history(ctx, rows)


async def _record_history(ctx: Context, rows: list[tuple[int, str, str, dt.datetime, str]]) -> None:
    if not rows:
        return
    async with ctx.pool.acquire() as conn, conn.transaction():
        fresh = await _claim(conn, (r[4] for r in rows))
        rows = [r for r in rows if r[4] in fresh]
        if rows:
            contact_ids, campaign_ids, kinds, times, _ = (list(c) for c in zip(*rows, strict=True))
            await conn.execute(QUERIES["record-history"], contact_ids, campaign_ids, kinds, times)


async def handle_feedback(ctx: Context, batch: list[Message]) -> None:
    """Opens and clicks: history (F-05) and the score (F-08), once per event id."""
    points = {"open": ctx.settings.score_open_points, "click": ctx.settings.score_click_points}
    history_kind = {"open": "opened", "click": "clicked"}
    async with ctx.pool.acquire() as conn, conn.transaction():
        fresh = await _claim(conn, (m.value["event_id"] for m in batch))
        events = [m.value for m in batch if m.value["event_id"] in fresh]
        if not events:
            return
        await conn.execute(
            QUERIES["record-history"],
            [e["contact_id"] for e in events], [e["campaign_id"] for e in events],
            [history_kind[e["type"]] for e in events], [e["occurred_at"] for e in events],
        )
        scored = await conn.fetch(
            QUERIES["record-engagement"],
            [e["event_id"] for e in events], [e["contact_id"] for e in events],
            [e["campaign_id"] for e in events], [e["type"] for e in events],
            [points[e["type"]] for e in events], [e["occurred_at"] for e in events],
        )
        contact_ids = sorted({r["contact_id"] for r in scored})
        if contact_ids:
            rows = await conn.fetch(QUERIES["refresh-scores"], contact_ids)
            await store.publish_contacts(conn, rows)


async def handle_bounce_events(ctx: Context, batch: list[Message]) -> None:
    """Delivery status per contact (F-32) as the bounce processor decides it."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        fresh = await _claim(conn, (m.value["event_id"] for m in batch))
        for message in batch:
            event = message.value
            status = event.get("delivery_status")
            if event["event_id"] not in fresh or not status or event["contact_id"] is None:
                continue
            row = await conn.fetchrow(QUERIES["set-delivery-status"], event["contact_id"], status)
            if row is not None:
                await store.publish_contact(conn, row)


async def handle_snapshot_requests(ctx: Context, batch: list[Message]) -> None:
    """SPEC §9: evaluate a campaign's target once and stream its recipients, then an end marker."""
    for message in batch:
        request = message.value
        with bound_contextvars(campaign_id=request["campaign_id"]):
            await targets.stream_snapshot(ctx, request)

