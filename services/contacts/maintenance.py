"""Periodic upkeep of the contacts schema: scores lose points older than 90 days (F-08),
idempotency ids past their retention are forgotten, and addresses that collided by case
(migration 0007) are re-checked until an operator has resolved them."""

from __future__ import annotations

from libs.common.logging import get_logger
from libs.common.retry import every
from services.contacts import store
from services.contacts.context import Context
from services.contacts.store import QUERIES

log = get_logger(__name__)


async def run_once(ctx: Context) -> int:
    """One pass; returns how many scores changed. Safe to run on every replica."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        expired = [r["contact_id"] for r in await conn.fetch(QUERIES["expire-engagement"])]
        rows = await conn.fetch(QUERIES["refresh-scores"], expired) if expired else []
        await store.publish_contacts(conn, rows)
        forgotten = await conn.execute(
            QUERIES["forget-processed-events"], ctx.settings.processed_event_retention_days
        )
    log.info("maintenance_done", scores_refreshed=len(rows), event_ids_forgotten=forgotten)
    await check_email_identity(ctx)
    return len(rows)


async def check_email_identity(ctx: Context) -> int:
    """Re-check the case-insensitive address key (a catalog read once it is complete);
    returns how many contacts still collide, warned about until resolved."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        colliding: int = await conn.fetchval(QUERIES["email-identity"])
    if colliding:
        log.warning(
            "contact_email_collisions",
            contacts=colliding,
            hint="GET /v1/contacts/email-collisions; edit or delete one contact of each pair",
        )
    return colliding


async def run_forever(ctx: Context) -> None:
    """A pass at the start (expired score points are due), then every interval."""
    s = ctx.settings
    await every(
        s.maintenance_interval_seconds,
        lambda: run_once(ctx),
        name="maintenance",
        service=s.service,
        first_now=True,
    )
