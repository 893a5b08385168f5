"""The scheduler's state changes and reads, each inside the caller's connection or
transaction. Status changes go through :func:`transition`, which only moves a campaign
along an edge of :mod:`services.scheduler.status` and records the change."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg

from libs.common import outbox
from libs.common.db import Queries
from libs.common.errors import InvalidMessage, NotFound
from libs.common.logging import get_logger
from libs.common.topics import Topic
from services.scheduler import guard, processor, status
from services.scheduler.processor import Counters

QUERIES = Queries(Path(__file__).with_name("queries.sql"))
log = get_logger(__name__)


def campaign_uuid(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except (ValueError, AttributeError, TypeError):
        raise NotFound(f"campaign {raw} does not exist") from None


async def get_campaign(conn: asyncpg.Connection, campaign_id: str, *, lock: bool = False) -> Any:
    row = await conn.fetchrow(
        QUERIES["campaign-for-update" if lock else "campaign"], campaign_uuid(campaign_id)
    )
    if row is None:
        raise NotFound(f"campaign {campaign_id} does not exist")
    return row


async def transition(
    conn: asyncpg.Connection,
    campaign_id: uuid.UUID | str,
    target: str,
    now: dt.datetime,
    reason: str | None = None,
) -> asyncpg.Record | None:
    """Move a campaign to ``target`` if its status allows; the new row, or None."""
    row = await conn.fetchrow(
        QUERIES["transition"], str(campaign_id), target, status.sources(target), reason, now
    )
    if row is not None:
        log.info(
            "campaign_status_changed", campaign_id=str(campaign_id), status=target, reason=reason
        )
    return row


async def publish_control(
    conn: asyncpg.Connection,
    campaign_id: uuid.UUID | str,
    action: str,
    reason: str | None,
    now: dt.datetime,
    domains: Sequence[str] = (),
) -> None:
    """Queue a ``campaign.control`` command in the caller's transaction; ``domains``: a pause
    or resume of only the mail to those receiving domains (the complaint guard)."""
    value = processor.control(str(campaign_id), action, reason, str(uuid.uuid4()), now, domains)
    await outbox.add(conn, Topic.CAMPAIGN_CONTROL, str(campaign_id), value)


async def guard_of(conn: asyncpg.Connection, campaign_id: uuid.UUID) -> dict[str, Any] | None:
    """The API's ``guard`` of one campaign, with how many of its recipients it holds."""
    row = await conn.fetchrow(QUERIES["guard"], campaign_id)
    if row is None:
        return None
    held = 0
    if row["held"]:
        held = await conn.fetchval(QUERIES["held-recipients"], campaign_id, list(row["held"]))
    return guard.guard_json(row, held)


async def guards_of(
    conn: asyncpg.Connection, campaign_ids: list[uuid.UUID]
) -> dict[uuid.UUID, dict[str, Any] | None]:
    """The API's ``guard`` of each campaign of a page (without the recipients counted)."""
    rows = {r["campaign_id"]: r for r in await conn.fetch(QUERIES["guards"], campaign_ids)}
    return {c: guard.guard_json(rows.get(c)) for c in campaign_ids}


def counters(row: Mapping[str, Any]) -> Counters:
    return Counters(row["planned"], row["success"], row["error"], row["suppressed"])


def category_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "window_start": row["window_start"],
        "window_end": row["window_end"],
        "time_zone": row["time_zone"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def campaign_json(row: Mapping[str, Any], history: list[Any] | None = None) -> dict[str, Any]:
    """The API representation of a campaign, with its counters (F-25)."""
    c = counters(row)
    body: dict[str, Any] = {
        "id": str(row["id"]),
        "name": row["name"],
        "category_id": row["category_id"],
        "target": {
            "group_id": row["group_id"],
            "filter": row["filter"],
            "saved_filter_id": row["saved_filter_id"],
        },
        "from_address": row["from_address"],
        "from_name": row["from_name"],
        "reply_to": row["reply_to"],
        "subject": row["subject"],
        "format": row["format"],
        "body": row["body"],
        "coupon_url": row["coupon_url"],
        "dedupe": row["dedupe"],
        "include_unsubscribed": row["include_unsubscribed"],
        "scheduled_at": row["scheduled_at"],
        "status": row["status"],
        "status_label": status.LABELS[row["status"]],
        "status_reason": row["status_reason"],
        "paused": row["paused"],
        # Counters (F-25): 配信数, 成功数, エラー数, suppressed at the last moment, 未配信数
        # (given up: recipients without a result once the campaign sends no more; 0 before),
        # pending (recipients still awaiting a result while it may send; 0 after).
        # released = recipients released at least once (never more than planned);
        # re_released = releases of a recipient after its first (after a pause, a timeout, a
        # request or result a broker lost).
        "planned": c.planned,
        "success": c.success,
        "error": c.error,
        "suppressed": c.suppressed,
        "unsent": c.unsent(row["status"]),
        "pending": c.pending(row["status"]),
        "released": row["released"],
        "re_released": row["re_released"],
        # 送信待ち (ドメインの速度制限): recipients whose mail a sender holds until its
        # receiving domain admits it (issue 21), as the newest checkpoint answer said; the
        # campaign stays sending until they have results.
        "sender_held": processor.held_shown(
            row["sender_held"], row["status"], c.pending(row["status"])
        ),
        # Statistics (F-34): every open and click, and recipients who opened / clicked.
        "opens": row["opens"],
        "clicks": row["clicks"],
        "unique_opens": row["unique_opens"],
        "unique_clicks": row["unique_clicks"],
        "track_opens": row["track_opens"],
        "track_clicks": row["track_clicks"],
        "resent_from": None if row["resent_from"] is None else str(row["resent_from"]),
        "created_by": row["created_by"],
        "created_at": row["created_at"],
        "reserved_at": row["reserved_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
    }
    if history is not None:
        body["history"] = [
            {"status": h["status"], "reason": h["reason"], "at": h["at"]} for h in history
        ]
    return body


async def check_category(conn: asyncpg.Connection, category_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(QUERIES["category"], category_id)
    if row is None:
        raise InvalidMessage(f"category {category_id} does not exist", field="category_id")
    return row
