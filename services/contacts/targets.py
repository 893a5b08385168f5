"""Campaign targets: who a group, a filter or a saved filter selects (SPEC §9, F-20, F-22).

``stream_snapshot`` answers a ``snapshot.requests`` record by evaluating the target once,
in one REPEATABLE READ transaction (a consistent picture), and streaming one
``campaign.recipients`` record per recipient — with the merge values as they are at that
moment — followed by an end marker carrying the count (or the error).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import asyncpg

from libs.common.errors import InvalidMessage, NotFound
from libs.common.logging import get_logger
from libs.common.mail.can_send import STOPPING_DELIVERY_STATUSES
from libs.common.mail.states import MembershipState
from libs.common.metrics import SNAPSHOT_RECIPIENTS
from libs.common.topics import Topic
from services.contacts.context import Context
from services.contacts.models import FieldDefinition
from services.contacts.processor import merge_values
from services.contacts.search import SavedFilterRef, compile_filter, referenced_saved_filters
from services.contacts.store import QUERIES

log = get_logger(__name__)

#: delivery statuses that stop every send (F-32); the sender checks again at send time.
STOPPED_STATUSES = sorted(status.value for status in STOPPING_DELIVERY_STATUSES)
CHUNK = 2000


async def load_saved_filters(
    conn: asyncpg.Connection, target_filter: Any, extra: tuple[int, ...] = ()
) -> dict[int, SavedFilterRef]:
    """Every saved filter the target names, followed transitively."""
    wanted = set(extra) | referenced_saved_filters(target_filter)
    found: dict[int, SavedFilterRef] = {}
    while wanted - found.keys():
        rows = await conn.fetch(QUERIES["saved-filters-by-id"], list(wanted - found.keys()))
        missing = (wanted - found.keys()) - {r["id"] for r in rows}
        if missing:
            raise InvalidMessage(
                f"saved filter {sorted(missing)[0]} does not exist", field="saved_filter"
            )
        for r in rows:
            found[r["id"]] = SavedFilterRef(r["id"], r["group_id"], r["filter"])
            wanted |= referenced_saved_filters(r["filter"])
    return found


async def target_query(
    conn: asyncpg.Connection,
    fields: Mapping[str, FieldDefinition],
    *,
    group_id: int | None,
    target_filter: dict[str, Any] | None,
    saved_filter_id: int | None,
    include_unsubscribed: bool = False,
    dedupe: str = "none",
) -> tuple[str, list[Any]]:
    """SQL selecting the recipients of a target, ordered by contact id."""
    if group_id is None and target_filter is None and saved_filter_id is None:
        raise InvalidMessage("a target needs a group, a filter or a saved filter", field="target")
    if group_id is not None and await conn.fetchrow(QUERIES["group-by-id"], group_id) is None:
        raise NotFound(f"group or plan {group_id} does not exist")
    saved = await load_saved_filters(
        conn, target_filter, (saved_filter_id,) if saved_filter_id else ()
    )
    node: dict[str, Any] = {"all": []}
    if target_filter:
        node["all"].append(target_filter)
    if saved_filter_id is not None:
        node["all"].append({"saved_filter": saved_filter_id})
    compiled = compile_filter(node, fields, saved_filters=saved, group_scope=group_id)
    params = list(compiled.params)
    params.append(STOPPED_STATUSES)
    where = [compiled.where, f"NOT (c.delivery_status = ANY(${len(params)}::text[]))"]
    if group_id is not None:
        params.append(group_id)
        join = f"JOIN membership m ON m.contact_id = c.id AND m.group_id = ${len(params)}"
        states = [MembershipState.DELIVERABLE.value]
        if include_unsubscribed:
            states.append(MembershipState.UNSUBSCRIBED.value)
        params.append(states)
        where.append(f"m.state = ANY(${len(params)}::text[])")
        select = "c.*, m.group_id AS target_group_id, m.state AS membership_state"
    else:
        # No group decides: 配信禁止 anywhere is the stronger refusal, so a banned contact
        # is never a recipient of a filter-only campaign.
        join = ""
        select = "c.*, NULL::bigint AS target_group_id, NULL::text AS membership_state"
        where.append(
            "NOT EXISTS (SELECT 1 FROM membership b"
            f" WHERE b.contact_id = c.id AND b.state = '{MembershipState.BANNED.value}')"
        )
    sql = f"SELECT {select} FROM contact c {join} WHERE {' AND '.join(where)}"
    if dedupe == "by_email":
        # The same mailbox written with a different case of its local part: send once.
        sql = (
            f"SELECT DISTINCT ON (lower(t.email)) t.* FROM ({sql}) t ORDER BY lower(t.email), t.id"
        )
        sql = f"SELECT * FROM ({sql}) d ORDER BY d.id"
    else:
        sql += " ORDER BY c.id"
    return sql, params


async def iterate_target(
    conn: asyncpg.Connection, sql: str, params: list[Any]
) -> AsyncIterator[asyncpg.Record]:
    """Rows of a target query through a server-side cursor (memory stays flat)."""
    async for row in conn.cursor(sql, *params, prefetch=CHUNK):
        yield row


def recipient_record(
    request: Mapping[str, Any], seq: int, row: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "campaign_id": request["campaign_id"],
        "request_id": request["request_id"],
        "kind": "recipient",
        "seq": seq,
        "contact_id": row["id"],
        "email": row["email"],
        "group_id": row["target_group_id"],
        "membership_state": row["membership_state"],
        "merge_values": merge_values(row),
        "total": None,
        "error": None,
    }


def end_record(
    request: Mapping[str, Any], seq: int, total: int, error: str | None = None
) -> dict[str, Any]:
    return {
        "campaign_id": request["campaign_id"],
        "request_id": request["request_id"],
        "kind": "end",
        "seq": seq,
        "contact_id": None,
        "email": None,
        "group_id": None,
        "membership_state": None,
        "merge_values": {},
        "total": total,
        "error": error,
    }


async def stream_snapshot(ctx: Context, request: Mapping[str, Any]) -> int:
    """Publish the recipients of ``request``'s target and the end marker; returns the count."""
    publisher = ctx.publisher
    campaign_id = request["campaign_id"]
    total = 0
    pending: list[asyncio.Future[Any]] = []
    try:
        async with (
            ctx.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            fields = await ctx.fields.get(conn)
            target_filter = (
                json.loads(request["filter_json"]) if request.get("filter_json") else None
            )
            sql, params = await target_query(
                conn,
                fields,
                group_id=request.get("group_id"),
                target_filter=target_filter,
                saved_filter_id=request.get("saved_filter_id"),
                include_unsubscribed=bool(request.get("include_unsubscribed")),
                dedupe=request.get("dedupe") or "none",
            )
            cursor = await conn.cursor(sql, *params)
            while rows := await cursor.fetch(CHUNK):
                # seq counts from 0; the end marker's seq is the total (campaign.recipients.avsc)
                records = [recipient_record(request, total + i, row) for i, row in enumerate(rows)]
                total += len(rows)
                await asyncio.gather(*pending)  # one chunk in flight while the next is read
                pending = await publisher.send_same_key(
                    Topic.CAMPAIGN_RECIPIENTS, campaign_id, records
                )
        await asyncio.gather(*pending)
        error = None
    except (InvalidMessage, NotFound, ValueError) as exc:
        await asyncio.gather(*pending)
        error = getattr(exc, "reason", None) or str(exc)
        log.warning("snapshot_refused", reason=error)
    await publisher.send_and_wait(
        Topic.CAMPAIGN_RECIPIENTS, campaign_id, end_record(request, total, total, error)
    )
    SNAPSHOT_RECIPIENTS.inc(total)
    log.info("snapshot_streamed", recipients=total, error=error)
    return total
